"""Engine setting values the module offers before the engine (and torch) is loaded: the parameter
node's choices are fixed when Slicer imports the module."""

# ReconstructionSettings.kernel: the projector implementation; "auto" picks the fastest available.
KERNELS = ("auto", "torch", "numba", "triton")
