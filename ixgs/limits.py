"""Memory a run will need, estimated from its settings before anything is allocated.

A setting that would exhaust memory (a 0.02 mm voxel, two billion Gaussians, a 100000-pixel
detector) is refused at once, with the estimate and the setting to change, instead of ending in a
MemoryError minutes later. Each estimate is a count times documented bytes per unit; they are
upper-end figures for the engine's largest live arrays, not exact accounting.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

import torch

from .geometry import Roi

GIB = 2 ** 30
# Per output voxel: the voxel centres (float64 while built, then float32), the float32 volume, the
# coverage count (int32) with its per-view float32 terms, and the uint8 label and coverage maps.
OUTPUT_BYTES_PER_VOXEL = 96
# Per SART voxel and volume (float32); SART holds one column-sum volume per view plus this many
# working volumes (estimate, ones, back-projection probe, result, gradient, update).
SART_BYTES_PER_VOXEL = 4
SART_WORK_VOLUMES = 6
# Per Gaussian: parameters (11 float32), gradients, Adam's two moments, densification statistics and
# the projector's per-Gaussian intermediates; measured 1150 B at 0.4 M Gaussians on a CPU.
BYTES_PER_GAUSSIAN = 1200
# Per detector pixel while one view is simulated: pixel grid and ray directions (float64), float32
# rays, line integrals (float64) and, for transmission views, the blurred counts.
SIMULATION_BYTES_PER_PIXEL = 128
# Per detector pixel of every stored view (float32 images kept until the scan is written).
VIEW_BYTES_PER_PIXEL = 4
# Assumed available memory where the operating system does not say (64 GiB).
FALLBACK_AVAILABLE_BYTES = 64 * GIB


class ResourceError(ValueError):
    """A setting whose estimated memory exceeds what is available; the message names the setting."""


@dataclass(frozen=True)
class Need:
    """``bytes`` that ``what`` needs, on the host or the compute ``device``; ``setting`` is what to change."""

    what: str
    bytes: float
    setting: str
    on_device: bool = False


def voxel_count(roi: Roi, voxel_size_mm: float) -> float:
    """Voxels of ``roi.grid(voxel_size_mm)``, computed in floating point (no grid is built)."""
    return math.prod(max(1.0, float(round(size / voxel_size_mm))) for size in roi.size)


def output_bytes(voxels: float) -> float:
    return voxels * OUTPUT_BYTES_PER_VOXEL


def sart_bytes(voxels: float, n_views: int) -> float:
    return voxels * SART_BYTES_PER_VOXEL * (n_views + SART_WORK_VOLUMES)


def gaussian_bytes(n_gaussians: int) -> float:
    return n_gaussians * BYTES_PER_GAUSSIAN


def simulation_view_bytes(detector_px: int) -> float:
    return float(detector_px) ** 2 * SIMULATION_BYTES_PER_PIXEL


def views_bytes(n_views: int, detector_px: int) -> float:
    return n_views * float(detector_px) ** 2 * VIEW_BYTES_PER_PIXEL


def simulation_needs(n_views: int, detector_px: int) -> list[Need]:
    """What :func:`ixgs.simulate.simulate_scan` holds: one view's rays at a time, every view's image."""
    detector = "the detector size (--detector)"
    return [Need(f"simulating one {detector_px} x {detector_px} px view", simulation_view_bytes(detector_px), detector,
                 on_device=True),
            Need(f"{n_views} views of {detector_px} x {detector_px} px", views_bytes(n_views, detector_px),
                 f"{detector} or the number of views (--views)")]


def available_bytes(device: torch.device | str = "cpu") -> tuple[float, str]:
    """Free memory (bytes) of ``device`` and where the figure comes from: CUDA's ``mem_get_info``;
    on a CPU Linux's MemAvailable, else the OS's free or physical pages, else a fixed assumption."""
    device = torch.device(device)
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0]), "free on the GPU"
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024, "available"
    except OSError:
        pass
    for pages in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):  # macOS has only the physical total
        try:
            return float(os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE")), "available"
        except (AttributeError, ValueError, OSError):
            continue
    if sys.platform == "win32":
        return _windows_available_bytes(), "available"
    return float(FALLBACK_AVAILABLE_BYTES), "assumed available (the OS does not say)"


def _windows_available_bytes() -> float:
    import ctypes

    class MemoryStatus(ctypes.Structure):
        _fields_ = [("length", ctypes.c_ulong), ("load", ctypes.c_ulong)] + [
            (name, ctypes.c_ulonglong) for name in ("total", "available", "total_page", "available_page",
                                                   "total_virtual", "available_virtual", "extended")]

    status = MemoryStatus()
    status.length = ctypes.sizeof(MemoryStatus)
    if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
        return float(FALLBACK_AVAILABLE_BYTES)
    return float(status.available)


def check_memory(needs: list[Need], device: torch.device | str = "cpu") -> None:
    """Refuse when the host's or the device's share of ``needs`` exceeds its free memory, naming the
    largest need and its setting."""
    device = torch.device(device)
    if device.type == "cpu":
        places = [(device, needs)]
    else:
        places = [(torch.device("cpu"), [need for need in needs if not need.on_device]),
                  (device, [need for need in needs if need.on_device])]
    for place, mine in places:
        if not mine:
            continue
        total = sum(need.bytes for need in mine)
        free, source = available_bytes(place)
        if total > free:
            largest = max(mine, key=lambda need: need.bytes)
            raise ResourceError(f"{largest.what} needs about {format_bytes(largest.bytes)} "
                                f"({format_bytes(total)} in all) but only {format_bytes(free)} is {source}; "
                                f"change {largest.setting}")


def format_bytes(count: float) -> str:
    if not count < 1e6 * 2 ** 40:
        return "more than a million TiB"
    for unit, size in (("TiB", 2 ** 40), ("GiB", GIB), ("MiB", 2 ** 20)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count / 1024:.3g} KiB"


def reconstruction_needs(scan, settings) -> list[Need]:
    """What :func:`ixgs.reconstruct.reconstruct` will hold for ``settings`` on ``scan``: the output
    grid, SART's wider grid (method ``sart``) or the Gaussians and their pair-work budget."""
    from .training.config import PRESETS
    from .training.grids import SART_VOXEL_FACTOR, output_voxel_mm, surrounding_box

    roi = settings.roi or scan.roi
    voxel = output_voxel_mm(roi, settings.voxel_size_mm, settings.default_grid_size)  # no grid built: floats
    voxel_setting = "the voxel size (--voxel-size, setting 'voxel_size_mm') or the ROI"
    voxels = voxel_count(roi, voxel)
    needs = [Need(f"the {voxels:.3g}-voxel output grid ({voxel:.3g} mm voxels)", output_bytes(voxels), voxel_setting)]
    if settings.method == "sart":
        # As training.grids.sart_grid: the box around the ROI at SART_VOXEL_FACTOR x the output voxel.
        box = surrounding_box(scan, roi, settings.sart_factor)
        sart_voxels = voxel_count(box, SART_VOXEL_FACTOR * voxel)
        what = (f"SART's {sart_voxels:.3g}-voxel grid ({settings.sart_factor:g} x the ROI, voxels "
                f"{SART_VOXEL_FACTOR:g} x {voxel:.3g} mm) for {len(scan.views)} views")
        needs.append(Need(what, sart_bytes(sart_voxels, len(scan.views)), voxel_setting, on_device=True))
    else:
        preset = PRESETS[settings.preset]
        count = max(preset["max_gaussians"], settings.gaussians or preset["gaussians"])
        needs.append(Need(f"{count:.3g} Gaussians", gaussian_bytes(count),
                          "the number of Gaussians (--gaussians, setting 'gaussians')", on_device=True))
        if settings.memory_budget_mib is not None:
            needs.append(Need(f"a pair-work budget of {settings.memory_budget_mib:g} MiB",
                              settings.memory_budget_mib * 2 ** 20,
                              "the memory budget (--memory-budget, setting 'memory_budget_mib')", on_device=True))
    return needs
