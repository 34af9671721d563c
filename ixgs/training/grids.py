"""The regions of one reconstruction: the output grid, the Gaussians' support, the outer box, SART's grid."""
from __future__ import annotations

import numpy as np

from ..geometry import Grid, Roi
from ..scan import Scan

# The box modelled around the ROI (tissue outside it still attenuates every ray): OUTER_FACTOR times
# the ROI's longest side, kept well clear of the X-ray sources.
OUTER_FACTOR = 4.0
SOURCE_CLEARANCE = 0.45  # of the distance from the ROI centre to the nearest source, per half side
# SART reconstructs at SART_VOXEL_FACTOR times the output voxel, on its wider grid.
SART_VOXEL_FACTOR = 1.5


def output_voxel_mm(roi: Roi, voxel_size_mm: float | None, default_grid_size: int) -> float:
    """The output voxel size (mm): the one asked for, or the ROI's longest side / ``default_grid_size``."""
    return voxel_size_mm or max(roi.size) / default_grid_size


def output_grid(scan: Scan, roi: Roi | None, voxel_size_mm: float | None, default_grid_size: int) -> Grid:
    """The output grid: the ROI (default the scan's) tiled at :func:`output_voxel_mm`."""
    roi = roi or scan.roi
    return roi.grid(output_voxel_mm(roi, voxel_size_mm, default_grid_size))


def support_padding(grid: Grid, factor: float) -> tuple[int, int, int]:
    """Voxels (x, y, z) to add on each side so the support is ``factor`` times the ROI."""
    nx, ny, nz = grid.shape[::-1]
    return tuple(int(round(n * (factor - 1.0) / 2.0)) for n in (nx, ny, nz))


def surrounding_box(scan: Scan, roi: Roi, factor: float) -> Roi:
    """A cube around ``roi`` (``factor`` x its longest side) that no X-ray source comes near."""
    center = np.asarray(roi.center, float)
    nearest = min(float(np.linalg.norm(view.source - center)) for view in scan.views)
    side = min(factor * max(roi.size), 2 * SOURCE_CLEARANCE * nearest)
    return Roi(roi.center, (max(side, *roi.size),) * 3)


def sart_grid(scan: Scan, grid: Grid, factor: float) -> Grid:
    """SART's grid: wide enough for most tissue the views cross, coarse enough to stay affordable."""
    return surrounding_box(scan, grid.roi, factor).grid(SART_VOXEL_FACTOR * max(grid.spacing))


def check_sources_outside(scan: Scan, support: Roi) -> None:
    for index, view in enumerate(scan.views):
        if support.contains(view.source):
            raise ValueError(f"view {index} ({view.name}): the X-ray source lies inside the reconstruction "
                             "support; use a smaller ROI or support factor")
