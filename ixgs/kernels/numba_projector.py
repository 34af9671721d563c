"""numba CPU kernels of the voxel ray marcher: :func:`ixgs.projector.forward_project` and its adjoint.

Same math as :mod:`ixgs.projector` (the torch reference): each ray is clipped to the box where the
trilinear volume is non-zero (one voxel beyond the outer centres), cut into equal steps of at most
``step_mm``, and the midpoint samples (trilinear, zero outside the grid) are summed times the step.
Forward: one ray at a time (prange), no conflicts. Adjoint: rays in one run per thread, each thread
adding its rays' trilinear weights into its own volume buffer, buffers summed (no atomics).
"""
from __future__ import annotations

import math

import numba
import numpy as np
import torch
from numba import njit, prange

from .numba_splat import arrays


@njit(cache=True, inline="always")
def _segment(source, d0, d1, d2, lower, upper, step_mm):
    """Entry distance, step length and number of steps of one ray through the box (slab method)."""
    t_near, t_far = 0.0, np.inf
    for axis, d in enumerate((d0, d1, d2)):
        tiny = 1.4916681462400413e-154  # sqrt of the smallest normal float64, as the reference
        safe = d if abs(d) >= tiny else tiny
        a = (lower[axis] - source[axis]) / safe
        b = (upper[axis] - source[axis]) / safe
        t_near = max(t_near, min(a, b))
        t_far = min(t_far, max(a, b))
    length = max(t_far, t_near) - t_near
    steps = math.ceil(length / step_mm)
    return t_near, length / max(steps, 1), steps


@njit(cache=True, inline="always")
def _cell(source, d0, d1, d2, t, origin, spacing):
    """Lower corner (z, y, x) of the trilinear cell of the point at ``t`` and its weights (x, y, z)."""
    fx = (source[0] + t * d0 - origin[0]) / spacing[0]  # continuous voxel index, x y z
    fy = (source[1] + t * d1 - origin[1]) / spacing[1]
    fz = (source[2] + t * d2 - origin[2]) / spacing[2]
    x0, y0, z0 = math.floor(fx), math.floor(fy), math.floor(fz)
    return int(z0), int(y0), int(x0), fx - x0, fy - y0, fz - z0


@njit(cache=True, inline="always")
def _weight(volume, z, y, x, wx, wy, wz, dz, dy, dx):
    """Trilinear weight of corner (z + dz, y + dy, x + dx); 0 outside the grid (zero padding)."""
    if 0 <= z + dz < volume.shape[0] and 0 <= y + dy < volume.shape[1] and 0 <= x + dx < volume.shape[2]:
        return (wz if dz else 1.0 - wz) * (wy if dy else 1.0 - wy) * (wx if dx else 1.0 - wx)
    return 0.0


@njit(cache=True, inline="always")
def _interior(volume, z, y, x):
    return 0 <= z and z + 1 < volume.shape[0] and 0 <= y and y + 1 < volume.shape[1] and 0 <= x and x + 1 < volume.shape[2]


@njit(parallel=True, fastmath=True, cache=True)
def _forward(volume, origin, spacing, lower, upper, source, directions, step_mm, out):
    for ray in prange(directions.shape[0]):
        d0, d1, d2 = directions[ray, 0], directions[ray, 1], directions[ray, 2]
        t_near, step, steps = _segment(source, d0, d1, d2, lower, upper, step_mm)
        total = 0.0
        for k in range(steps):
            z, y, x, wx, wy, wz = _cell(source, d0, d1, d2, t_near + (k + 0.5) * step, origin, spacing)
            if _interior(volume, z, y, x):  # most samples: no bounds to check
                total += ((1 - wz) * ((1 - wy) * ((1 - wx) * volume[z, y, x] + wx * volume[z, y, x + 1])
                                      + wy * ((1 - wx) * volume[z, y + 1, x] + wx * volume[z, y + 1, x + 1]))
                          + wz * ((1 - wy) * ((1 - wx) * volume[z + 1, y, x] + wx * volume[z + 1, y, x + 1])
                                  + wy * ((1 - wx) * volume[z + 1, y + 1, x] + wx * volume[z + 1, y + 1, x + 1])))
                continue
            for dz in range(2):
                for dy in range(2):
                    for dx in range(2):
                        weight = _weight(volume, z, y, x, wx, wy, wz, dz, dy, dx)
                        if weight != 0.0:
                            total += weight * volume[z + dz, y + dy, x + dx]
        out[ray] = total * step


@njit(parallel=True, fastmath=True, cache=True)
def _adjoint(image, origin, spacing, lower, upper, source, directions, step_mm, buffers):
    runs = buffers.shape[0]
    per_run = (directions.shape[0] + runs - 1) // runs
    for run in prange(runs):
        volume = buffers[run]
        for ray in range(run * per_run, min((run + 1) * per_run, directions.shape[0])):
            d0, d1, d2 = directions[ray, 0], directions[ray, 1], directions[ray, 2]
            t_near, step, steps = _segment(source, d0, d1, d2, lower, upper, step_mm)
            value = image[ray] * step
            for k in range(steps):
                z, y, x, wx, wy, wz = _cell(source, d0, d1, d2, t_near + (k + 0.5) * step, origin, spacing)
                if _interior(volume, z, y, x):
                    a, b = value * (1 - wz), value * wz
                    aa, ab, ba, bb = a * (1 - wy), a * wy, b * (1 - wy), b * wy
                    volume[z, y, x] += aa * (1 - wx)
                    volume[z, y, x + 1] += aa * wx
                    volume[z, y + 1, x] += ab * (1 - wx)
                    volume[z, y + 1, x + 1] += ab * wx
                    volume[z + 1, y, x] += ba * (1 - wx)
                    volume[z + 1, y, x + 1] += ba * wx
                    volume[z + 1, y + 1, x] += bb * (1 - wx)
                    volume[z + 1, y + 1, x + 1] += bb * wx
                    continue
                for dz in range(2):
                    for dy in range(2):
                        for dx in range(2):
                            weight = _weight(volume, z, y, x, wx, wy, wz, dz, dy, dx)
                            if weight != 0.0:
                                volume[z + dz, y + dy, x + dx] += weight * value


def _geometry(grid, source: torch.Tensor, dtype):
    """origin, spacing, and the box where the trilinear volume is non-zero (mm, x y z), and the source."""
    origin, spacing = np.asarray(grid.origin, np.float64), np.asarray(grid.spacing, np.float64)
    counts = np.asarray(grid.shape[::-1], np.float64)
    return origin, spacing, origin - spacing, origin + counts * spacing, source.detach().double().numpy()


def adjoint(image: torch.Tensor, grid, source: torch.Tensor, directions: torch.Tensor, step_mm: float) -> torch.Tensor:
    """A^T image for the flat (n,) ``image`` of rays (n, 3) from ``source``: a (nz, ny, nx) volume."""
    cells = math.prod(grid.shape)
    runs = max(1, min(numba.get_num_threads(), (256 * 2 ** 20) // (cells * 8)))
    buffers = np.zeros((runs, *grid.shape), dtype=np.float64)
    image_, directions_ = arrays(image.double(), directions.double())
    _adjoint(image_, *_geometry(grid, source, image.dtype), directions_, float(step_mm), buffers)
    return torch.from_numpy(buffers.sum(axis=0)).to(image.dtype)


class RayIntegrals(torch.autograd.Function):
    """Line integrals (n,) of a (nz, ny, nx) volume along rays (n, 3) from ``source``; differentiable in the volume."""

    @staticmethod
    def forward(ctx, volume, grid, source, directions, step_mm):
        out = np.zeros(directions.shape[0], dtype=np.float64)
        volume_, directions_ = arrays(volume.double(), directions.double())
        _forward(volume_, *_geometry(grid, source, volume.dtype), directions_, float(step_mm), out)
        ctx.grid, ctx.step_mm, ctx.dtype = grid, step_mm, volume.dtype
        ctx.save_for_backward(source, directions)
        return torch.from_numpy(out).to(volume.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        source, directions = ctx.saved_tensors
        return adjoint(grad, ctx.grid, source, directions, ctx.step_mm).to(ctx.dtype), None, None, None, None
