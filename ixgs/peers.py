"""Exchange scans with peer codes: R2-Gaussian scenes, NAF / SAX-NeRF pickles, TIGRE geometry.

All three describe one circular cone-beam orbit in TIGRE's model (see ``docs/geometry.md``):
the source sits at ``DSO (cos a, sin a, 0)`` and turns about the z axis by the angle ``a``
(radians); the flat detector faces it at ``DSD``, its column index ``u`` runs along
``(-sin a, cos a, 0)`` and, in TIGRE's own projection arrays, its row index ``v`` runs along -z
(row 0 on top); R2-Gaussian and NAF store the rows flipped (row 0 at the bottom). ``offDetector``
shifts the detector within its plane (TIGRE order (v, u); R2-Gaussian's and NAF's configs (u, v)),
``offOrigin`` the volume. Orders: TIGRE ``nVoxel`` / ``sVoxel`` / ``offOrigin`` are (z, y, x);
R2-Gaussian's and NAF's are (x, y, z), and their volumes are arrays indexed [x, y, z].

TIGRE's x, y, z are taken as LPS axes, with TIGRE's origin at ``isocenter_mm`` (LPS). Projections
are line integrals, unit-free, so they are copied unchanged; lengths are converted to mm, and a
reference volume to attenuation per mm.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dicom import pixel_axes_matrix
from .geometry import Grid, closest_point_to_lines, compose_projection_matrix, normalize_projection_matrix
from .output_folder import output_folder
from .scan import Scan, decompose_projection_matrix, path_inside, read_scan, write_scan
from .volume import Volume, json_text, read_json_object

FORMATS = ("r2gaussian", "naf", "tigre")
METRE_MM = 1000.0
SCENE_KIND = "r2gaussian-scene"  # the output-folder kind of an exported scene (ixgs.output_folder)
# Relative tolerance for a scan's matrices to count as one circular orbit when exporting.
ORBIT_TOLERANCE = 1e-6
# Image flips tried when exporting (signed permutations of centred pixel axes): a C-arm's images are
# TIGRE's turned by 180 degrees, for instance.
IMAGE_FLIPS = {"none": np.eye(2, dtype=int), "rotate180": -np.eye(2, dtype=int),
               "flip_columns": np.diag([-1, 1]), "flip_rows": np.diag([1, -1])}
# Source-detector distance / source-isocentre distance written when a scan does not fix it
# (a projection matrix fixes only the ratio of that distance to the pixel size).
EXPORT_MAGNIFICATION = 1.5


@dataclass(frozen=True)
class ConeGeometry:
    """TIGRE's cone-beam parameters in mm: detector pairs are (v, u) = (rows, columns)."""

    dsd_mm: float
    dso_mm: float
    n_detector: tuple[int, int]
    d_detector_mm: tuple[float, float]
    off_detector_mm: tuple[float, float] = (0.0, 0.0)

    def validate(self, label: str) -> None:
        if not 0 < self.dso_mm < self.dsd_mm:
            raise ValueError(f"{label}: need 0 < DSO ({self.dso_mm}) < DSD ({self.dsd_mm})")
        if min(self.n_detector) < 1 or min(self.d_detector_mm) <= 0:
            raise ValueError(f"{label}: bad detector: nDetector {self.n_detector}, dDetector {self.d_detector_mm}")


def tigre_projection_matrix(angle_rad: float, geometry: ConeGeometry, rows_up: bool = False,
                            isocenter_mm=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Normalised LPS projection matrix of one TIGRE view; ``rows_up`` for R2-Gaussian / NAF arrays."""
    c, s = np.cos(angle_rad), np.sin(angle_rad)
    isocenter = np.asarray(isocenter_mm, float)
    source = isocenter + geometry.dso_mm * np.array([c, s, 0.0])
    rotation = np.array([[-s, c, 0.0], [0.0, 0.0, -1.0], [-c, -s, 0.0]])  # rows: u axis, v axis, beam
    rows, cols = geometry.n_detector
    dv, du = geometry.d_detector_mm
    off_v, off_u = geometry.off_detector_mm
    intrinsics = np.array([[geometry.dsd_mm / du, 0.0, (cols - 1) / 2 - off_u / du],
                           [0.0, geometry.dsd_mm / dv, (rows - 1) / 2 + off_v / dv],
                           [0.0, 0.0, 1.0]])
    if rows_up:
        intrinsics = np.array([[1.0, 0.0, 0.0], [0.0, -1.0, rows - 1.0], [0.0, 0.0, 1.0]]) @ intrinsics
    P = compose_projection_matrix(intrinsics, np.hstack([rotation, (-rotation @ source)[:, None]]))
    return normalize_projection_matrix(P, isocenter)


def import_peer(path: str | os.PathLike, out_scan: str | os.PathLike, peer_format: str, **options) -> Path:
    """What ``ixgs import-peer PATH -o SCAN --format r2gaussian|naf|tigre`` runs."""
    readers = {"r2gaussian": read_r2gaussian, "naf": read_naf, "tigre": read_tigre}
    if peer_format not in readers:
        raise ValueError(f"--format must be one of {FORMATS}, got {peer_format!r}")
    images, matrices, roi, reference = readers[peer_format](path, **options)
    return write_scan(out_scan, images, matrices, roi=roi, reference=reference, inputs=[path])


def read_r2gaussian(folder: str | os.PathLike, unit_mm: float | None = None, isocenter_mm=None):
    """Images, matrices, ROI and reference volume of an R2-Gaussian scene (``meta_data.json`` and
    ``.npy`` files; training projections). Lengths are in metres (``unit_mm`` 1000) unless the file,
    written by :func:`export_r2gaussian`, says otherwise."""
    folder = Path(folder)
    manifest = folder / "meta_data.json"
    meta = read_json_object(manifest)
    ours = meta.get("ixgs", {}) if isinstance(meta.get("ixgs"), dict) else {}
    unit = float(unit_mm or ours.get("unit_mm", METRE_MM))
    isocenter = np.asarray(isocenter_mm if isocenter_mm is not None else ours.get("isocenter_lps_mm", (0, 0, 0)), float)
    scanner = meta.get("scanner")
    if not isinstance(scanner, dict):
        raise ValueError(f"{manifest}: field 'scanner' must be an object")
    if scanner.get("mode", "cone") != "cone":
        raise ValueError(f"{manifest}: scanner 'mode' {scanner.get('mode')!r}: only 'cone' beams are supported")
    geometry = _cone_geometry(scanner, unit, manifest, offset_order="uv")
    entries = meta.get("proj_train")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{manifest}: field 'proj_train' must be a non-empty list")
    images, matrices = [], []
    for index, entry in enumerate(entries):
        label = f"{manifest}: proj_train[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("file_path"), str) or "angle" not in entry:
            raise ValueError(f"{label}: needs 'file_path' (a path) and 'angle'")
        path = path_inside(folder, entry["file_path"], f"{label}: field 'file_path'")
        images.append(_projection(_load_npy(path, label), geometry, label))
        matrices.append(tigre_projection_matrix(_finite(entry["angle"], f"{label}: field 'angle'"), geometry, True,
                                                isocenter))
    roi_grid = _volume_grid(scanner, unit, isocenter, manifest, order="xyz")
    reference = None
    if isinstance(meta.get("vol"), str) and (folder / meta["vol"]).is_file():
        path = path_inside(folder, meta["vol"], f"{manifest}: field 'vol'")
        reference = _reference(_load_npy(path, f"{manifest}: vol"), roi_grid, unit, f"{manifest}: vol")
    return images, matrices, roi_grid.roi, reference


def read_naf(path: str | os.PathLike, isocenter_mm=(0.0, 0.0, 0.0)):
    """Images, matrices, ROI and reference of a NAF / SAX-NeRF pickle (geometry in mm, training split).

    Only numpy arrays and plain Python values are unpickled, so a pickle cannot run code.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    try:
        with open(path, "rb") as handle:
            data = _SafeUnpickler(handle).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError) as error:
        raise ValueError(f"{path}: not a NAF pickle ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a NAF pickle holds a dict")
    if data.get("mode", "cone") != "cone":
        raise ValueError(f"{path}: 'mode' {data.get('mode')!r}: only 'cone' beams are supported")
    geometry = _cone_geometry(data, 1.0, path, offset_order="uv")
    train = data.get("train")
    if not isinstance(train, dict) or "projections" not in train or "angles" not in train:
        raise ValueError(f"{path}: 'train' must hold 'projections' and 'angles'")
    projections, angles = np.asarray(train["projections"]), np.asarray(train["angles"], float).ravel()
    if projections.ndim != 3 or len(projections) != len(angles):
        raise ValueError(f"{path}: train projections {projections.shape} do not match {len(angles)} angles")
    if not np.all(np.isfinite(angles)):
        raise ValueError(f"{path}: train 'angles' must be finite numbers")
    isocenter = np.asarray(isocenter_mm, float)
    images = [_projection(p, geometry, f"{path}: train projection {i}") for i, p in enumerate(projections)]
    matrices = [tigre_projection_matrix(a, geometry, True, isocenter) for a in angles]
    scanner = dict(data)
    if "sVoxel" not in scanner and "dVoxel" in scanner:
        scanner["sVoxel"] = (np.asarray(data["nVoxel"], float) * np.asarray(data["dVoxel"], float)).tolist()
    roi_grid = _volume_grid(scanner, 1.0, isocenter, path, order="xyz")
    reference = None
    if isinstance(data.get("image"), np.ndarray):
        # NAF projections integrate over metres (R2-Gaussian's reader): the volume is per metre.
        reference = _reference(data["image"], roi_grid, METRE_MM, f"{path}: image")
    return images, matrices, roi_grid.roi, reference


def read_tigre(folder: str | os.PathLike, isocenter_mm=(0.0, 0.0, 0.0)):
    """A folder with ``geometry.json`` (TIGRE field names and orders, mm), ``angles.npy`` (radians,
    (n,) or (n, 3) Euler ZYZ with the last two zero) and ``projections.npy`` ((n, v, u) as ``tigre.Ax``
    returns them); ``DSD``, ``DSO`` and ``offDetector`` may be given per angle."""
    folder = Path(folder)
    manifest = folder / "geometry.json"
    geo = read_json_object(manifest)
    if geo.get("mode", "cone") != "cone":
        raise ValueError(f"{manifest}: 'mode' {geo.get('mode')!r}: only 'cone' beams are supported")
    for name in ("rotDetector", "COR"):
        if name in geo and np.any(np.asarray(geo[name], float) != 0):
            raise ValueError(f"{manifest}: '{name}' must be zero (detector rotations / centre of rotation "
                             "offsets are not supported)")
    label = f"{folder}: angles.npy"
    angles = _load_npy(path_inside(folder, "angles.npy", label), label).astype(float)
    if angles.ndim == 2:
        if angles.shape[1] != 3 or np.any(angles[:, 1:] != 0):
            raise ValueError(f"{folder}: angles.npy: only rotations about z (Euler ZYZ (a, 0, 0)) are supported")
        angles = angles[:, 0]
    if not np.all(np.isfinite(angles)):
        raise ValueError(f"{folder}: angles.npy must hold finite numbers")
    projections = _load_npy(path_inside(folder, "projections.npy", f"{folder}: projections.npy"),
                            f"{folder}: projections.npy")
    if projections.ndim != 3 or len(projections) != len(angles):
        raise ValueError(f"{folder}: projections.npy {projections.shape} does not match {len(angles)} angles")
    n = len(angles)
    for name in ("DSD", "DSO"):
        if name not in geo:
            raise ValueError(f"{manifest}: missing '{name}'")
    dsd, dso = (np.broadcast_to(np.asarray(geo[k], float), (n,)) for k in ("DSD", "DSO"))
    offsets = np.broadcast_to(np.asarray(geo.get("offDetector", (0.0, 0.0)), float), (n, 2))
    isocenter = np.asarray(isocenter_mm, float)
    images, matrices = [], []
    for index in range(n):
        label = f"{manifest}: angle {index}"
        view_geo = dict(geo, DSD=float(dsd[index]), DSO=float(dso[index]), offDetector=offsets[index].tolist())
        geometry = _cone_geometry(view_geo, 1.0, label, offset_order="vu")
        images.append(_projection(projections[index], geometry, label))
        matrices.append(tigre_projection_matrix(float(angles[index]), geometry, False, isocenter))
    roi_grid = _volume_grid(geo, 1.0, isocenter, manifest, order="zyx")
    return images, matrices, roi_grid.roi, None


def export_r2gaussian(scan_path: str | os.PathLike, out_dir: str | os.PathLike, unit_mm: float = METRE_MM) -> Path:
    """Write a scan as an R2-Gaussian scene (what ``ixgs export-r2gaussian SCAN -o DIR`` runs).

    R2-Gaussian holds one circular orbit about z with one detector, so the scan's matrices must
    all be views of such an orbit (any such scan imported from a peer format is); otherwise the
    first view that is not is named. Lengths are written in units of ``unit_mm`` (metres by
    default); the reference volume, if any, becomes ``vol_gt.npy`` (zeros otherwise, since
    R2-Gaussian's reader needs one). Test projections repeat the training ones.
    """
    scan = read_scan(scan_path)
    geometry, angles, isocenter, flip = fit_circular_orbit(scan)
    out_dir = Path(out_dir)
    reference = Volume.read(scan.reference_volume) if scan.reference_volume else None
    if reference is not None and not np.allclose(np.asarray(reference.direction, float), np.eye(3), atol=1e-6):
        raise ValueError(f"{scan.reference_volume}: the reference volume must be axis-aligned for R2-Gaussian")
    grid = reference.grid if reference is not None else scan.roi.grid(max(scan.roi.size) / 64)
    volume = reference.array if reference is not None else np.zeros(grid.shape, np.float32)
    size = np.asarray(grid.spacing) * np.asarray(grid.shape[::-1])
    rows, cols = geometry.n_detector
    scanner = {
        "mode": "cone", "filter": None,
        "DSD": geometry.dsd_mm / unit_mm, "DSO": geometry.dso_mm / unit_mm,
        "nDetector": [rows, cols],
        "sDetector": [rows * geometry.d_detector_mm[0] / unit_mm, cols * geometry.d_detector_mm[1] / unit_mm],
        "nVoxel": list(grid.shape[::-1]), "sVoxel": (size / unit_mm).tolist(),
        "offOrigin": ((np.asarray(grid.roi.center) - isocenter) / unit_mm).tolist(),
        "offDetector": [geometry.off_detector_mm[1] / unit_mm, geometry.off_detector_mm[0] / unit_mm],
        "accuracy": 0.5, "totalAngle": float(np.degrees(np.ptp(angles))), "startAngle": float(np.degrees(angles[0])),
        "noise": False,
    }
    with output_folder(out_dir, SCENE_KIND, [scan_path]) as temporary:
        (temporary / "proj_train").mkdir()
        entries = []
        for index, (view, angle) in enumerate(zip(scan.views, angles)):
            name = f"proj_train/proj_train_{index:04d}.npy"
            np.save(temporary / name, _flipped(view.image, flip).astype(np.float32))
            entries.append({"file_path": name, "angle": float(angle)})
        # Attenuation per mm -> per unit of length; R2-Gaussian's volumes are indexed [x, y, z].
        np.save(temporary / "vol_gt.npy", (np.asarray(volume, np.float32) * unit_mm).transpose(2, 1, 0))
        meta = {"scanner": scanner, "vol": "vol_gt.npy", "bbox": [[-1, -1, -1], [1, 1, 1]],
                "proj_train": entries, "proj_test": entries,
                "ixgs": {"unit_mm": unit_mm, "isocenter_lps_mm": isocenter.tolist(), "image_flip": flip,
                         "scan": str(scan.path)}}
        (temporary / "meta_data.json").write_text(json_text(meta, indent=1))
    return out_dir


def fit_circular_orbit(scan: Scan) -> tuple[ConeGeometry, np.ndarray, np.ndarray, str]:
    """TIGRE geometry (R2-Gaussian row order), angles (rad), isocentre (LPS mm) and image flip (a key
    of :data:`IMAGE_FLIPS`) reproducing every view's matrix to :data:`ORBIT_TOLERANCE`, or ValueError
    naming the first view that does not fit."""
    shapes = {view.shape for view in scan.views}
    if len(shapes) != 1:
        raise ValueError(f"views have different shapes {sorted(shapes)}; R2-Gaussian needs one detector")
    rows, cols = scan.views[0].shape
    sources = np.array([view.source for view in scan.views])
    axes = np.array([view.projection_matrix[2, :3] / np.linalg.norm(view.projection_matrix[2, :3])
                     for view in scan.views])
    isocenter = closest_point_to_lines(sources, axes)
    dso = float(np.mean(np.linalg.norm(sources - isocenter, axis=1)))
    angles = np.arctan2(sources[:, 1] - isocenter[1], sources[:, 0] - isocenter[0])
    angles = angles[0] + np.unwrap(angles - angles[0])
    worst = (np.inf, 0, "none")
    for flip, image_axes in IMAGE_FLIPS.items():
        pixels = pixel_axes_matrix(image_axes, (rows, cols))
        matrices = [normalize_projection_matrix(pixels @ view.projection_matrix, isocenter) for view in scan.views]
        intrinsics = decompose_projection_matrix(matrices[0])[0]
        dsd = EXPORT_MAGNIFICATION * dso
        du, dv = dsd / abs(intrinsics[0, 0]), dsd / abs(intrinsics[1, 1])
        # Rows are stored flipped (R2-Gaussian): the principal row is (rows - 1)/2 - offV/dv.
        geometry = ConeGeometry(dsd, dso, (rows, cols), (dv, du),
                                (((rows - 1) / 2 - intrinsics[1, 2]) * dv, ((cols - 1) / 2 - intrinsics[0, 2]) * du))
        errors = [_relative_difference(tigre_projection_matrix(angle, geometry, True, isocenter), matrix)
                  for angle, matrix in zip(angles, matrices)]
        if max(errors) <= ORBIT_TOLERANCE:
            return geometry, angles, isocenter, flip
        first_bad = int(np.argmax(np.asarray(errors) > ORBIT_TOLERANCE))
        worst = min(worst, (errors[first_bad], first_bad, flip))
    error, index, _ = worst
    raise ValueError(f"view {index} ({scan.views[index].name}): not a view of one circular orbit about the z axis "
                     f"with one detector (relative difference {error:.2g}); R2-Gaussian's format cannot hold it")


def _flipped(image: np.ndarray, flip: str) -> np.ndarray:
    """The image with its pixel axes turned as :data:`IMAGE_FLIPS` says (centred signed permutation)."""
    column_sign, row_sign = np.diag(IMAGE_FLIPS[flip])
    return np.ascontiguousarray(image[::row_sign, ::column_sign])


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain values only."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
               ("numpy._core.numeric", "_frombuffer"), ("collections", "OrderedDict")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_npy(path: Path, label: str) -> np.ndarray:
    if not path.is_file():
        raise ValueError(f"{label}: file {path} not found")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as error:
        raise ValueError(f"{label}: {path} is not a .npy array ({error})") from None


def _finite(value, label: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{label}: must be a number, got {value!r}") from None
    if not np.isfinite(number):
        raise ValueError(f"{label}: must be a finite number, got {value!r}")
    return number


def _pair(values, name: str, label, scale: float) -> tuple[float, float]:
    try:
        array = np.asarray(values, float).ravel()
    except (TypeError, ValueError):
        raise ValueError(f"{label}: '{name}' must be numbers") from None
    if array.size != 2 or not np.all(np.isfinite(array)):
        raise ValueError(f"{label}: '{name}' must be 2 finite numbers, got {values!r}")
    return float(array[0] * scale), float(array[1] * scale)


def _cone_geometry(fields: dict, unit_mm: float, label, offset_order: str) -> ConeGeometry:
    """ConeGeometry (mm) from TIGRE-like fields in ``unit_mm``; offDetector in (u, v) or (v, u) order."""
    for name in ("DSD", "DSO", "nDetector"):
        if name not in fields:
            raise ValueError(f"{label}: missing '{name}'")
    n_detector = tuple(int(n) for n in _pair(fields["nDetector"], "nDetector", label, 1.0))
    if "dDetector" in fields:
        d_detector = _pair(fields["dDetector"], "dDetector", label, unit_mm)
    elif "sDetector" in fields:
        size = _pair(fields["sDetector"], "sDetector", label, unit_mm)
        d_detector = (size[0] / n_detector[0], size[1] / n_detector[1])
    else:
        raise ValueError(f"{label}: missing 'dDetector' or 'sDetector'")
    offset = _pair(fields.get("offDetector", (0.0, 0.0)), "offDetector", label, unit_mm)
    geometry = ConeGeometry(_finite(fields["DSD"], f"{label}: 'DSD'") * unit_mm,
                            _finite(fields["DSO"], f"{label}: 'DSO'") * unit_mm, n_detector, d_detector,
                            offset[::-1] if offset_order == "uv" else offset)
    geometry.validate(str(label))
    return geometry


def _volume_grid(fields: dict, unit_mm: float, isocenter: np.ndarray, label, order: str) -> Grid:
    """The voxel grid (LPS) of ``nVoxel``, ``sVoxel`` and ``offOrigin`` given in (x, y, z) or (z, y, x)."""
    flip = slice(None, None, -1) if order == "zyx" else slice(None)
    try:
        n_voxel = np.asarray(fields["nVoxel"], int).ravel()[flip]
        size = np.asarray(fields["sVoxel"], float).ravel()[flip] * unit_mm
        offset = np.asarray(fields.get("offOrigin", (0.0, 0.0, 0.0)), float).ravel()[flip] * unit_mm
    except KeyError as error:
        raise ValueError(f"{label}: missing {error}") from None
    if n_voxel.size != 3 or size.size != 3 or offset.size != 3 or np.any(n_voxel < 1) or np.any(size <= 0):
        raise ValueError(f"{label}: 'nVoxel', 'sVoxel' and 'offOrigin' must be 3 positive numbers each")
    spacing = size / n_voxel
    origin = isocenter + offset - size / 2 + spacing / 2
    return Grid(tuple(int(n) for n in n_voxel[::-1]), tuple(origin), tuple(spacing))


def _projection(array: np.ndarray, geometry: ConeGeometry, label: str) -> np.ndarray:
    image = np.asarray(array, np.float32)
    if image.shape != tuple(geometry.n_detector):
        raise ValueError(f"{label}: projection shape {image.shape} does not match nDetector {geometry.n_detector}")
    if not np.all(np.isfinite(image)):
        raise ValueError(f"{label}: projection has NaN or Inf values")
    return image


def _reference(volume_xyz: np.ndarray, grid: Grid, unit_mm: float, label: str) -> Volume:
    """A peer's [x, y, z] volume in attenuation per length unit, as a Volume in 1/mm."""
    array = np.asarray(volume_xyz, np.float32)
    if array.shape[::-1] != tuple(grid.shape):
        raise ValueError(f"{label}: volume shape {array.shape} does not match nVoxel {grid.shape[::-1]}")
    return Volume.on_grid(np.ascontiguousarray(array.transpose(2, 1, 0)) / unit_mm, grid)


def _relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.abs(a / np.linalg.norm(a) - b / np.linalg.norm(b)).max())
