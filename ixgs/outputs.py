"""What a reconstruction leaves on disk: volume, bone label, coverage, report, previews.

One output folder, written atomically by :mod:`ixgs.output_folder`: ``volume.nrrd`` (float32, 1/mm, LPS), ``bone.nrrd``
(uint8 label, 1 = bone), ``coverage.nrrd`` (uint8: how many views see each voxel),
``report.json``, and (unless turned off) the figures ``previews/*.png`` and ``report.html``.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

import numpy as np

from .geometry import Grid, normalize_projection_matrix, sees
from .metrics import evaluate, otsu_threshold
from .report_html import write_report_html
from .output_folder import output_folder
from .scan import Scan
from .volume import Volume, json_text

KIND = "reconstruction"  # the output-folder kind (ixgs.output_folder)
PREVIEWS = "previews"
# What every reconstruction output holds besides its figures (previews/, report.html).
OUTPUT_FILES = ("volume.nrrd", "bone.nrrd", "coverage.nrrd", "report.json")

# What writing the outputs costs, in units of a small single-threaded compute probe (the outputs are
# single-threaded numpy, SimpleITK and matplotlib work, so both slow down alike under load or on a
# slower CPU). Measured on 2 cores at 128^3, the first write in a fresh process, probe 3.3-4.8 ms:
# files 0.3-0.6 s, 3D metrics against a reference 1.6 s more, the figures and report.html 2.3-2.9 s.
PROBES_PER_MVOXEL_FILES = 60.0
PROBES_METRICS = 450.0
PROBES_PREVIEWS = 800.0


def bone_label(volume: Volume, threshold: float | None = None) -> tuple[Volume, float]:
    """Voxels above ``threshold`` (1/mm; Otsu's above air unless given) as a uint8 label map."""
    threshold = otsu_threshold(volume.array) if threshold is None else float(threshold)
    label = (volume.array > threshold).astype(np.uint8)
    return Volume(label, volume.origin, volume.spacing, volume.direction), threshold


def minimum_views(n_views: int) -> int:
    """Fewest views that constrain a voxel well enough to trust: half the scan, at least 2."""
    return max(2, math.ceil(n_views / 2))


def write_probe_s() -> float:
    """Seconds of the cost probe: a box filter over a 64^3 block, the fastest of three (so a page
    fault or a one-off preemption does not count)."""
    from scipy.ndimage import uniform_filter

    block = np.random.default_rng(0).random((64, 64, 64), dtype=np.float32)
    times = []
    for _ in range(3):
        started = time.perf_counter()
        uniform_filter(block, 7)
        times.append(time.perf_counter() - started)
    return min(times)


def estimated_write_s(grid: Grid, reference: bool, previews: bool) -> float:
    """Seconds that :func:`write_outputs` will take for a volume on ``grid`` on this machine under its
    current load, with the metrics when the scan has a ``reference`` and the figures with
    ``previews``: the run keeps this much of its time budget back so that the command, outputs
    included, ends within it."""
    probes = PROBES_PER_MVOXEL_FILES * math.prod(grid.shape) / 1e6
    probes += PROBES_METRICS * reference + PROBES_PREVIEWS * previews
    return probes * write_probe_s()


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
                  loss_curve: list[tuple[int, float]] | None = None, previews: bool = True) -> dict:
    """Write the output folder atomically and return the completed report.

    ``report`` carries what the caller knows (settings, times); this adds the bone threshold,
    coverage summary and, when the scan has a reference volume, the 3D metrics. With ``previews``
    it also draws the figures (``previews/``, :data:`FIGURES`) and ``report.html``, and records
    their cost in seconds as ``previews_s``.
    """
    out_dir = Path(out_dir)
    bone, threshold = bone_label(volume, bone_threshold)
    coverage = coverage_map(scan, volume.grid)
    report = dict(report)
    report["bone_threshold"] = threshold
    report["coverage"] = coverage_summary(coverage, len(scan.views))
    # Rows (iteration, loss[, elapsed s]).
    report["loss_curve"] = [[int(row[0]), *(float(value) for value in row[1:])] for row in (loss_curve or [])]
    reference = Volume.read(scan.reference_volume) if scan.reference_volume is not None else None
    if reference is not None:
        report["metrics"] = evaluate(volume, reference)
    with output_folder(out_dir, KIND, [scan.path]) as temporary:
        volume.write(temporary / "volume.nrrd")
        bone.write(temporary / "bone.nrrd")
        coverage.write(temporary / "coverage.nrrd")
        if previews:
            started = time.perf_counter()
            notes = write_previews(temporary, volume, coverage, report, scan, reference, reprojections)
            report["previews_s"] = time.perf_counter() - started
        (temporary / "report.json").write_text(json_text(report, indent=1))
        if previews:
            write_report_html(temporary, report, notes, scan, location=out_dir)
    return report


# Figures in previews/, in the order report.html shows them, with their captions.
FIGURES = {
    "slices_center.png": "Axial, coronal and sagittal slices through the ROI centre",
    "slices_bone.png": "Axial, coronal and sagittal slices through the densest bone",
    "bone_3d.png": "3D bone surface and the X-ray sources",
    "views.png": "Measured vs re-projected views, residuals and per-view PSNR",
    "loss.png": "Training loss against iterations and wall time, with the stages",
    "coverage.png": "Coverage: how many views see each voxel; under-constrained regions outlined",
}


def write_previews(out_dir: Path, volume: Volume, coverage: Volume, report: dict, scan: Scan | None = None,
                   reference: Volume | None = None, reprojections: dict[int, np.ndarray] | None = None) -> dict:
    """Draw the figures of :data:`FIGURES` into ``out_dir/previews`` (each PNG written atomically);
    return, for each figure not drawn, why (report.html shows it). ``report`` gives the bone
    threshold, coverage summary, loss curve, stages and stop reason; ``scan`` the X-ray sources and
    measured views; ``reference`` (1/mm) the slices to compare with."""
    try:
        from . import figures, render3d
    except ImportError as error:  # e.g. Slicer's Python before matplotlib is installed: keep the result
        return {name: f"matplotlib is not installed ({error})" for name in FIGURES}

    folder = Path(out_dir) / PREVIEWS
    folder.mkdir(exist_ok=True)
    notes = {}
    threshold = float(report["bone_threshold"])
    sources = np.array([view.source for view in scan.views]) if scan is not None else None
    with contextlib.ExitStack() as stack:
        render = None  # the 3D view renders in a child process while the other figures are drawn
        if volume.array.max() <= threshold:
            notes["bone_3d.png"] = f"no voxel above the bone threshold {threshold:.4g} 1/mm"
        else:
            try:
                render = stack.enter_context(render3d.BoneRender(volume, threshold, sources))
            except render3d.RenderUnavailable as error:
                notes["bone_3d.png"] = str(error)
        center = figures.roi_center(volume)
        figures.save_figure(figures.slices_figure(volume, center, "Through the ROI centre", reference),
                            folder / "slices_center.png")
        figures.save_figure(figures.slices_figure(volume, figures.densest_point(volume), "Through the densest bone",
                                                  reference), folder / "slices_bone.png")
        if reprojections and scan is not None:
            figures.save_figure(figures.views_figure(scan, reprojections), folder / "views.png")
        elif not (folder / "views.png").is_file():
            notes["views.png"] = "re-projections come from the reconstruction run and are not stored"
        loss = figures.loss_figure(report)
        if loss is not None:
            figures.save_figure(loss, folder / "loss.png")
        else:
            notes["loss.png"] = "fewer than 2 loss values in report.json (SART records none)"
        summary = report["coverage"]
        needed = summary.get("minimum_views", minimum_views(summary["views"]))
        figures.save_figure(figures.coverage_figure(volume, coverage, needed, center), folder / "coverage.png")
        if render is not None:
            try:
                figures.save_figure(figures.bone_3d_figure(render.images(), threshold), folder / "bone_3d.png")
            except render3d.RenderUnavailable as error:
                notes["bone_3d.png"] = str(error)
    return notes
