"""numba CPU kernels of the renderer: the exact line integrals with no (Gaussian, pixel) pair tensors.

Same inputs and math as :mod:`ixgs.splat` (the reference): the (16, N) per-Gaussian table
(``delta = source - mean``, ``S / det S``, ``S^-1``, ``rho sqrt(2 pi)``), the (3, pixels) ray
directions and each Gaussian's pixel box. Forward: the Gaussians are cut into one run per thread
with about equal pair counts, each run adds its footprints into its own image buffer, and the buffers
are summed (no atomics). Backward: one Gaussian at a time, over its footprint, reading the pixel
gradient: each Gaussian's 16 table gradients are its own (no write conflicts). The table itself and
the pixel boxes are formed here too, one Gaussian per iteration (:class:`GaussianTable`,
:func:`footprints`). Tensors are shared with numpy without copies (CPU, contiguous).
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
        # Per row, sums in the table's precision (vectorisable: ~1.4x faster than float64 sums per pair);
        # across rows in float64: a footprint has up to ~10^5 pixels.
        s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = s8 = s9 = s10 = s11 = s12 = s13 = s14 = s15 = 0.0
        for r in range(r0, r1):
            u0 = u1 = u2 = u3 = u4 = u5 = u6 = u7 = u8 = u9 = u10 = u11 = u12 = u13 = u14 = u15 = half - half
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
                u0 += d1 * ge2 - d2 * ge1  # d x grad_e
                u1 += d2 * ge0 - d0 * ge2
                u2 += d0 * ge1 - d1 * ge0
                u3 += gq * e0 * e0
                u4 += gq * e1 * e1
                u5 += gq * e2 * e2
                u6 += gq * e0 * e1
                u7 += gq * e1 * e2
                u8 += gq * e2 * e0
                u9 += ga * d0 * d0
                u10 += ga * d1 * d1
                u11 += ga * d2 * d2
                u12 += ga * d0 * d1
                u13 += ga * d1 * d2
                u14 += ga * d2 * d0
                u15 += weighted
            s0, s1, s2, s3 = s0 + u0, s1 + u1, s2 + u2, s3 + u3
            s4, s5, s6, s7 = s4 + u4, s5 + u5, s6 + u6, s7 + u7
            s8, s9, s10, s11 = s8 + u8, s9 + u9, s10 + u10, s11 + u11
            s12, s13, s14, s15 = s12 + u12, s13 + u13, s14 + u14, s15 + u15
        grad_table[0, g], grad_table[1, g], grad_table[2, g] = s0, s1, s2
        grad_table[3, g], grad_table[4, g], grad_table[5, g] = s3, s4, s5
        grad_table[6, g], grad_table[7, g], grad_table[8, g] = s6, s7, s8
        grad_table[9, g], grad_table[10, g], grad_table[11, g] = s9, s10, s11
        grad_table[12, g], grad_table[13, g], grad_table[14, g] = s12, s13, s14
        grad_table[15, g] = s15


@njit(cache=True)
def _rotation(quaternions, g):
    """Gaussian ``g``'s unit quaternion (w, x, y, z), its norm and rotation matrix (row-major, 9)."""
    w, x, y, z = quaternions[g, 0], quaternions[g, 1], quaternions[g, 2], quaternions[g, 3]
    norm = max(math.sqrt(w * w + x * x + y * y + z * z), 1e-12)
    w, x, y, z = w / norm, x / norm, y / norm, z / norm
    return (w, x, y, z, norm,
            (1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
             2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
             2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)))


@njit(cache=True)
def _symmetric6(table, row, g, r, l0, l1, l2):
    """Rows ``row``.. of the table: ``R diag(l) R^T`` on [xx, yy, zz, 2xy, 2yz, 2zx] (as symmetric6_from_eigen)."""
    for entry in range(6):
        i, j = (0, 1, 2, 0, 1, 2)[entry], (0, 1, 2, 1, 2, 0)[entry]
        value = r[3 * i] * l0 * r[3 * j] + r[3 * i + 1] * l1 * r[3 * j + 1] + r[3 * i + 2] * l2 * r[3 * j + 2]
        table[row + entry, g] = value if i == j else 2 * value


@njit(parallel=True, cache=True)
def _table_forward(means, scales, quaternions, densities, source, table, peak_factor):
    for g in prange(means.shape[0]):
        r = _rotation(quaternions, g)[5]
        i0, i1, i2 = 1.0 / scales[g, 0] ** 2, 1.0 / scales[g, 1] ** 2, 1.0 / scales[g, 2] ** 2
        _symmetric6(table, 3, g, r, i1 * i2, i2 * i0, i0 * i1)  # S / det S: eigenvalues 1 / (s_j s_k)^2
        _symmetric6(table, 9, g, r, i0, i1, i2)  # S^-1
        for axis in range(3):
            table[axis, g] = source[axis] - means[g, axis]
        table[15, g] = densities[g] * peak_factor


@njit(cache=True)
def _symmetric_times(grad_table, row, g, v0, v1, v2):
    """G v for the symmetric gradient G of the matrix whose table rows start at ``row`` (off-diagonals
    stored doubled, so G's off-diagonals are their gradients as they are)."""
    a00, a11, a22 = grad_table[row, g], grad_table[row + 1, g], grad_table[row + 2, g]
    a01, a12, a20 = grad_table[row + 3, g], grad_table[row + 4, g], grad_table[row + 5, g]
    return a00 * v0 + a01 * v1 + a20 * v2, a01 * v0 + a11 * v1 + a12 * v2, a20 * v0 + a12 * v1 + a22 * v2


@njit(parallel=True, cache=True)
def _table_backward(scales, quaternions, grad_table, grad_means, grad_scales, grad_quaternions, grad_densities,
                    peak_factor):
    for g in prange(scales.shape[0]):
        w, x, y, z, norm, r = _rotation(quaternions, g)
        i = (1.0 / scales[g, 0] ** 2, 1.0 / scales[g, 1] ** 2, 1.0 / scales[g, 2] ** 2)
        sdet = (i[1] * i[2], i[2] * i[0], i[0] * i[1])
        # M = R diag(lam) R^T: d loss / d lam_k = r_k . G r_k and d loss / d r_k = 2 lam_k G r_k (r_k: column k).
        ga0, ga1, ga2 = _symmetric_times(grad_table, 3, g, r[0], r[3], r[6])
        gb0, gb1, gb2 = _symmetric_times(grad_table, 9, g, r[0], r[3], r[6])
        ha0, ha1, ha2 = _symmetric_times(grad_table, 3, g, r[1], r[4], r[7])
        hb0, hb1, hb2 = _symmetric_times(grad_table, 9, g, r[1], r[4], r[7])
        ka0, ka1, ka2 = _symmetric_times(grad_table, 3, g, r[2], r[5], r[8])
        kb0, kb1, kb2 = _symmetric_times(grad_table, 9, g, r[2], r[5], r[8])
        grad_sdet0 = r[0] * ga0 + r[3] * ga1 + r[6] * ga2
        grad_sdet1 = r[1] * ha0 + r[4] * ha1 + r[7] * ha2
        grad_sdet2 = r[2] * ka0 + r[5] * ka1 + r[8] * ka2
        grad_i0 = r[0] * gb0 + r[3] * gb1 + r[6] * gb2 + grad_sdet1 * i[2] + grad_sdet2 * i[1]
        grad_i1 = r[1] * hb0 + r[4] * hb1 + r[7] * hb2 + grad_sdet0 * i[2] + grad_sdet2 * i[0]
        grad_i2 = r[2] * kb0 + r[5] * kb1 + r[8] * kb2 + grad_sdet0 * i[1] + grad_sdet1 * i[0]
        d00, d10, d20 = 2 * (sdet[0] * ga0 + i[0] * gb0), 2 * (sdet[0] * ga1 + i[0] * gb1), 2 * (sdet[0] * ga2 + i[0] * gb2)
        d01, d11, d21 = 2 * (sdet[1] * ha0 + i[1] * hb0), 2 * (sdet[1] * ha1 + i[1] * hb1), 2 * (sdet[1] * ha2 + i[1] * hb2)
        d02, d12, d22 = 2 * (sdet[2] * ka0 + i[2] * kb0), 2 * (sdet[2] * ka1 + i[2] * kb1), 2 * (sdet[2] * ka2 + i[2] * kb2)
        # d (1 / s^2) / d s = -2 / s^3
        grad_scales[g, 0] = -2.0 * grad_i0 * i[0] / scales[g, 0]
        grad_scales[g, 1] = -2.0 * grad_i1 * i[1] / scales[g, 1]
        grad_scales[g, 2] = -2.0 * grad_i2 * i[2] / scales[g, 2]
        for axis in range(3):
            grad_means[g, axis] = -grad_table[axis, g]
        grad_densities[g] = peak_factor * grad_table[15, g]
        # Through the rotation matrix's quaternion formula (d[row][col] = d loss / d R[row, col]).
        gw = 2 * (-z * d01 + y * d02 + z * d10 - x * d12 - y * d20 + x * d21)
        gx = 2 * (y * d01 + z * d02 + y * d10 - 2 * x * d11 - w * d12 + z * d20 + w * d21 - 2 * x * d22)
        gy = 2 * (-2 * y * d00 + x * d01 + w * d02 + x * d10 + z * d12 - w * d20 + z * d21 - 2 * y * d22)
        gz = 2 * (-2 * z * d00 - w * d01 + x * d02 + w * d10 - 2 * z * d11 + y * d12 + x * d20 + y * d21)
        along = w * gw + x * gx + y * gy + z * gz  # the normalisation's backward: drop the radial part
        grad_quaternions[g, 0] = (gw - w * along) / norm
        grad_quaternions[g, 1] = (gx - x * along) / norm
        grad_quaternions[g, 2] = (gy - y * along) / norm
        grad_quaternions[g, 3] = (gz - z * along) / norm


@njit(parallel=True, cache=True)
def _footprints(means, scales, quaternions, projection_matrix, rows, cols, sigmas, lower, extent, radius):
    P = projection_matrix
    for g in prange(means.shape[0]):
        r = _rotation(quaternions, g)[5]
        s0, s1, s2 = scales[g, 0], scales[g, 1], scales[g, 2]
        m0, m1, m2 = means[g, 0], means[g, 1], means[g, 2]
        w = P[2, 0] * m0 + P[2, 1] * m1 + P[2, 2] * m2 + P[2, 3]
        lower[g, 0] = lower[g, 1] = extent[g, 0] = extent[g, 1] = 0
        radius[g] = 0.0
        if not w > sigmas * max(s0, s1, s2):  # the whole k-sigma ellipsoid before the source plane
            continue
        largest = 0.0
        visible = True
        for a in range(2):  # a = 0: u (columns), 1: v (rows)
            uv = (P[a, 0] * m0 + P[a, 1] * m1 + P[a, 2] * m2 + P[a, 3]) / w
            j0, j1, j2 = (P[a, 0] - uv * P[2, 0]) / w, (P[a, 1] - uv * P[2, 1]) / w, (P[a, 2] - uv * P[2, 2]) / w
            # Variance along the Jacobian row: |diag(s) R^T j|^2.
            v0 = (r[0] * j0 + r[3] * j1 + r[6] * j2) * s0
            v1 = (r[1] * j0 + r[4] * j1 + r[7] * j2) * s1
            v2 = (r[2] * j0 + r[5] * j1 + r[8] * j2) * s2
            reach = sigmas * math.sqrt(v0 * v0 + v1 * v1 + v2 * v2)
            limit = cols if a == 0 else rows
            lo = min(max(math.ceil(uv - reach), -1.0), limit)
            hi = min(max(math.floor(uv + reach), -1.0), limit)
            first, count = int(lo), max(int(hi - lo + 1), 0)
            lower[g, 1 - a], extent[g, 1 - a] = first, count
            visible = visible and min(first + count, limit) > max(first, 0)
            largest = max(largest, reach)
        if visible:
            radius[g] = largest


def footprints(means: torch.Tensor, scales: torch.Tensor, quaternions: torch.Tensor, projection_matrix: torch.Tensor,
               shape: tuple[int, int], sigmas: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`ixgs.splat.footprints` (no blur) in one pass per Gaussian, in float64: boxes and radii of
    the Gaussians with centres ``means`` (N, 3) mm, ``scales`` (N, 3) mm and ``quaternions`` (N, 4)."""
    means, scales, quaternions = arrays(means, scales, quaternions)
    n = means.shape[0]
    lower, extent = np.empty((n, 2), np.int64), np.empty((n, 2), np.int64)
    radius = np.empty(n, means.dtype)
    _footprints(means, scales, quaternions, projection_matrix.detach().double().contiguous().numpy(), shape[0],
                shape[1], float(sigmas), lower, extent, radius)
    return torch.from_numpy(lower), torch.from_numpy(extent), torch.from_numpy(radius)


class GaussianTable(torch.autograd.Function):
    """:func:`ixgs.splat.gaussian_table` (no pose, no blur) in one pass per Gaussian, forward and
    backward: the (16, N) table from centres (N, 3) mm, scales (N, 3) mm, quaternions (N, 4) of any
    norm and densities (N,) 1/mm, seen from ``source`` (3,) mm. The torch version's ~20 elementwise
    passes over N and their autograd graph cost ~25 ms a render at 150k Gaussians."""

    @staticmethod
    def forward(ctx, means, scales, quaternions, densities, source):
        m, s, q, rho, src = arrays(means, scales, quaternions, densities, source)
        table = np.empty((16, m.shape[0]), dtype=m.dtype)
        _table_forward(m, s, q, rho, src, table, math.sqrt(2.0 * math.pi))
        ctx.save_for_backward(scales, quaternions)
        return torch.from_numpy(table)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_table):
        scales, quaternions = ctx.saved_tensors
        s, q, grad = arrays(scales, quaternions, grad_table.to(scales.dtype))
        n = s.shape[0]
        grads = (np.empty((n, 3), s.dtype), np.empty((n, 3), s.dtype), np.empty((n, 4), s.dtype), np.empty(n, s.dtype))
        _table_backward(s, q, grad, *grads, math.sqrt(2.0 * math.pi))
        return (*(torch.from_numpy(array) for array in grads), None)


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
