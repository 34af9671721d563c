"""numba CPU kernels of the renderer: the exact line integrals with no (Gaussian, pixel) pair tensors.

Same inputs and math as :mod:`ixgs.splat` (the reference): the (16, N) per-Gaussian table
(``delta = source - mean``, ``S / det S``, ``S^-1``, ``rho sqrt(2 pi)``), the (3, pixels) ray
directions and each Gaussian's pixel box. Forward: the Gaussians are cut into one run per thread
with about equal pair counts, each run adds its footprints into its own image buffer, and the buffers
are summed (no atomics). Backward: one Gaussian at a time, over its footprint, reading the pixel
gradient: each Gaussian's 16 table gradients are its own (no write conflicts). Tensors are shared
with numpy without copies (CPU, contiguous).
"""
from __future__ import annotations

import math

import numba
import numpy as np
import torch
from numba import njit, prange

from ..pairs import clip_boxes


@njit(cache=True, inline="always")
def _clipped_box(lower, extent, g, rows, cols):
    """Row and column ranges of Gaussian ``g``'s box inside the image."""
    r0, c0 = max(lower[g, 0], 0), max(lower[g, 1], 0)
    r1, c1 = min(lower[g, 0] + extent[g, 0], rows), min(lower[g, 1] + extent[g, 1], cols)
    return r0, max(r1, r0), c0, max(c1, c0)


@njit(cache=True)
def balanced_runs(counts, runs):
    """(runs + 1,) item indices cutting 0..N into consecutive runs of about equal ``counts`` (pairs) sums."""
    ends = np.cumsum(counts)
    total = ends[-1] if ends.shape[0] else 0
    bounds = np.empty(runs + 1, np.int64)
    bounds[0], bounds[runs] = 0, counts.shape[0]
    for k in range(1, runs):
        bounds[k] = np.searchsorted(ends, total * k // runs, side="right")
    return bounds


# Bytes the per-thread output buffers may take together (beyond one buffer): a 256^3 volume on many
# cores gets fewer buffers than threads rather than a GiB of them.
BUFFER_BYTES = 256 * 2 ** 20


def thread_buffers(counts: torch.Tensor, cells: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Zeroed output buffers (runs, cells), one per numba thread within :data:`BUFFER_BYTES`, and the
    runs of items (about equal ``counts`` sums) each adds."""
    runs = max(1, min(numba.get_num_threads(), BUFFER_BYTES // max(cells * np.dtype(dtype).itemsize, 1)))
    return np.zeros((runs, cells), dtype=dtype), balanced_runs(counts.contiguous().numpy(), runs)


@njit(parallel=True, fastmath=True, cache=True)
def _forward(table, pixels, lower, extent, rows, cols, bounds, buffers, constants):
    half, one = constants[0], constants[1]
    for run in prange(bounds.shape[0] - 1):
        image = buffers[run]
        for g in range(bounds[run], bounds[run + 1]):
            r0, r1, c0, c1 = _clipped_box(lower, extent, g, rows, cols)
            t0, t1, t2 = table[0, g], table[1, g], table[2, g]
            t3, t4, t5, t6, t7, t8 = table[3, g], table[4, g], table[5, g], table[6, g], table[7, g], table[8, g]
            t9, t10, t11, t12, t13, t14 = table[9, g], table[10, g], table[11, g], table[12, g], table[13, g], table[14, g]
            peak = table[15, g]
            for r in range(r0, r1):
                for p in range(r * cols + c0, r * cols + c1):
                    d0, d1, d2 = pixels[0, p], pixels[1, p], pixels[2, p]
                    e0 = t1 * d2 - t2 * d1  # e = delta x d: the ray's perpendicular offset
                    e1 = t2 * d0 - t0 * d2
                    e2 = t0 * d1 - t1 * d0
                    q = e0 * (t3 * e0 + t6 * e1) + e1 * (t4 * e1 + t7 * e2) + e2 * (t5 * e2 + t8 * e0)
                    a = d0 * (t9 * d0 + t12 * d1) + d1 * (t10 * d1 + t13 * d2) + d2 * (t11 * d2 + t14 * d0)
                    inverse_a = one / a
                    image[p] += peak * math.exp(-half * q * inverse_a) * math.sqrt(inverse_a)


@njit(parallel=True, fastmath=True, cache=True)
def _backward(table, pixels, lower, extent, rows, cols, grad_image, grad_table, constants):
    half, one, two = constants[0], constants[1], constants[2]
    for g in prange(table.shape[1]):
        r0, r1, c0, c1 = _clipped_box(lower, extent, g, rows, cols)
        if r1 == r0 or c1 == c0:
            continue
        t0, t1, t2 = table[0, g], table[1, g], table[2, g]
        t3, t4, t5, t6, t7, t8 = table[3, g], table[4, g], table[5, g], table[6, g], table[7, g], table[8, g]
        t9, t10, t11, t12, t13, t14 = table[9, g], table[10, g], table[11, g], table[12, g], table[13, g], table[14, g]
        peak = table[15, g]
        # float64 sums of the table-precision terms: a footprint has up to ~10^5 pixels
        s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = s8 = s9 = s10 = s11 = s12 = s13 = s14 = s15 = 0.0
        for r in range(r0, r1):
            for p in range(r * cols + c0, r * cols + c1):
                d0, d1, d2 = pixels[0, p], pixels[1, p], pixels[2, p]
                e0 = t1 * d2 - t2 * d1
                e1 = t2 * d0 - t0 * d2
                e2 = t0 * d1 - t1 * d0
                q = e0 * (t3 * e0 + t6 * e1) + e1 * (t4 * e1 + t7 * e2) + e2 * (t5 * e2 + t8 * e0)
                a = d0 * (t9 * d0 + t12 * d1) + d1 * (t10 * d1 + t13 * d2) + d2 * (t11 * d2 + t14 * d0)
                inverse_a = one / a
                q_a = q * inverse_a
                unit = math.exp(-half * q_a) * math.sqrt(inverse_a)
                weighted = grad_image[p] * unit
                gq = weighted * peak * inverse_a  # -2 d loss / d q
                ga = half * (q_a - one) * gq  # d loss / d a
                gq *= -half
                # d q / d e = 2 (S / det S) e (off-diagonal coefficients are stored doubled).
                ge0 = (two * t3 * e0 + t6 * e1 + t8 * e2) * gq
                ge1 = (two * t4 * e1 + t6 * e0 + t7 * e2) * gq
                ge2 = (two * t5 * e2 + t7 * e1 + t8 * e0) * gq
                s0 += d1 * ge2 - d2 * ge1  # d x grad_e
                s1 += d2 * ge0 - d0 * ge2
                s2 += d0 * ge1 - d1 * ge0
                s3 += gq * e0 * e0
                s4 += gq * e1 * e1
                s5 += gq * e2 * e2
                s6 += gq * e0 * e1
                s7 += gq * e1 * e2
                s8 += gq * e2 * e0
                s9 += ga * d0 * d0
                s10 += ga * d1 * d1
                s11 += ga * d2 * d2
                s12 += ga * d0 * d1
                s13 += ga * d1 * d2
                s14 += ga * d2 * d0
                s15 += weighted
        grad_table[0, g], grad_table[1, g], grad_table[2, g] = s0, s1, s2
        grad_table[3, g], grad_table[4, g], grad_table[5, g] = s3, s4, s5
        grad_table[6, g], grad_table[7, g], grad_table[8, g] = s6, s7, s8
        grad_table[9, g], grad_table[10, g], grad_table[11, g] = s9, s10, s11
        grad_table[12, g], grad_table[13, g], grad_table[14, g] = s12, s13, s14
        grad_table[15, g] = s15


def constants(dtype) -> np.ndarray:
    """0.5, 1 and 2 in the table's precision: Python float literals would turn float32 math into float64."""
    return np.array([0.5, 1.0, 2.0], dtype=dtype)


def arrays(*tensors) -> list[np.ndarray]:
    """numpy views of CPU tensors (copies only where a tensor is not contiguous)."""
    return [tensor.detach().contiguous().numpy() for tensor in tensors]


class LineIntegrals(torch.autograd.Function):
    """Flat image (rows * cols,) of the line integrals; gradient with respect to the (16, N) table."""

    @staticmethod
    def forward(ctx, table, pixels, lower, extent, shape):
        rows, cols = shape
        t, d, lo, ext = arrays(table, pixels, lower, extent)
        buffers, runs = thread_buffers(clip_boxes(lower, extent, shape)[1].prod(dim=1), rows * cols, t.dtype)
        _forward(t, d, lo, ext, rows, cols, runs, buffers, constants(t.dtype))
        ctx.save_for_backward(table, pixels, lower, extent)
        ctx.shape = shape
        return torch.from_numpy(buffers.sum(axis=0))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_image):
        table, pixels, lower, extent = ctx.saved_tensors
        grad_table = torch.zeros_like(table)
        t, d, lo, ext, grad = arrays(table, pixels, lower, extent, grad_image.to(table.dtype))
        _backward(t, d, lo, ext, *ctx.shape, grad, grad_table.numpy(), constants(t.dtype))
        return grad_table, None, None, None, None
