"""Fast kernels for the renderer (:mod:`ixgs.splat`) and the voxelizer (:mod:`ixgs.voxelize`).

The plain torch code in those modules is the reference. The kernels here compute the same per-pair
math without materialising (Gaussian, pixel/voxel) pairs: numba on a CPU (``numba_*``), Triton on
CUDA (``triton_*``, also runnable on a CPU with ``TRITON_INTERPRET=1`` for tests). Which one runs is
decided by :func:`ixgs.kernels.choice.resolve_kernel`; both are optional installs (extras ``fast``
and ``cuda``).
"""
