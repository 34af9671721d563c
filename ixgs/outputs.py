"""What a reconstruction leaves on disk: volume, bone label, coverage, report, previews.

One output folder, written atomically: ``volume.nrrd`` (float32, 1/mm, LPS), ``bone.nrrd``
(uint8 label, 1 = bone), ``coverage.nrrd`` (uint8: how many views see each voxel),
``report.json`` and ``previews/*.png``.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from skimage.draw import line as draw_line

from .geometry import Grid, normalize_projection_matrix, sees
from .metrics import evaluate, otsu_threshold
from .scan import Scan
from .volume import Volume, atomic_path, check_replaceable, write_image

OUTPUT_MARKER = "report.json"


def bone_label(volume: Volume, threshold: float | None = None) -> tuple[Volume, float]:
    """Voxels above ``threshold`` (1/mm; Otsu's above air unless given) as a uint8 label map."""
    threshold = otsu_threshold(volume.array) if threshold is None else float(threshold)
    label = (volume.array > threshold).astype(np.uint8)
    return Volume(label, volume.origin, volume.spacing, volume.direction), threshold


def minimum_views(n_views: int) -> int:
    """Fewest views that constrain a voxel well enough to trust: half the scan, at least 2."""
    return max(2, math.ceil(n_views / 2))


def coverage_map(scan: Scan, grid: Grid) -> Volume:
    """How many views see each voxel centre of ``grid`` (uint8).

    The grid is regular, so a view's homogeneous image coordinates are sums of per-axis terms
    (float32): no (voxels, 3) array is formed, which keeps 256^3 grids to seconds."""
    nz, ny, nx = grid.shape
    x, y, z = (np.float32(grid.origin[a]) + np.float32(grid.spacing[a]) * np.arange(n, dtype=np.float32)
               for a, n in enumerate((nx, ny, nz)))
    counts = np.zeros(grid.shape, dtype=np.int32)
    for view in scan.views:
        P = normalize_projection_matrix(view.projection_matrix, np.asarray(grid.roi.center)).astype(np.float32)
        u, v, w = (P[r, 3] + P[r, 0] * x[None, None, :] + P[r, 1] * y[None, :, None] + P[r, 2] * z[:, None, None]
                   for r in range(3))
        counts += sees(u, v, w, view.shape)
    return Volume.on_grid(np.minimum(counts, 255).astype(np.uint8), grid)


def coverage_summary(coverage: Volume, n_views: int) -> dict:
    """Fraction of voxels seen by every view, and by fewer than :func:`minimum_views` (flagged)."""
    counts = coverage.array
    needed = minimum_views(n_views)
    low = float(np.mean(counts < needed))
    summary = {"views": n_views, "minimum_views": needed, "fraction_seen_by_all": float(np.mean(counts >= n_views)),
               "fraction_under_constrained": low}
    if low > 0:
        summary["warning"] = (f"{100 * low:.1f} % of the ROI is seen by fewer than {needed} of {n_views} views: "
                              "values there are poorly constrained (see coverage.nrrd)")
    return summary


def write_outputs(out_dir: str | os.PathLike, scan: Scan, volume: Volume, report: dict,
                  bone_threshold: float | None = None, reprojections: dict[int, np.ndarray] | None = None,
                  loss_curve: list[tuple[int, float]] | None = None) -> dict:
    """Write the output folder atomically and return the completed report.

    ``report`` carries what the caller knows (settings, times); this adds the bone threshold,
    coverage summary and, when the scan has a reference volume, the 3D metrics.
    """
    out_dir = Path(out_dir)
    check_replaceable(out_dir, OUTPUT_MARKER, "an IXGS output folder")
    bone, threshold = bone_label(volume, bone_threshold)
    coverage = coverage_map(scan, volume.grid)
    report = dict(report)
    report["bone_threshold"] = threshold
    report["coverage"] = coverage_summary(coverage, len(scan.views))
    # Rows (iteration, loss[, elapsed s]).
    report["loss_curve"] = [[int(row[0]), *(float(value) for value in row[1:])] for row in (loss_curve or [])]
    if scan.reference_volume is not None:
        report["metrics"] = evaluate(volume, Volume.read(scan.reference_volume))
    with atomic_path(out_dir) as temporary:
        temporary.mkdir()
        volume.write(temporary / "volume.nrrd")
        bone.write(temporary / "bone.nrrd")
        coverage.write(temporary / "coverage.nrrd")
        _write_previews(temporary / "previews", volume, scan, reprojections, loss_curve or [])
        (temporary / "report.json").write_text(json.dumps(report, indent=1, default=_json_default))
    return report


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def to_uint8(image: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Window an image to 0..255 (default window: 0.5th to 99.5th percentile)."""
    image = np.asarray(image, np.float64)
    low = np.percentile(image, 0.5) if low is None else low
    high = np.percentile(image, 99.5) if high is None else high
    scaled = (image - low) / max(high - low, 1e-12)
    return (255 * np.clip(scaled, 0, 1)).astype(np.uint8)


def write_png(image: np.ndarray, path: Path) -> None:
    write_image(sitk.GetImageFromArray(np.ascontiguousarray(image)), path, compress=False)


def orthogonal_slices(volume: Volume) -> np.ndarray:
    """Axial, coronal and sagittal slices through the centre, side by side, one window (uint8).

    Rows are flipped where needed so that anterior is up in axial and superior is up in the others.
    """
    array = volume.array
    nz, ny, nx = array.shape
    axial = array[nz // 2]  # rows: y (posterior down in LPS index order, i.e. anterior up)
    coronal = array[:, ny // 2, :][::-1]  # rows: z, flipped so superior is up
    sagittal = array[:, :, nx // 2][::-1]
    low, high = np.percentile(array, 0.5), np.percentile(array, 99.9)
    height = max(axial.shape[0], coronal.shape[0], sagittal.shape[0])
    tiles = [np.pad(to_uint8(s, low, high), ((0, height - s.shape[0]), (0, 4))) for s in (axial, coronal, sagittal)]
    return np.concatenate(tiles, axis=1)


def loss_curve_image(loss_curve: list[tuple[int, float]], size: tuple[int, int] = (200, 400)) -> np.ndarray:
    """The loss (log scale) against iteration as a uint8 plot: white line on black."""
    rows, cols = size
    canvas = np.zeros(size, np.uint8)
    if len(loss_curve) < 2:
        return canvas
    iterations = np.array([row[0] for row in loss_curve], float)
    losses = np.log10(np.maximum([row[1] for row in loss_curve], 1e-12))
    x = (iterations - iterations.min()) / max(np.ptp(iterations), 1e-12) * (cols - 1)
    y = (rows - 1) - (losses - losses.min()) / max(np.ptp(losses), 1e-12) * (rows - 1)
    for x0, y0, x1, y1 in zip(x[:-1], y[:-1], x[1:], y[1:]):
        rr, cc = draw_line(int(round(y0)), int(round(x0)), int(round(y1)), int(round(x1)))
        canvas[rr, cc] = 255
    return canvas


def _write_previews(folder: Path, volume: Volume, scan: Scan, reprojections: dict[int, np.ndarray] | None,
                    loss_curve: list[tuple[int, float]]) -> None:
    folder.mkdir()
    write_png(orthogonal_slices(volume), folder / "slices.png")
    write_png(loss_curve_image(loss_curve), folder / "loss.png")
    for index, reprojected in (reprojections or {}).items():
        measured = scan.views[index].image
        low, high = np.percentile(measured, 0.5), np.percentile(measured, 99.5)
        pair = [to_uint8(measured, low, high), to_uint8(reprojected, low, high)]
        write_png(np.concatenate(pair, axis=1), folder / f"view_{index:03d}.png")
