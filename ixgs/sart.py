"""SART baseline on the voxel projector: one view per update (ordered subsets of size one).

``x += relaxation * A^T((b - A x) / A 1) / A^T 1`` for each view in a fixed, seeded random order,
with A the ray-driven projector and A^T its exact autograd adjoint. Rays that leave the grid
(truncated data: anatomy outside the grid) are used as they are; choosing a support grid larger
than the ROI is the caller's decision.

SART+TV (``tv_weight`` > 0, off by default): after each pass over the views, ``tv_steps`` steps of
steepest descent on the volume's isotropic total variation, each of length ``tv_weight`` times
the change the pass made (the adaptive step of Sidky and Pan's ASD-POCS, 2008): the smoothing
follows the data updates and fades as they converge.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from .geometry import Grid, normalize_projection_matrix, view_rays
from .losses import isotropic_total_variation
from .projector import back_project, forward_project

# Rays or voxels whose weight sums (mm) fall below this barely touch the grid: they are skipped.
MIN_WEIGHT_MM = 1e-3


def isotropic_tv_gradient(volume: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`ixgs.losses.isotropic_total_variation` with respect to ``volume``."""
    with torch.enable_grad():
        x = volume.detach().clone().requires_grad_(True)
        isotropic_total_variation(x).backward()
    return x.grad


def tv_descent(volume: torch.Tensor, step: float, steps: int) -> torch.Tensor:
    """``steps`` steps of length ``step`` (RMS per voxel, 1/mm) down the normalised TV gradient."""
    for _ in range(steps):
        gradient = isotropic_tv_gradient(volume)
        norm = gradient.square().mean().sqrt()
        if norm <= 0:
            break
        volume = volume - step * gradient / norm
    return volume


def _safe_reciprocal(weights: torch.Tensor) -> torch.Tensor:
    return torch.where(weights > MIN_WEIGHT_MM, 1.0 / weights.clamp(min=MIN_WEIGHT_MM), torch.zeros_like(weights))


def sart_reconstruct(scan_views: list[tuple[np.ndarray, np.ndarray]], grid: Grid, iterations: int,
                     relaxation: float = 0.8, device="cpu", nonneg: bool = True,
                     progress: Callable[[int, int, float], None] | None = None,
                     cancel: Callable[[], bool] | None = None, time_budget_s: float | None = None,
                     seed: int = 0, step_mm: float | None = None, tv_weight: float = 0.0,
                     tv_steps: int = 10, kernel: str = "torch") -> torch.Tensor:
    """Attenuation volume (nz, ny, nx) in 1/mm from ``(image, projection_matrix)`` pairs.

    ``progress(iteration, iterations, residual)`` reports after each pass over the views the
    relative residual ||b - A x|| / ||b|| seen during that pass. When ``cancel()`` returns True or
    ``time_budget_s`` is spent, the current estimate is returned after the view in progress.
    Row and column sums (A 1, A^T 1) are cached per view: one volume of memory per view.
    ``tv_weight`` > 0 adds the TV steps between passes (module docstring; Sidky's alpha, ~0.2).
    ``kernel``: the ray marcher's (:func:`ixgs.projector.forward_project`): "numba"/"auto" on a CPU
    marches with numba, else the torch reference.
    """
    if len(scan_views) < 1:
        raise ValueError("sart_reconstruct needs at least one view")
    if iterations < 0:
        raise ValueError(f"iterations must be non-negative, got {iterations}")
    if not 0 < relaxation < 2:
        raise ValueError(f"relaxation must be in (0, 2), got {relaxation}")
    if tv_weight < 0 or tv_steps < 0:
        raise ValueError(f"tv_weight and tv_steps must be non-negative, got {tv_weight} and {tv_steps}")
    started = time.monotonic()
    center = np.asarray(grid.roi.center)
    views = []
    for image, projection_matrix in scan_views:
        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 2:
            raise ValueError(f"view images must be 2D, got shape {image.shape}")
        rays = view_rays(normalize_projection_matrix(projection_matrix, center), image.shape, device=device)
        views.append((torch.as_tensor(image, device=device), rays))
    volume = torch.zeros(grid.shape, dtype=torch.float32, device=device)
    ones = torch.ones(grid.shape, dtype=torch.float32, device=device)
    row_scale: dict[int, torch.Tensor] = {}
    column_scale: dict[int, torch.Tensor] = {}
    order = np.random.default_rng(seed).permutation(len(views))

    def out_of_time() -> bool:
        expired = time_budget_s is not None and time.monotonic() - started > time_budget_s
        return expired or (cancel is not None and cancel())

    with torch.no_grad():
        for iteration in range(1, iterations + 1):
            residual_sq, data_sq = 0.0, 0.0
            before = volume.clone() if tv_weight > 0 else None
            for index in order:
                image, rays = views[index]
                if index not in row_scale:
                    row_scale[index] = _safe_reciprocal(forward_project(ones, grid, rays, step_mm, kernel=kernel))
                    column_scale[index] = _safe_reciprocal(
                        back_project(torch.ones_like(image), grid, rays, step_mm, kernel=kernel))
                residual = image - forward_project(volume, grid, rays, step_mm, kernel=kernel)
                residual_sq += float((residual * (row_scale[index] > 0)).square().sum())
                data_sq += float(image.square().sum())
                update = back_project(residual * row_scale[index], grid, rays, step_mm, kernel=kernel) * column_scale[index]
                volume += relaxation * update
                if nonneg:
                    volume.clamp_(min=0.0)
                if out_of_time():
                    return volume
            if before is not None:
                change = float((volume - before).square().mean().sqrt())
                volume = tv_descent(volume, tv_weight * change, tv_steps)
                if nonneg:
                    volume.clamp_(min=0.0)
            if progress is not None:
                progress(iteration, iterations, (residual_sq / max(data_sq, 1e-30)) ** 0.5)
    return volume
