"""Read, validate and write scans (``docs/SCAN_FORMAT.md``, version 1).

A :class:`Scan` in memory is always in the engine's conventions, whatever the file said: LPS world,
attenuation line integrals, projection matrices normalised so ``w > 0`` towards the detector.
Every refusal raises :class:`ScanError` naming the file or view and the problem.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .geometry import (
    LPS_RAS_FLIP,
    Roi,
    common_field_of_view,
    compose_projection_matrix,
    normalize_projection_matrix,
    ras_to_lps_matrix,
    source_position,
    views_seeing,
)
from .errors import InputError
from .output_folder import output_folder
from .volume import Volume, json_text, read_json_object

FORMAT = "ixgs.scan"
VERSION = 1
KIND = "scan"  # the output-folder kind of a scan written by ixgs (ixgs.output_folder)
WORLDS = ("LPS", "RAS")
INTENSITIES = ("attenuation", "transmission")
# Fraction of the brightest pixels that estimate the unattenuated intensity I0 of a transmission view.
I0_BRIGHTEST_FRACTION = 0.005
# A view is refused when more than NEGATIVE_FRACTION of its pixels lie below -NEGATIVE_TOLERANCE x its
# largest magnitude: line integrals and detector signals are >= 0, and their noise stays well inside this.
NEGATIVE_TOLERANCE = 0.02
NEGATIVE_FRACTION = 0.01
# World coordinates (mm) beyond this distance from the origin are refused as absurd (1 km).
MAX_WORLD_MM = 1e6
# Sample points per side of the ROI when testing which views see it.
ROI_SAMPLES = 16


class ScanError(InputError):
    """A scan that cannot be used; the message names the file, view or field."""


@dataclass
class View:
    """One projection: attenuation line integrals (float32, rows x cols) and its 3x4 LPS matrix."""

    image: np.ndarray
    projection_matrix: np.ndarray
    name: str

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.image.shape)

    @property
    def source(self) -> np.ndarray:
        """X-ray source position (LPS, mm)."""
        return source_position(self.projection_matrix)


@dataclass
class Scan:
    views: list[View]
    roi: Roi
    reference_volume: Path | None = None
    path: Path | None = None
    # What the reader accepted but a user should hear about (one line each; see docs/SCAN_FORMAT.md).
    warnings: list[str] = field(default_factory=list)

    @property
    def projection_matrices(self) -> list[np.ndarray]:
        return [view.projection_matrix for view in self.views]


def read_scan(path: str | os.PathLike) -> Scan:
    """Load and validate a scan folder (or its ``scan.json``)."""
    path = Path(path)
    folder = path.parent if path.suffix == ".json" else path
    manifest = folder / "scan.json" if path.suffix != ".json" else path
    meta = read_json_object(manifest, "no scan.json (not a scan folder)", ScanError)

    if meta.get("format") != FORMAT:
        raise ScanError(f"{manifest}: field 'format' must be {FORMAT!r}, got {meta.get('format')!r}")
    if meta.get("version") != VERSION:
        raise ScanError(f"{manifest}: field 'version' must be {VERSION}, got {meta.get('version')!r}")
    world = meta.get("world", "LPS")
    if world not in WORLDS:
        raise ScanError(f"{manifest}: field 'world' must be one of {WORLDS}, got {world!r}")
    intensity = meta.get("intensity", "attenuation")
    if intensity not in INTENSITIES:
        raise ScanError(f"{manifest}: field 'intensity' must be one of {INTENSITIES}, got {intensity!r}")
    i0 = meta.get("i0")
    if i0 is not None and not (_is_number(i0) and np.isfinite(i0) and i0 > 0):
        raise ScanError(f"{manifest}: field 'i0' must be a positive number, got {i0!r}")
    entries = meta.get("views")
    if not isinstance(entries, list):
        raise ScanError(f"{manifest}: field 'views' must be a list")
    if len(entries) < 2:
        raise ScanError(f"{manifest}: a scan needs at least 2 views, got {len(entries)}")

    images, matrices, names = [], [], []
    for index, entry in enumerate(entries):
        label = f"{manifest}: view {index}"
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise ScanError(f"{label}: needs an 'image' path")
        label = f"{manifest}: view {index} ({entry['image']})"
        matrix = _view_matrix(entry, label)
        if world == "RAS":
            matrix = ras_to_lps_matrix(matrix)
        image = _read_view_image(path_inside(folder, entry["image"], f"{label}: field 'image'"), label)
        if intensity == "transmission":
            _check_not_negative(image, f"{label}: transmission image", "detector signals")
            image = transmission_to_attenuation(image, i0, label)
        _check_line_integrals(image, label)
        images.append(image)
        matrices.append(matrix)
        names.append(entry["image"])

    roi = _read_roi(meta.get("roi"), world, manifest)
    if roi is None:
        roi = common_field_of_view(matrices, [image.shape for image in images])
        if roi is None:
            raise ScanError(f"{manifest}: no 'roi' given and no region is seen by every view")

    views = []
    for index, (image, matrix, name) in enumerate(zip(images, matrices, names)):
        matrix = normalize_projection_matrix(matrix, np.asarray(roi.center))
        if roi.contains(source_position(matrix)):
            raise ScanError(f"{manifest}: view {index} ({name}): the X-ray source lies inside the ROI")
        views.append(View(image=image, projection_matrix=matrix, name=name))
    warnings = check_roi_seen(views, roi, f"{manifest}: field 'roi'")

    reference = meta.get("reference_volume")
    reference_path = None
    if reference is not None:
        if not isinstance(reference, str):
            raise ScanError(f"{manifest}: field 'reference_volume' must be a path string")
        label = f"{manifest}: reference_volume {reference!r}"
        reference_path = path_inside(folder, reference, label)
        _check_reference_volume(reference_path, label)
    return Scan(views=views, roi=roi, reference_volume=reference_path, path=folder, warnings=warnings)


def path_inside(folder: Path, name: str, label: str) -> Path:
    """``folder / name`` with symlinks resolved, refused unless it stays inside ``folder``: a file must
    not pull any other readable file into what we write (``docs/SCAN_FORMAT.md``, "Paths")."""
    root = Path(folder).resolve()
    path = (root / name).resolve()
    if Path(name).is_absolute() or not path.is_relative_to(root):
        raise ScanError(f"{label}: {name!r} points outside the folder {str(folder)!r}; "
                        "files must be named relative to it and stay inside it")
    return path


def check_roi(roi: Roi, label: str) -> None:
    """Refuse a box that is not finite, not positive, or absurdly far (beyond :data:`MAX_WORLD_MM`)."""
    center, size = np.asarray(roi.center, float), np.asarray(roi.size, float)
    if center.shape != (3,) or size.shape != (3,) or not (np.all(np.isfinite(center)) and np.all(np.isfinite(size))):
        raise ScanError(f"{label}: center and size must be 3 finite numbers each")
    if np.any(size <= 0):
        raise ScanError(f"{label}: 'size' must be positive, got {size.tolist()}")
    if np.any(np.abs(center) + size / 2 > MAX_WORLD_MM):
        raise ScanError(f"{label}: reaches beyond {MAX_WORLD_MM:g} mm from the origin (coordinates are in mm)")


def check_roi_seen(views: list[View], roi: Roi, label: str) -> list[str]:
    """Refuse an ROI that no view sees; return a warning for each view that does not see it."""
    points = roi.grid(max(roi.size) / ROI_SAMPLES).voxel_centers().reshape(-1, 3)
    blind = [index for index, view in enumerate(views)
             if not views_seeing([view.projection_matrix], [view.shape], points, roi.center).any()]
    if len(blind) == len(views):
        raise ScanError(f"{label}: no view sees the ROI (center {list(roi.center)}, size {list(roi.size)} mm)")
    return [f"{label}: view {index} ({views[index].name}) does not see the ROI; it adds nothing to the reconstruction"
            for index in blind]


def transmission_to_attenuation(image: np.ndarray, i0: float | None, label: str = "view") -> np.ndarray:
    """-log(I / I0); I0 from the brightest 0.5 % of the image when not given."""
    if i0 is None:
        brightest = np.sort(image.ravel())[-max(1, int(round(image.size * I0_BRIGHTEST_FRACTION))):]
        i0 = float(np.median(brightest))
        if not i0 > 0:
            raise ScanError(f"{label}: cannot estimate I0 (the brightest pixels are not positive)")
    floor = i0 * 1e-6
    return (-np.log(np.maximum(image, floor) / i0)).astype(np.float32)


def write_scan(
    path: str | os.PathLike,
    images: list[np.ndarray],
    projection_matrices: list[np.ndarray],
    *,
    intensity: str = "attenuation",
    i0: float | None = None,
    roi: Roi | None = None,
    reference: Volume | None = None,
    world: str = "LPS",
    matrix_form: str = "projection_matrix",
    inputs=(),
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a scan folder atomically; ``projection_matrices`` and ``roi`` are LPS.

    ``world`` chooses the frame written to the file; ``matrix_form`` is ``"projection_matrix"`` or
    ``"intrinsics"`` (K and [R|t] from an RQ decomposition); ``extra_files`` (name -> text) go in the
    same folder. Replacement follows :mod:`ixgs.output_folder`: only an earlier scan output of ours,
    never one of ``inputs`` (the paths the caller read) or a folder containing them.
    """
    path = Path(path)
    if world not in WORLDS:
        raise ScanError(f"world must be one of {WORLDS}, got {world!r}")
    if intensity not in INTENSITIES:
        raise ScanError(f"intensity must be one of {INTENSITIES}, got {intensity!r}")
    if len(images) != len(projection_matrices):
        raise ScanError(f"{len(images)} images but {len(projection_matrices)} projection matrices")
    to_file = LPS_RAS_FLIP if world == "RAS" else np.eye(4)  # the flip is its own inverse
    views = []
    with output_folder(path, KIND, inputs) as temporary:
        (temporary / "views").mkdir()
        for index, (image, matrix) in enumerate(zip(images, projection_matrices)):
            name = f"views/{index:03d}.nrrd"
            image = np.asarray(image, dtype=np.float32)
            if image.ndim != 2:
                raise ScanError(f"view {index}: image must be 2D, got shape {image.shape}")
            sitk.WriteImage(sitk.GetImageFromArray(image), str(temporary / name), True)
            matrix = np.asarray(matrix, dtype=np.float64) @ to_file
            views.append({"image": name, **_matrix_fields(matrix, matrix_form)})
        meta = {"format": FORMAT, "version": VERSION, "world": world, "intensity": intensity, "views": views}
        if i0 is not None:
            meta["i0"] = float(i0)
        if roi is not None:
            center = (to_file[:3, :3] @ np.asarray(roi.center, float)).tolist()
            meta["roi"] = {"center": center, "size": [float(s) for s in roi.size]}
        if reference is not None:
            reference.write(temporary / "reference.nrrd")
            meta["reference_volume"] = "reference.nrrd"
        (temporary / "scan.json").write_text(json_text(meta, indent=1))
        for name, text in (extra_files or {}).items():
            (temporary / name).write_text(text)
    return path


def _matrix_fields(matrix: np.ndarray, form: str) -> dict:
    if form == "projection_matrix":
        return {"projection_matrix": matrix.tolist()}
    if form == "intrinsics":
        intrinsics, world_to_camera = decompose_projection_matrix(matrix)
        return {"intrinsics": intrinsics.tolist(), "world_to_camera": world_to_camera.tolist()}
    raise ScanError(f"matrix_form must be 'projection_matrix' or 'intrinsics', got {form!r}")


def decompose_projection_matrix(projection_matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split P into K (upper triangular, K[2,2] = 1) and a 4x4 rigid [R | t] with det R = +1.

    The result reproduces P up to a positive scale, so projections, the source and the sign of
    ``w`` (camera z > 0 in front) are unchanged; a mirrored image shows as a negative ``K[0, 0]``.
    """
    P = np.asarray(projection_matrix, dtype=np.float64)
    # RQ decomposition of M through QR of the flipped transpose.
    flip = np.eye(3)[::-1]
    q, r = np.linalg.qr((flip @ P[:, :3]).T)
    intrinsics = flip @ r.T @ flip
    rotation = flip @ q.T
    signs = np.diag(np.sign(np.diag(intrinsics)))
    intrinsics, rotation = intrinsics @ signs, signs @ rotation
    scale = intrinsics[2, 2]
    translation = np.linalg.solve(intrinsics, P[:, 3])
    if np.linalg.det(rotation) < 0:  # a mirrored detector: keep R proper, let K carry the mirror
        mirror = np.diag([-1.0, 1.0, 1.0])
        intrinsics, rotation, translation = intrinsics @ mirror, mirror @ rotation, mirror @ translation
    world_to_camera = np.eye(4)
    world_to_camera[:3, :3] = rotation
    world_to_camera[:3, 3] = translation
    return intrinsics / scale, world_to_camera


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numeric_matrix(value, shape_options: tuple[tuple[int, int], ...], field: str, label: str) -> np.ndarray:
    try:
        matrix = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ScanError(f"{label}: '{field}' is not a numeric matrix") from None
    if matrix.shape not in shape_options:
        expected = " or ".join(f"{r}x{c}" for r, c in shape_options)
        raise ScanError(f"{label}: '{field}' must be {expected}, got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise ScanError(f"{label}: '{field}' has NaN or Inf entries")
    return matrix


def _view_matrix(entry: dict, label: str) -> np.ndarray:
    has_p = "projection_matrix" in entry
    has_k = "intrinsics" in entry or "world_to_camera" in entry
    if has_p and has_k:
        raise ScanError(f"{label}: give either 'projection_matrix' or 'intrinsics' + 'world_to_camera', not both")
    if has_p:
        matrix = _numeric_matrix(entry["projection_matrix"], ((3, 4),), "projection_matrix", label)
    elif "intrinsics" in entry and "world_to_camera" in entry:
        intrinsics = _numeric_matrix(entry["intrinsics"], ((3, 3),), "intrinsics", label)
        world_to_camera = _numeric_matrix(entry["world_to_camera"], ((4, 4), (3, 4)), "world_to_camera", label)
        matrix = compose_projection_matrix(_unit_scale(intrinsics), _unit_scale(world_to_camera[:3]))
    else:
        raise ScanError(f"{label}: needs 'projection_matrix' or both 'intrinsics' and 'world_to_camera'")
    matrix = _unit_scale(matrix)
    M = matrix[:, :3]
    # Relative test: scale-free, so matrices in pixels/mm of any magnitude are judged alike.
    norms = np.linalg.norm(M, axis=1)
    # A row 1e100 times smaller than the largest entry is no camera either (and overflows once normalised).
    if not (abs(np.linalg.det(M)) > 1e-12 * np.prod(norms) and norms.min() > 1e-100):
        raise ScanError(f"{label}: projection matrix is singular or degenerate (no finite X-ray source)")
    return matrix


def _unit_scale(matrix: np.ndarray) -> np.ndarray:
    """The matrix divided by its largest magnitude: the same projection (P is defined up to scale),
    with entries that no product overflows (a matrix of 1e300 is as valid as one of 1)."""
    scale = float(np.abs(matrix).max())
    return matrix / scale if scale > 0 else matrix


def _read_view_image(path: Path, label: str) -> np.ndarray:
    if not path.is_file():
        raise ScanError(f"{label}: image file not found")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError:
        raise ScanError(f"{label}: image cannot be read") from None
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    if image.GetNumberOfComponentsPerPixel() > 1:  # e.g. an RGB PNG export of a grey radiograph
        array = array.mean(axis=-1)
    array = np.squeeze(array)
    if array.ndim != 2:
        raise ScanError(f"{label}: image must be 2D, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ScanError(f"{label}: image has NaN or Inf pixels")
    return array


def _check_not_negative(image: np.ndarray, label: str, what: str) -> None:
    """Refuse an image with more negative pixels than noise explains (see :data:`NEGATIVE_TOLERANCE`)."""
    magnitude = float(np.abs(image).max())
    fraction = float(np.mean(image < -NEGATIVE_TOLERANCE * magnitude)) if magnitude > 0 else 0.0
    if fraction > NEGATIVE_FRACTION:
        raise ScanError(f"{label}: {100 * fraction:.1f} % of the pixels are clearly negative; {what} are >= 0 "
                        f"(more than {100 * NEGATIVE_FRACTION:g} % below -{NEGATIVE_TOLERANCE:g} x the largest value)")


def _check_line_integrals(image: np.ndarray, label: str) -> None:
    """A view must carry attenuation: not all zero (a blank frame), not negative beyond noise."""
    if not np.any(image):
        raise ScanError(f"{label}: image is all zero (no attenuation on any ray: a blank frame or a failed export)")
    _check_not_negative(image, label, "attenuation line integrals (intensity 'attenuation')")


def _check_reference_volume(path: Path, label: str) -> None:
    """Read the reference now (header and pixel data: a truncated file fails only on the data), so a
    bad one fails before any reconstruction, not after it."""
    if not path.is_file():
        raise ScanError(f"{label}: file not found")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise ScanError(f"{label}: cannot be read as an image") from None
    if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
        raise ScanError(f"{label}: must be a 3D scalar volume, got {reader.GetDimension()}D with "
                        f"{reader.GetNumberOfComponents()} component(s)")
    try:
        reader.Execute()
    except RuntimeError:
        raise ScanError(f"{label}: its pixel data cannot be read (truncated or corrupt file)") from None


def _read_roi(value, world: str, manifest: Path) -> Roi | None:
    if value is None:
        return None
    label = f"{manifest}: field 'roi'"
    if not isinstance(value, dict):
        raise ScanError(f"{label} must be an object with 'center' and 'size'")
    center = _numeric_matrix([value.get("center")], ((1, 3),), "center", label)[0]
    size = _numeric_matrix([value.get("size")], ((1, 3),), "size", label)[0]
    if world == "RAS":
        center = LPS_RAS_FLIP[:3, :3] @ center
    roi = Roi(tuple(center.tolist()), tuple(size.tolist()))
    check_roi(roi, label)
    return roi
