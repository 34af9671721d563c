"""numba CPU kernels of the voxelizer: the Gaussians' field on a voxel block, with no pair tensors.

Same inputs and math as :func:`ixgs.voxelize.voxelize` (the reference): a (10, M) per-Gaussian table
(centre relative to the block origin, mm, x y z; the 6 coefficients of the inverse covariance on
``[x^2, y^2, z^2, xy, yz, zx]``; the density, 1/mm) and each Gaussian's (z, y, x) voxel box.
Forward: one run of Gaussians per thread into its own block buffer, buffers summed; backward: one
Gaussian at a time over its box, gradients of its own table column only.
"""
from __future__ import annotations

import math

import torch
from numba import njit, prange

from ..pairs import clip_boxes
from .numba_splat import arrays, constants, thread_buffers


@njit(cache=True, inline="always")
def _clipped_box(lower, extent, g, nz, ny, nx):
    """(start, stop) along z, y and x of Gaussian ``g``'s box inside the block."""
    z0, y0, x0 = max(lower[g, 0], 0), max(lower[g, 1], 0), max(lower[g, 2], 0)
    return (z0, max(min(lower[g, 0] + extent[g, 0], nz), z0), y0, max(min(lower[g, 1] + extent[g, 1], ny), y0),
            x0, max(min(lower[g, 2] + extent[g, 2], nx), x0))


@njit(parallel=True, fastmath=True, cache=True)
def _forward(table, lower, extent, nz, ny, nx, sx, sy, sz, bounds, buffers, constants):
    half = constants[0]
    for run in prange(bounds.shape[0] - 1):
        volume = buffers[run]
        for g in range(bounds[run], bounds[run + 1]):
            z0, z1, y0, y1, x0, x1 = _clipped_box(lower, extent, g, nz, ny, nx)
            m0, m1, m2 = table[0, g], table[1, g], table[2, g]
            c0, c1, c2, c3, c4, c5 = table[3, g], table[4, g], table[5, g], table[6, g], table[7, g], table[8, g]
            density = table[9, g]
            for z in range(z0, z1):
                oz = sz * z - m2
                for y in range(y0, y1):
                    oy = sy * y - m1
                    q_yz = oy * (c1 * oy + c4 * oz) + c2 * oz * oz
                    row = (z * ny + y) * nx
                    for x in range(x0, x1):
                        ox = sx * x - m0
                        q = ox * (c0 * ox + c3 * oy + c5 * oz) + q_yz
                        volume[row + x] += density * math.exp(-half * q)


@njit(parallel=True, fastmath=True, cache=True)
def _backward(table, lower, extent, nz, ny, nx, sx, sy, sz, grad_volume, grad_table, constants):
    half, two = constants[0], constants[2]
    for g in prange(table.shape[1]):
        z0, z1, y0, y1, x0, x1 = _clipped_box(lower, extent, g, nz, ny, nx)
        m0, m1, m2 = table[0, g], table[1, g], table[2, g]
        c0, c1, c2, c3, c4, c5 = table[3, g], table[4, g], table[5, g], table[6, g], table[7, g], table[8, g]
        density = table[9, g]
        s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = s8 = s9 = 0.0
        for z in range(z0, z1):
            oz = sz * z - m2
            for y in range(y0, y1):
                oy = sy * y - m1
                row = (z * ny + y) * nx
                for x in range(x0, x1):
                    ox = sx * x - m0
                    q = ox * (c0 * ox + c3 * oy + c5 * oz) + oy * (c1 * oy + c4 * oz) + c2 * oz * oz
                    weighted = grad_volume[row + x] * math.exp(-half * q)
                    gq = -half * weighted * density  # d loss / d q
                    # the offset is (voxel - centre): d q / d centre = -d q / d offset
                    s0 -= gq * (two * c0 * ox + c3 * oy + c5 * oz)
                    s1 -= gq * (two * c1 * oy + c3 * ox + c4 * oz)
                    s2 -= gq * (two * c2 * oz + c4 * oy + c5 * ox)
                    s3 += gq * ox * ox
                    s4 += gq * oy * oy
                    s5 += gq * oz * oz
                    s6 += gq * ox * oy
                    s7 += gq * oy * oz
                    s8 += gq * oz * ox
                    s9 += weighted
        grad_table[0, g], grad_table[1, g], grad_table[2, g] = s0, s1, s2
        grad_table[3, g], grad_table[4, g], grad_table[5, g] = s3, s4, s5
        grad_table[6, g], grad_table[7, g], grad_table[8, g] = s6, s7, s8
        grad_table[9, g] = s9


class VoxelSums(torch.autograd.Function):
    """Flat block (nz * ny * nx,) of the Gaussians' field; gradient with respect to the (10, M) table."""

    @staticmethod
    def forward(ctx, table, lower, extent, shape, spacing):
        t, lo, ext = arrays(table, lower, extent)
        buffers, runs = thread_buffers(clip_boxes(lower, extent, shape)[1].prod(dim=1), math.prod(shape), t.dtype)
        _forward(t, lo, ext, *shape, *(t.dtype.type(h) for h in spacing), runs, buffers, constants(t.dtype))
        ctx.save_for_backward(table, lower, extent)
        ctx.shape, ctx.spacing = shape, spacing
        return torch.from_numpy(buffers.sum(axis=0))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_volume):
        table, lower, extent = ctx.saved_tensors
        grad_table = torch.zeros_like(table)
        t, lo, ext, grad = arrays(table, lower, extent, grad_volume.to(table.dtype))
        _backward(t, lo, ext, *ctx.shape, *(t.dtype.type(h) for h in ctx.spacing), grad, grad_table.numpy(),
                  constants(t.dtype))
        return grad_table, None, None, None, None
