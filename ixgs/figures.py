"""Figures a person can read: titled, with axes in mm, colour bars in 1/mm and anatomical labels.

Drawn with matplotlib's object API (``Figure`` + the Agg canvas, never ``pyplot``), so no display
is needed and no global backend is changed in the process that calls us (e.g. Slicer).

Display conventions (LPS engine; arrays ``[k, j, i]`` = (z, y, x), x towards the patient's left,
y towards posterior, z towards superior):

* axial: seen from the feet (radiological): patient's right on the image left, anterior up;
* coronal: seen from the front: patient's right on the image left, superior up;
* sagittal: seen from the patient's left: anterior on the image left, superior up.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import patheffects
from matplotlib.figure import Figure
from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar
from scipy.ndimage import uniform_filter

from .metrics import reprojection_psnr, resample_to
from .volume import Volume, atomic_path

DPI = 100
SCALE_BAR_MM = 10.0
ATTENUATION_LABEL = "attenuation μ (1/mm)"
DIFFERENCE_LABEL = "reconstruction − reference (1/mm)"
# Each step sees other views, so the per-step loss is noisy: a moving mean of up to this many steps.
MOVING_AVERAGE_STEPS = 20


@dataclass(frozen=True)
class Plane:
    """One anatomical plane: the array axis held fixed and how the other two are shown."""

    name: str
    fixed_axis: int  # array axis (0 = z, 1 = y, 2 = x) the slice is taken across
    horizontal: int  # world axis (0 = x, 1 = y, 2 = z) along the image columns, increasing rightwards
    vertical: int  # world axis along the image rows
    vertical_up: bool  # True: the vertical world axis increases upwards (superior up)
    letters: tuple[str, str, str, str]  # left, right, top, bottom


PLANES = (
    Plane("axial", 0, 0, 1, False, ("R", "L", "A", "P")),
    Plane("coronal", 1, 0, 2, True, ("R", "L", "S", "I")),
    Plane("sagittal", 2, 1, 2, True, ("A", "P", "S", "I")),
)
WORLD_AXIS_NAMES = ("x", "y", "z")


def _check_axis_aligned(volume: Volume) -> None:
    if not np.allclose(np.asarray(volume.direction, float), np.eye(3)):
        raise ValueError("figures need an axis-aligned volume (identity direction), as the engine writes")


def slice_indices(volume: Volume, point_mm) -> tuple[int, int, int]:
    """Array indices (k, j, i) of the voxel nearest ``point_mm`` (LPS), clipped to the grid."""
    ijk = np.round((np.asarray(point_mm, float) - np.asarray(volume.origin)) / np.asarray(volume.spacing))
    return tuple(int(np.clip(ijk[a], 0, volume.array.shape[2 - a] - 1)) for a in (2, 1, 0))


def roi_center(volume: Volume) -> np.ndarray:
    """LPS centre (mm) of the volume's box."""
    return np.asarray(volume.grid.roi.center, float)


def densest_point(volume: Volume) -> np.ndarray:
    """LPS position (mm) of the densest bone: the maximum of the 3-voxel box mean (one hot voxel of
    noise does not win)."""
    smoothed = uniform_filter(np.asarray(volume.array, np.float32), size=3, mode="nearest")
    k, j, i = np.unravel_index(int(np.argmax(smoothed)), smoothed.shape)
    return np.asarray(volume.origin) + np.asarray(volume.spacing) * np.array([i, j, k])


def plane_image(array: np.ndarray, plane: Plane, index: int) -> np.ndarray:
    """The 2D slice of a (z, y, x) array, rows along ``plane.vertical``, columns along ``plane.horizontal``."""
    return np.take(array, index, axis=plane.fixed_axis)  # axial (y, x), coronal (z, x), sagittal (z, y)


def _extent(volume: Volume, plane: Plane) -> tuple[float, float, float, float]:
    """imshow extent (left, right, bottom, top) in mm for the plane's slice."""
    shape_xyz = volume.array.shape[::-1]

    def edges(axis):
        lower = volume.origin[axis] - 0.5 * volume.spacing[axis]
        return lower, lower + volume.spacing[axis] * shape_xyz[axis]

    left, right = edges(plane.horizontal)
    low, high = edges(plane.vertical)
    # origin="upper" puts row 0 at the top: then the top edge is the low end of the vertical axis.
    return (left, right, low, high) if plane.vertical_up else (left, right, high, low)


def _show(ax, volume: Volume, array: np.ndarray, plane: Plane, index: int, overlay: bool = False, **imshow):
    """One slice in mm with its anatomical letters (an ``overlay`` goes on a slice already shown)."""
    image = plane_image(array, plane, index)
    shown = ax.imshow(image, origin="lower" if plane.vertical_up else "upper", extent=_extent(volume, plane),
                      interpolation="nearest", **imshow)
    if not overlay:
        ax.set_xlabel(f"{WORLD_AXIS_NAMES[plane.horizontal]} (mm)")
        ax.set_ylabel(f"{WORLD_AXIS_NAMES[plane.vertical]} (mm)")
        _orientation_letters(ax, plane.letters)
    return shown


def _orientation_letters(ax, letters) -> None:
    """Anatomical direction letters at the middle of each edge, inside the image."""
    style = dict(transform=ax.transAxes, color="yellow", fontsize=11, fontweight="bold",
                 path_effects=[patheffects.withStroke(linewidth=2.5, foreground="black")])
    left, right, top, bottom = letters
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)


def _scale_bar(ax) -> None:
    """A 10 mm bar, white on a dark box so it reads on any image."""
    bar = AnchoredSizeBar(ax.transData, SCALE_BAR_MM, f"{SCALE_BAR_MM:g} mm", "lower left", color="white",
                          frameon=True, size_vertical=0.8, pad=0.3, borderpad=0.6, sep=2, fontproperties={"size": 8})
    bar.patch.set(facecolor="black", alpha=0.55, edgecolor="none")
    ax.add_artist(bar)


def _panels(figure: Figure, rows: int, columns: int, wspace: float = 0.3, right_in: float = 1.1,
            left_in: float = 0.75) -> np.ndarray:
    """A fixed grid of axes (rows, columns), ``right_in`` inches kept for colour bars and ``left_in``
    for the y labels; a layout engine would more than double the drawing time (most of the figures' cost)."""
    width, height = figure.get_size_inches()
    top_in, bottom_in, gap_in = 0.75, 0.5, 0.95  # the gap holds a row's x labels and the next row's titles
    row_in = (height - top_in - bottom_in - (rows - 1) * gap_in) / rows
    grid = figure.add_gridspec(rows, columns, left=left_in / width, right=1 - right_in / width, bottom=bottom_in / height,
                               top=1 - top_in / height, wspace=wspace, hspace=gap_in / row_in)
    return np.array([[figure.add_subplot(grid[r, c]) for c in range(columns)] for r in range(rows)])


def _colorbar(figure: Figure, shown, ax, label: str) -> None:
    """A colour bar as tall as ``ax``'s image, just right of it."""
    figure.colorbar(shown, cax=ax.inset_axes([1.04, 0.0, 0.05, 1.0]), label=label)


def _plane_title(volume: Volume, plane: Plane, index: int) -> str:
    axis = 2 - plane.fixed_axis  # world axis held fixed
    position = volume.origin[axis] + volume.spacing[axis] * index
    return f"{plane.name}, {WORLD_AXIS_NAMES[axis]} = {position:.1f} mm"


def slices_figure(volume: Volume, point_mm, title: str, reference: Volume | None = None) -> Figure:
    """Axial, coronal and sagittal slices through ``point_mm`` (LPS); with a reference volume, its
    slices (resampled onto the reconstruction's grid) and the difference below them."""
    _check_axis_aligned(volume)
    indices = slice_indices(volume, point_mm)
    rows = [("reconstruction", np.asarray(volume.array, np.float32))]
    if reference is not None:
        on_grid = resample_to(reference, volume)
        rows += [("reference", on_grid), ("difference", rows[0][1] - on_grid)]
    high = max(float(np.percentile(values, 99.9)) for name, values in rows if name != "difference")
    high = high if high > 0 else 1.0
    figure = Figure(figsize=(13, 3.9 * len(rows)), dpi=DPI)
    point = ", ".join(f"{c:.1f}" for c in np.asarray(point_mm, float))
    figure.suptitle(f"{title}: (x, y, z) = ({point}) mm, LPS", fontsize=13)
    axes = _panels(figure, len(rows), 3)
    for row, (name, values) in enumerate(rows):
        if name == "difference":
            limit = float(np.percentile(np.abs(values), 99.5)) or 1e-6
            style, label = dict(cmap="RdBu_r", vmin=-limit, vmax=limit), DIFFERENCE_LABEL
        else:
            style, label = dict(cmap="gray", vmin=0.0, vmax=high), ATTENUATION_LABEL
        for column, plane in enumerate(PLANES):
            ax = axes[row, column]
            shown = _show(ax, volume, values, plane, indices[plane.fixed_axis], **style)
            ax.set_title(f"{name}: {_plane_title(volume, plane, indices[plane.fixed_axis])}", fontsize=10)
            _scale_bar(ax)
        _colorbar(figure, shown, axes[row, -1], label)
    return figure


def coverage_figure(volume: Volume, coverage: Volume, minimum_views: int, point_mm) -> Figure:
    """How many views see each voxel, over the attenuation, with the under-constrained region
    (fewer than ``minimum_views`` views) hatched and outlined in red."""
    _check_axis_aligned(volume)
    indices = slice_indices(volume, point_mm)
    values = np.asarray(volume.array, np.float32)
    counts = np.asarray(coverage.array, np.float32)
    high = float(np.percentile(values, 99.9)) or 1.0
    low_fraction = float(np.mean(counts < minimum_views))
    figure = Figure(figsize=(13, 4.3), dpi=DPI)
    figure.suptitle(f"Coverage: views that see each voxel; red outline: fewer than {minimum_views} views "
                    f"({100 * low_fraction:.1f} % of the ROI, under-constrained)", fontsize=12)
    axes = _panels(figure, 1, 3)[0]
    top = max(float(counts.max()), 1.0)
    for ax, plane in zip(axes, PLANES):
        index = indices[plane.fixed_axis]
        _show(ax, volume, values, plane, index, cmap="gray", vmin=0.0, vmax=high)
        shown = _show(ax, volume, counts, plane, index, overlay=True, cmap="viridis", vmin=0.0, vmax=top,
                      alpha=0.35)
        image = plane_image(counts, plane, index)
        if image.min() < minimum_views <= image.max():
            contour = dict(origin="lower" if plane.vertical_up else "upper", extent=_extent(volume, plane))
            ax.contour(image, levels=[minimum_views - 0.5], colors="red", linewidths=1.5, **contour)
            ax.contourf(image, levels=[-0.5, minimum_views - 0.5], colors="none", hatches=["///"], **contour)
        else:
            verdict = f"all < {minimum_views} views" if image.max() < minimum_views else f"all ≥ {minimum_views} views"
            ax.text(0.98, 0.03, verdict, transform=ax.transAxes, ha="right", va="bottom", fontsize=9,
                    color="red" if image.max() < minimum_views else "white",
                    bbox=dict(facecolor="black", alpha=0.55, edgecolor="none"))
        ax.set_title(_plane_title(volume, plane, index), fontsize=10)
        _scale_bar(ax)
    _colorbar(figure, shown, axes[-1], "views that see the voxel")
    return figure


def views_figure(scan, reprojections: dict[int, np.ndarray]) -> Figure:
    """Measured and re-projected views with their residual and per-view PSNR (detector pixels;
    values are line integrals of μ, unitless)."""
    indices = sorted(reprojections)
    figure = Figure(figsize=(12, 3.3 * len(indices) + 0.6), dpi=DPI)
    figure.suptitle("Measured vs re-projected views (line integrals ∫μ dl, unitless)", fontsize=13)
    axes = _panels(figure, len(indices), 3, wspace=0.55)
    for row, index in enumerate(indices):
        view = scan.views[index]
        measured, rendered = np.asarray(view.image, np.float64), np.asarray(reprojections[index], np.float64)
        residual = rendered - measured
        low, high = np.percentile(measured, [0.5, 99.5])
        limit = float(np.percentile(np.abs(residual), 99.5)) or 1e-6
        score = (f"PSNR {reprojection_psnr(rendered, measured):.1f} dB" if np.ptp(measured) > 0
                 else "PSNR undefined (constant view)")
        panels = ((measured, "measured", dict(cmap="gray", vmin=low, vmax=high)),
                  (rendered, f"re-projected, {score}", dict(cmap="gray", vmin=low, vmax=high)),
                  (residual, "residual (re-projected − measured)", dict(cmap="RdBu_r", vmin=-limit, vmax=limit)))
        for column, (image, name, style) in enumerate(panels):
            ax = axes[row, column]
            shown = ax.imshow(image, interpolation="nearest", **style)
            ax.set_title(f"view {index} ({view.name}): {name}", fontsize=9)
            ax.set_xlabel("u (px)")
            ax.set_ylabel("v (px)")
            if column >= 1:
                _colorbar(figure, shown, ax, "line integral" if column == 1 else "residual")
    return figure


def loss_rows(report: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Iterations, losses and (when recorded, 3-column rows) elapsed seconds of ``report["loss_curve"]``."""
    rows = [row for row in report.get("loss_curve") or [] if len(row) >= 2]
    iterations = np.array([row[0] for row in rows], float)
    losses = np.array([row[1] for row in rows], float)
    elapsed = np.array([row[2] for row in rows], float) if rows and all(len(row) >= 3 for row in rows) else None
    return iterations, losses, elapsed


def loss_figure(report: dict) -> Figure | None:
    """The training loss on a log axis against iterations and, when recorded, wall time, with the
    stages (warm start, resolution levels, ...) shaded, densification rounds and the stop marked.
    None when the report has no loss curve (e.g. ``--method sart``)."""
    iterations, losses, elapsed = loss_rows(report)
    if len(iterations) < 2:
        return None
    stages = [stage for stage in report.get("stages") or [] if {"name", "start_s", "end_s"} <= set(stage)]
    rounds = [entry for entry in report.get("densification") or [] if "iteration" in entry]
    figure = Figure(figsize=(13, 4.6), dpi=DPI)
    stop = report.get("stop_reason")
    figure.suptitle("Training loss (L1 + D-SSIM + TV)" + (f" — stopped: {stop}" if stop else ""), fontsize=13)
    panels = [("iteration", iterations)] + ([("wall time (s)", elapsed)] if elapsed is not None else [])
    axes = _panels(figure, 1, len(panels), wspace=0.22, right_in=0.3, left_in=1.05)[0]  # log tick labels
    positive = np.maximum(losses, np.finfo(float).tiny)
    colours = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3")
    window = max(1, min(len(positive) // 10, MOVING_AVERAGE_STEPS))
    smoothed = np.convolve(positive, np.ones(window) / window, mode="valid")
    for ax, (label, x) in zip(axes, panels):
        ax.plot(x, positive, color="0.6", linewidth=0.8, label="loss per step")
        if window > 1:
            ax.plot(x[window - 1:], smoothed, color="black", linewidth=1.6, label=f"mean of {window} steps")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("loss (log scale)")
        ax.grid(True, which="both", alpha=0.3)
        for number, stage in enumerate(stages):
            span = (stage["start_s"], stage["end_s"])
            if label == "iteration":  # stage times mapped onto iterations through the recorded clock
                if elapsed is None:
                    continue
                span = tuple(np.interp(span, elapsed, iterations))
                if span[1] <= span[0]:  # before the first or after the last iteration (warm start, voxelize)
                    continue
            ax.axvspan(*span, color=colours[number % len(colours)], alpha=0.18, label=stage["name"])
        for number, entry in enumerate(rounds):
            where = entry["iteration"] if label == "iteration" else entry.get("elapsed_s")
            if where is None:
                continue
            ax.axvline(where, color="#c44e52", linestyle="--", linewidth=0.9,
                       label="densification" if number == 0 else None)
        if stop:
            ax.axvline(x[-1], color="black", linestyle=":", linewidth=1.0)
            ax.text(x[-1], 0.5, f" stop: {stop} ", transform=ax.get_xaxis_transform(), rotation=90, ha="right",
                    va="center", fontsize=9)
    missing = ([] if elapsed is not None else ["wall time per iteration"]) + \
              ([] if stages or rounds else ["stages and densification rounds"])
    if missing:
        axes[0].set_title(" and ".join(missing) + " not recorded in this report", fontsize=9, color="gray")
    axes[-1].legend(fontsize=8, loc="lower left")
    return figure


def bone_3d_figure(renders: dict[str, np.ndarray], threshold: float) -> Figure:
    """Side-by-side off-screen renders of the bone surface (:mod:`ixgs.render3d`), titled."""
    figure = Figure(figsize=(4.0 * len(renders), 4.6), dpi=DPI)
    figure.suptitle(f"Bone surface (μ > {threshold:.4f} 1/mm); orange: X-ray sources", fontsize=13)
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.86, wspace=0.03)
    axes = figure.subplots(1, len(renders), squeeze=False)[0]
    for ax, (name, image) in zip(axes, renders.items()):
        ax.imshow(image)
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    return figure


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def save_figure(figure: Figure, path: str | os.PathLike) -> Path:
    """Write the figure as a PNG, atomically."""
    path = Path(path)
    with atomic_path(path) as temporary:
        temporary.write_bytes(png_bytes(figure))
    return path
