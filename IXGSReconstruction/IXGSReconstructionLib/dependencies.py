"""Python dependencies of the engine inside Slicer: asked for, never installed at import time.

torch comes from the SlicerPyTorch extension (it picks the CUDA/CPU build that fits the machine);
the small pure-Python packages go through Slicer's ``pip_ensure``, which asks the user first.
"""
from __future__ import annotations

import importlib
import importlib.util

import slicer

MINIMUM_TORCH_VERSION = "2.0"
# pip name -> import name; SimpleITK and numpy ship with Slicer.
PIP_REQUIREMENTS = {"scikit-image": "skimage", "scipy": "scipy", "tqdm": "tqdm", "matplotlib": "matplotlib",
                    "numba": "numba"}  # numba: the fast CPU kernels (ixgs.kernels)
TORCH_MISSING_MESSAGE = (
    "IXGS needs PyTorch. Install the 'PyTorch' extension from the Extensions Manager, restart Slicer, "
    "then press Reconstruct again (it will offer to install torch for this computer's GPU or CPU)."
)


def missing_packages() -> list[str]:
    """pip names of the required packages that cannot be imported."""
    return [pip_name for pip_name, module in PIP_REQUIREMENTS.items() if importlib.util.find_spec(module) is None]


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def ensure_torch() -> None:
    """torch through SlicerPyTorch (asks the user); a clear RuntimeError when that extension is absent."""
    if torch_available():
        return
    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        raise RuntimeError(TORCH_MISSING_MESSAGE) from None
    logic = PyTorchUtils.PyTorchUtilsLogic()
    if not logic.torchInstalled():
        torch = logic.installTorch(askConfirmation=True, torchVersionRequirement=f">={MINIMUM_TORCH_VERSION}")
        if torch is None:
            raise RuntimeError("PyTorch was not installed; IXGS cannot reconstruct without it.")


def ensure_packages(requester: str = "IXGS") -> None:
    """Install the missing pip packages after the user agreed (Slicer's ``pip_ensure`` asks)."""
    missing = missing_packages()
    if not missing:
        return
    if importlib.util.find_spec("slicer.packaging") is not None:  # Slicer >= 5.11
        importlib.import_module("slicer.packaging").pip_ensure(missing, requester=requester)
    elif hasattr(slicer.util, "pip_ensure"):
        slicer.util.pip_ensure(missing, requester=requester)
    else:  # older Slicer: ask ourselves, then install
        if not slicer.util.confirmOkCancelDisplay(
                f"{requester} needs these Python packages: {', '.join(missing)}. Install them now?"):
            raise RuntimeError(f"{requester} cannot run without: {', '.join(missing)}")
        slicer.util.pip_install(missing)
    still_missing = missing_packages()
    if still_missing:
        raise RuntimeError(f"{requester} cannot run without: {', '.join(still_missing)}")


def ensure_all(requester: str = "IXGS") -> None:
    ensure_torch()
    ensure_packages(requester)
