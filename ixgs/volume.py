"""A 3D image with its LPS geometry, and atomic file writing.

Every single file the engine writes goes through :func:`atomic_path` so a crash or a refusal never
leaves a half-written file behind; folders go through :mod:`ixgs.output_folder`.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .geometry import Grid


@dataclass
class Volume:
    """``array`` indexed [k, j, i] (z, y, x); ``origin`` the LPS centre of voxel (0,0,0) in mm;
    ``spacing`` (sx, sy, sz) in mm; ``direction`` 3x3 with the i, j, k axes as columns."""

    array: np.ndarray
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    @classmethod
    def on_grid(cls, array: np.ndarray, grid: Grid) -> "Volume":
        if tuple(array.shape) != tuple(grid.shape):
            raise ValueError(f"array shape {array.shape} does not match grid shape {grid.shape}")
        return cls(np.asarray(array), tuple(grid.origin), tuple(grid.spacing))

    @property
    def grid(self) -> Grid:
        """The axis-aligned grid of this volume (only meaningful for an identity direction)."""
        return Grid(tuple(self.array.shape), tuple(self.origin), tuple(self.spacing))

    def to_sitk(self) -> sitk.Image:
        image = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        image.SetOrigin([float(o) for o in self.origin])
        image.SetSpacing([float(s) for s in self.spacing])
        image.SetDirection([float(d) for d in np.asarray(self.direction, float).ravel()])
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> "Volume":
        if image.GetDimension() != 3:
            raise ValueError(f"expected a 3D image, got {image.GetDimension()}D")
        return cls(
            sitk.GetArrayFromImage(image),
            tuple(image.GetOrigin()),
            tuple(image.GetSpacing()),
            np.asarray(image.GetDirection(), float).reshape(3, 3),
        )

    @classmethod
    def read(cls, path: str | os.PathLike) -> "Volume":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such volume file")
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as error:
            raise ValueError(f"{path}: cannot be read as an image ({str(error).strip().splitlines()[-1]})") from None
        try:
            return cls.from_sitk(image)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    def write(self, path: str | os.PathLike, compress: bool = True) -> None:
        write_image(self.to_sitk(), path, compress)


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> None:
    """Write any SimpleITK image atomically (format from the suffix)."""
    with atomic_path(path) as temporary:
        sitk.WriteImage(image, str(temporary), compress)


def read_json_object(path: str | os.PathLike, missing: str = "file not found",
                     error: type[Exception] = ValueError) -> dict:
    """A JSON file whose top level is an object; refusals name the file (``missing`` says what it lacks)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {missing}")
    try:
        value = json.loads(path.read_text())
    except RecursionError:
        raise error(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError as problem:  # JSONDecodeError, UnicodeDecodeError, an integer of thousands of digits
        raise error(f"{path}: not valid JSON ({problem})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: top level must be a JSON object")
    return value


def json_text(value, indent: int | None = None) -> str:
    """Strict JSON of ``value``: NaN and infinities become null (undefined), numpy scalars and arrays
    plain numbers and lists, paths strings; what strict JSON readers accept."""
    return json.dumps(_finite_json(value), indent=indent, allow_nan=False)


def _finite_json(value):
    if isinstance(value, dict):
        return {key: _finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(item) for item in value]
    if isinstance(value, np.ndarray):
        return _finite_json(value.tolist())
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary sibling file path with the same suffixes; rename it onto ``path`` on success.

    For files only (an existing file is replaced only once the new one is complete; an existing
    folder is never replaced): output folders follow :mod:`ixgs.output_folder`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    handle, temporary = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".partial{suffix}", dir=path.parent)
    os.close(handle)
    os.unlink(temporary)
    temporary = Path(temporary)
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        if temporary.is_dir():
            shutil.rmtree(temporary, ignore_errors=True)
        elif temporary.exists():
            temporary.unlink()
        raise
