"""Checkpoints: a single file, written atomically, loaded without running code, refused when it
belongs to another scan or other settings.

A checkpoint holds only tensors, numbers, strings, lists and dicts, so ``torch.load(weights_only=True)``
reads it and refuses anything else (a pickle can run code when it is loaded). Its fingerprint (the
scan's content hash, the grid and the settings that shape the model) must match the run that resumes.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..geometry import Grid
from ..scan import Scan

FORMAT = "ixgs-checkpoint-1"
# Settings that shape the model or the run's random stream: a resume must use the same ones.
MODEL_SETTINGS = ("method", "preset", "gaussians", "init", "seed", "support_factor", "refine_poses",
                  "views_per_step", "held_out_views")


def scan_content_hash(scan: Scan) -> str:
    """SHA-256 of every view's projection matrix and pixel data, in view order."""
    digest = hashlib.sha256()
    for view in scan.views:
        digest.update(np.ascontiguousarray(view.projection_matrix, dtype=np.float64).tobytes())
        image = np.ascontiguousarray(view.image, dtype=np.float32)
        digest.update(str(image.shape).encode())
        digest.update(image.tobytes())
    return digest.hexdigest()


def fingerprint(scan: Scan, grid: Grid, settings: dict, training_config: dict) -> dict:
    """What a checkpoint must agree on with the run that resumes it."""
    return {"scan_sha256": scan_content_hash(scan),
            "grid": {"shape": list(grid.shape), "origin_mm": [round(float(v), 6) for v in grid.origin],
                     "spacing_mm": [round(float(v), 6) for v in grid.spacing]},
            "settings": {name: settings.get(name) for name in MODEL_SETTINGS},
            "training_config": training_config}


def fingerprint_differences(saved: dict, current: dict) -> list[str]:
    """Names of what differs between two fingerprints ("scan content", "grid", "setting 'seed'", ...)."""
    differences = []
    if saved.get("scan_sha256") != current["scan_sha256"]:
        differences.append("scan content (projection matrices or pixel data)")
    if saved.get("grid") != current["grid"]:
        differences.append(f"grid ({saved.get('grid')} vs {current['grid']})")
    saved_settings = saved.get("settings") or {}
    for name, value in current["settings"].items():
        if saved_settings.get(name) != value:
            differences.append(f"setting '{name}' ({saved_settings.get(name)!r} vs {value!r})")
    if saved.get("training_config") != current["training_config"]:
        differences.append("training configuration")
    return differences


def _load_file(path: Path, device) -> dict:
    """The checkpoint's payload, loaded tensors-only; one-line ValueError naming the file otherwise."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # any failure to read it safely means it is not ours
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise ValueError(f"resume checkpoint {path}: not a usable IXGS checkpoint ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"resume checkpoint {path}: not a usable IXGS checkpoint (no {FORMAT} marker)")
    return state


def load_checkpoint(path: str | os.PathLike, device, current_fingerprint: dict) -> dict:
    """A checkpoint's state, refused (ValueError naming the file and what differs) unless it was made
    for this scan, grid and these settings."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"resume checkpoint {path}: file not found")
    state = _load_file(path, device)
    differences = fingerprint_differences(state.get("fingerprint") or {}, current_fingerprint)
    if differences:
        raise ValueError(f"resume checkpoint {path}: made for a different run; differs in " + "; ".join(differences))
    return state


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` to the file ``path`` atomically: a temporary file in the same folder, then a rename
    (a folder at ``path`` is an error, never removed)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {path}: is a folder, not a file")
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save({**state, "format": FORMAT}, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def check_checkpoint_path(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot take checkpoints (a folder, a missing or read-only folder, someone else's file), or None."""
    path = Path(path)
    if path.is_dir():
        return f"{path} is a folder; give a file path"
    parent = path.parent
    if not parent.is_dir():
        return f"folder {parent} does not exist"
    try:  # a real write, not os.access: that says yes to root on a read-only file system
        tempfile.TemporaryFile(dir=parent).close()
    except OSError:
        return f"folder {parent} is not writable"
    if path.exists():
        if not path.is_file():
            return f"{path} exists and is not a regular file"
        try:
            _load_file(path, "cpu")
        except ValueError:
            return f"{path} exists and is not an IXGS checkpoint; refusing to overwrite it"
    return None
