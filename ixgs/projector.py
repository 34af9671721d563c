"""Ray-driven forward projection of voxel volumes for any projection matrix (torch).

The volume is the trilinear interpolation of its voxel values (exact at voxel centres, falling
linearly to zero one voxel outside the grid). Each ray is clipped to that support box and the
line integral is taken with the midpoint rule at a regular step. The projection is linear in the
volume, so autograd gives its exact adjoint (:func:`back_project`), which SART uses. With
``kernel="numba"`` (or "auto" on a CPU) the same marcher runs as a numba kernel
(:mod:`ixgs.kernels.numba_projector`), forward and adjoint, when the rays need no gradient.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import Grid, ViewRays, normalize_projection_matrix, view_rays
from .kernels.choice import kernel_module, resolve_kernel
from .volume import Volume


def sample_volume(volume: torch.Tensor, grid: Grid, points: torch.Tensor) -> torch.Tensor:
    """Trilinear values of a (nz, ny, nx) volume at world points (..., 3) in mm; zero outside."""
    if volume.dim() != 3 or tuple(volume.shape) != tuple(grid.shape):
        raise ValueError(f"volume shape {tuple(volume.shape)} does not match grid shape {grid.shape}")
    origin = torch.as_tensor(grid.origin, dtype=points.dtype, device=points.device)
    spacing = torch.as_tensor(grid.spacing, dtype=points.dtype, device=points.device)
    counts = torch.as_tensor(grid.shape[::-1], dtype=points.dtype, device=points.device)
    # align_corners=False: normalised (2 i + 1) / n - 1 is the centre of voxel i, also for n = 1.
    normalized = (2.0 * (points - origin) / spacing + 1.0) / counts - 1.0
    flat = normalized.reshape(1, 1, 1, -1, 3).to(volume.dtype)
    values = F.grid_sample(volume[None, None], flat, mode="bilinear", padding_mode="zeros", align_corners=False)
    return values.reshape(points.shape[:-1])


def _clip_to_box(source: torch.Tensor, directions: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor):
    """Entry and exit distances (mm) of rays through an axis-aligned box (slab method)."""
    tiny = torch.finfo(directions.dtype).tiny ** 0.5
    safe = torch.where(directions.abs() < tiny, torch.full_like(directions, tiny), directions)
    t_lower = (lower - source) / safe
    t_upper = (upper - source) / safe
    t_near = torch.minimum(t_lower, t_upper).amax(dim=-1).clamp(min=0.0)
    t_far = torch.maximum(t_lower, t_upper).amin(dim=-1)
    return t_near, torch.maximum(t_far, t_near)


def _project_rays(volume: torch.Tensor, grid: Grid, source: torch.Tensor, directions: torch.Tensor,
                  step_mm: float) -> torch.Tensor:
    """Line integrals along rays (n, 3) from one source point."""
    spacing = torch.as_tensor(grid.spacing, dtype=directions.dtype, device=directions.device)
    origin = torch.as_tensor(grid.origin, dtype=directions.dtype, device=directions.device)
    counts = torch.as_tensor(grid.shape[::-1], dtype=directions.dtype, device=directions.device)
    # Interpolated values reach zero one voxel beyond the outer voxel centres.
    lower, upper = origin - spacing, origin + counts * spacing
    t_near, t_far = _clip_to_box(source, directions, lower, upper)
    length = t_far - t_near
    n_steps = torch.ceil(length / step_mm)
    max_steps = int(n_steps.max().item()) if length.numel() else 0
    if max_steps == 0:
        return torch.zeros(directions.shape[0], dtype=volume.dtype, device=volume.device)
    step = length / n_steps.clamp(min=1.0)
    k = torch.arange(max_steps, dtype=directions.dtype, device=directions.device)
    t = t_near[:, None] + (k[None, :] + 0.5) * step[:, None]
    inside = (k[None, :] < n_steps[:, None]).to(volume.dtype)
    points = source + t[..., None] * directions[:, None, :]
    values = sample_volume(volume, grid, points) * inside
    return values.sum(dim=1) * step.to(volume.dtype)


def default_step_mm(grid: Grid) -> float:
    """Half the smallest voxel spacing: fine enough for trilinear volumes."""
    return 0.5 * float(min(grid.spacing))


def _numba_marcher(kernel: str, device: torch.device, *ray_tensors: torch.Tensor):
    """The numba ray marcher when ``kernel`` resolves to it here and no ray tensor needs a gradient
    (a learned pose moves the rays), else None: the torch marcher (the reference) runs."""
    if resolve_kernel(kernel, device) != "numba" or any(t.requires_grad for t in ray_tensors):
        return None
    return kernel_module("numba", "projector")


def forward_project(volume: torch.Tensor, grid: Grid, rays: ViewRays, step_mm: float | None = None,
                    chunk_rays: int = 4096, kernel: str = "torch") -> torch.Tensor:
    """Line integrals (rows, cols) of a (nz, ny, nx) attenuation volume (1/mm) along a view's rays.

    Differentiable w.r.t. ``volume``; rays are processed ``chunk_rays`` at a time to bound memory.
    Runs on the volume's device and dtype. ``kernel``: "torch" (the reference), or "numba"/"auto"
    for the numba marcher on a CPU (:func:`_numba_marcher`; other kernels run the torch marcher).
    """
    step_mm = default_step_mm(grid) if step_mm is None else float(step_mm)
    if step_mm <= 0:
        raise ValueError(f"step_mm must be positive, got {step_mm}")
    if chunk_rays < 1:
        raise ValueError(f"chunk_rays must be at least 1, got {chunk_rays}")
    rows, cols = rays.shape
    source = rays.source.to(device=volume.device, dtype=volume.dtype)
    directions = rays.directions.reshape(-1, 3).to(device=volume.device, dtype=volume.dtype)
    marcher = _numba_marcher(kernel, volume.device, source, directions)
    if marcher is not None:
        return marcher.RayIntegrals.apply(volume, grid, source, directions, step_mm).reshape(rows, cols)
    chunks = [_project_rays(volume, grid, source, directions[i:i + chunk_rays], step_mm)
              for i in range(0, directions.shape[0], chunk_rays)]
    return torch.cat(chunks).reshape(rows, cols)


def back_project(image: torch.Tensor, grid: Grid, rays: ViewRays, step_mm: float | None = None,
                 chunk_rays: int = 4096, kernel: str = "torch") -> torch.Tensor:
    """The exact adjoint of :func:`forward_project`: A^T image, a (nz, ny, nx) volume.

    Computed chunk by chunk with autograd, so memory stays bounded like the forward projection
    (``kernel`` as there: the numba marcher computes the adjoint directly).
    """
    if tuple(image.shape) != tuple(rays.shape):
        raise ValueError(f"image shape {tuple(image.shape)} does not match the view's {rays.shape}")
    step_mm = default_step_mm(grid) if step_mm is None else float(step_mm)
    probe = torch.zeros(grid.shape, dtype=image.dtype, device=image.device, requires_grad=True)
    result = torch.zeros(grid.shape, dtype=image.dtype, device=image.device)
    source = rays.source.to(device=image.device, dtype=image.dtype)
    directions = rays.directions.reshape(-1, 3).to(device=image.device, dtype=image.dtype)
    weights = image.reshape(-1)
    marcher = _numba_marcher(kernel, image.device)
    if marcher is not None:
        return marcher.adjoint(weights, grid, source, directions, step_mm).reshape(grid.shape)
    with torch.enable_grad():
        for i in range(0, directions.shape[0], chunk_rays):
            projection = _project_rays(probe, grid, source, directions[i:i + chunk_rays], step_mm)
            if not projection.requires_grad:  # no ray of this chunk meets the grid
                continue
            (gradient,) = torch.autograd.grad(projection, probe, grad_outputs=weights[i:i + chunk_rays])
            result += gradient
    return result


def project_volume(volume: Volume, projection_matrix: np.ndarray, shape: tuple[int, int], device="cpu",
                   step_mm: float | None = None) -> np.ndarray:
    """Line integrals (float32, ``shape = (rows, cols)``) of an axis-aligned attenuation Volume (1/mm)."""
    if not np.allclose(np.asarray(volume.direction, float), np.eye(3), atol=1e-6):
        raise ValueError("project_volume needs an axis-aligned volume (identity direction); resample it first")
    grid = volume.grid
    P = normalize_projection_matrix(projection_matrix, np.asarray(grid.roi.center))
    rays = view_rays(P, shape, device=device)
    tensor = torch.as_tensor(np.asarray(volume.array, dtype=np.float32), device=device)
    with torch.no_grad():
        return forward_project(tensor, grid, rays, step_mm).cpu().numpy()
