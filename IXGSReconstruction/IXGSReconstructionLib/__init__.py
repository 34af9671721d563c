"""Qt-free logic of the IXGSReconstruction module: MRML nodes in and out, runnable without the GUI.

Submodules: ``nodes`` (engine LPS <-> MRML RAS, bone segmentation, rendering, poses), ``process``
(background ``ixgs reconstruct`` with progress and cancel), ``options`` (setting choices known before
the engine loads), ``results`` (load, keep and report outputs), ``align``
(align to anatomy), ``compare`` (CT comparison and metrics table), ``likert`` (blinded scoring),
``sampledata`` (locally generated sample scan), ``dependencies`` (torch and pip packages in Slicer).
"""
