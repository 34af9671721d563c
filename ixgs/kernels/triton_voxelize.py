"""Triton (CUDA) kernels of the voxelizer: the Gaussians' field on a voxel block, no pair tensors.

Same inputs and math as :func:`ixgs.voxelize.voxelize` (the reference) and
:mod:`ixgs.kernels.numba_voxelize`: one program per Gaussian walks its clipped (z, y, x) box in blocks
of ``BLOCK`` voxels; atomic adds forward, the Gaussian's own 10 table gradients backward.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_splat import BLOCK


@triton.jit
def _axis(lower, extent, g, axis, size):
    start = tl.maximum(tl.load(lower + 3 * g + axis), 0)
    stop = tl.minimum(tl.load(lower + 3 * g + axis) + tl.load(extent + 3 * g + axis), size)
    return start, tl.maximum(stop - start, 0)


@triton.jit
def _voxels(table, lower, extent, n, g, start, nz, ny, nx, spacing, BLOCK: tl.constexpr):
    """Block ``start`` of Gaussian ``g``'s box: flat voxel index, mask, offsets (mm) and exp(-q / 2)."""
    z0, dz = _axis(lower, extent, g, 0, nz)
    y0, dy = _axis(lower, extent, g, 1, ny)
    x0, dx = _axis(lower, extent, g, 2, nx)
    i = start + tl.arange(0, BLOCK)
    mask = i < dz * dy * dx
    plane = tl.maximum(dy * dx, 1)
    z = z0 + i // plane
    y = y0 + (i % plane) // tl.maximum(dx, 1)
    x = x0 + i % tl.maximum(dx, 1)
    ox = tl.load(spacing) * x - tl.load(table + g)
    oy = tl.load(spacing + 1) * y - tl.load(table + n + g)
    oz = tl.load(spacing + 2) * z - tl.load(table + 2 * n + g)
    q = (ox * (tl.load(table + 3 * n + g) * ox + tl.load(table + 6 * n + g) * oy + tl.load(table + 8 * n + g) * oz)
         + oy * (tl.load(table + 4 * n + g) * oy + tl.load(table + 7 * n + g) * oz)
         + tl.load(table + 5 * n + g) * oz * oz)
    return (z * ny + y) * nx + x, mask, ox, oy, oz, tl.exp(-0.5 * q)


@triton.jit
def _count(lower, extent, g, nz, ny, nx):
    dz = _axis(lower, extent, g, 0, nz)[1]
    dy = _axis(lower, extent, g, 1, ny)[1]
    return dz * dy * _axis(lower, extent, g, 2, nx)[1]


@triton.jit
def _forward(table, lower, extent, volume, n, nz, ny, nx, spacing, BLOCK: tl.constexpr):
    g = tl.program_id(0)
    density = tl.load(table + 9 * n + g)
    for start in range(0, _count(lower, extent, g, nz, ny, nx), BLOCK):
        flat, mask, ox, oy, oz, unit = _voxels(table, lower, extent, n, g, start, nz, ny, nx, spacing, BLOCK)
        tl.atomic_add(volume + flat, density * unit, mask=mask)


@triton.jit
def _backward(table, lower, extent, grad_volume, grad_table, n, nz, ny, nx, spacing, BLOCK: tl.constexpr):
    g = tl.program_id(0)
    density = tl.load(table + 9 * n + g)
    c0, c1, c2 = tl.load(table + 3 * n + g), tl.load(table + 4 * n + g), tl.load(table + 5 * n + g)
    c3, c4, c5 = tl.load(table + 6 * n + g), tl.load(table + 7 * n + g), tl.load(table + 8 * n + g)
    zero = tl.zeros([BLOCK], dtype=table.dtype.element_ty)
    a0, a1, a2, a3, a4, a5, a6, a7, a8, a9 = zero, zero, zero, zero, zero, zero, zero, zero, zero, zero
    for start in range(0, _count(lower, extent, g, nz, ny, nx), BLOCK):
        flat, mask, ox, oy, oz, unit = _voxels(table, lower, extent, n, g, start, nz, ny, nx, spacing, BLOCK)
        weighted = tl.load(grad_volume + flat, mask=mask, other=0.0) * unit
        gq = -0.5 * weighted * density  # d loss / d q
        # the offset is (voxel - centre): d q / d centre = -d q / d offset
        a0 -= gq * (2.0 * c0 * ox + c3 * oy + c5 * oz)
        a1 -= gq * (2.0 * c1 * oy + c3 * ox + c4 * oz)
        a2 -= gq * (2.0 * c2 * oz + c4 * oy + c5 * ox)
        a3 += gq * ox * ox
        a4 += gq * oy * oy
        a5 += gq * oz * oz
        a6 += gq * ox * oy
        a7 += gq * oy * oz
        a8 += gq * oz * ox
        a9 += weighted
    tl.store(grad_table + g, tl.sum(a0, axis=0))
    tl.store(grad_table + n + g, tl.sum(a1, axis=0))
    tl.store(grad_table + 2 * n + g, tl.sum(a2, axis=0))
    tl.store(grad_table + 3 * n + g, tl.sum(a3, axis=0))
    tl.store(grad_table + 4 * n + g, tl.sum(a4, axis=0))
    tl.store(grad_table + 5 * n + g, tl.sum(a5, axis=0))
    tl.store(grad_table + 6 * n + g, tl.sum(a6, axis=0))
    tl.store(grad_table + 7 * n + g, tl.sum(a7, axis=0))
    tl.store(grad_table + 8 * n + g, tl.sum(a8, axis=0))
    tl.store(grad_table + 9 * n + g, tl.sum(a9, axis=0))


def _spacing(spacing, table):
    """The (x, y, z) voxel spacing (mm) as a tensor of the table's precision (offsets are exact to it)."""
    return torch.tensor(spacing, dtype=table.dtype, device=table.device)


class VoxelSums(torch.autograd.Function):
    """Flat block (nz * ny * nx,) of the Gaussians' field; gradient with respect to the (10, M) table."""

    @staticmethod
    def forward(ctx, table, lower, extent, shape, spacing):
        table, lower, extent = table.detach().contiguous(), lower.contiguous(), extent.contiguous()
        volume = torch.zeros(math.prod(shape), dtype=table.dtype, device=table.device)
        n = table.shape[1]
        if n:
            _forward[(n,)](table, lower, extent, volume, n, *shape, _spacing(spacing, table), BLOCK=BLOCK)
        ctx.save_for_backward(table, lower, extent)
        ctx.shape, ctx.spacing = shape, spacing
        return volume

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_volume):
        table, lower, extent = ctx.saved_tensors
        grad_table = torch.zeros_like(table)
        n = table.shape[1]
        if n:
            _backward[(n,)](table, lower, extent, grad_volume.to(table.dtype).contiguous(), grad_table, n,
                            *ctx.shape, _spacing(ctx.spacing, table), BLOCK=BLOCK)
        return grad_table, None, None, None, None
