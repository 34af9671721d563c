"""Which kernel runs: ``auto`` = Triton on CUDA, numba on a CPU, plain torch where neither imports.

numba and Triton are optional (extras ``fast`` and ``cuda``); an explicit choice that cannot run
here is a one-line ``ValueError`` naming the setting, ``auto`` falls back to torch with one warning.
numba caches its compiled kernels beside the package; where that folder is read-only (e.g. a
system-wide or Slicer install) the cache goes to ``~/.cache/ixgs/numba``.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from pathlib import Path

import torch

KERNELS = ("auto", "torch", "numba", "triton")
_IMPORTED: dict[tuple[str, str], object] = {}
_WARNED: set[str] = set()


def _set_numba_cache_dir() -> None:
    """Point numba's cache at a user folder when the package folder cannot be written (before numba loads)."""
    package = Path(__file__).resolve().parent
    if "NUMBA_CACHE_DIR" not in os.environ and not os.access(package, os.W_OK):
        os.environ["NUMBA_CACHE_DIR"] = str(Path.home() / ".cache" / "ixgs" / "numba")


def kernel_module(name: str, part: str = "splat"):
    """Module ``ixgs.kernels.<name>_<part>`` (name "numba" or "triton", part "splat" or "voxelize")
    imported, or the ImportError it raised."""
    key = (name, part)
    if key not in _IMPORTED:
        if name == "numba":
            _set_numba_cache_dir()
        try:
            _IMPORTED[key] = importlib.import_module(f"ixgs.kernels.{name}_{part}")
        except ImportError as error:  # not installed, or a broken install: torch still works
            _IMPORTED[key] = error
    return _IMPORTED[key]


@contextlib.contextmanager
def cpu_threads(threads: int | None, kernel: str):
    """torch's CPU threads, and numba's when ``kernel`` is "numba", set to ``threads`` for the block,
    then restored (None: left as they are). Setting both matters: each numba launch sets the calling
    thread's OpenMP thread count to numba's own, which is also torch's, so a numba kernel undid
    torch.set_num_threads."""
    if threads is None:
        yield
        return
    numba = importlib.import_module("numba") if kernel == "numba" else None
    before = torch.get_num_threads(), numba.get_num_threads() if numba else None
    torch.set_num_threads(threads)
    if numba:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        if numba:
            numba.set_num_threads(before[1])


def _why_not(name: str, device: torch.device) -> str | None:
    """Why kernel ``name`` cannot run on ``device``, or None when it can."""
    module = kernel_module(name)
    if isinstance(module, ImportError):
        extra = "fast" if name == "numba" else "cuda"
        return f"{name} is not installed (pip install 'ixgs[{extra}]'): {module}"
    if name == "numba" and device.type != "cpu":
        return f"the numba kernels run on a CPU, the device is {device.type}"
    if name == "triton" and device.type != "cuda" and not module.INTERPRETED:
        return "the Triton kernels need a CUDA device (or TRITON_INTERPRET=1 set before triton loads)"
    return None


def resolve_kernel(name: str, device: torch.device | str) -> str:
    """The kernel that runs for the setting ``name`` on ``device``: "torch", "numba" or "triton"."""
    device = torch.device(device)
    if name not in KERNELS:
        raise ValueError(f"setting 'kernel': must be one of {KERNELS}, got {name!r}")
    if name == "torch":
        return name
    if name != "auto":
        reason = _why_not(name, device)
        if reason is not None:
            raise ValueError(f"setting 'kernel': {reason}")
        return name
    wanted = "triton" if device.type == "cuda" else "numba"
    reason = _why_not(wanted, device)
    if reason is None:
        return wanted
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"kernel 'auto': using the plain torch kernels ({reason})")
    return "torch"
