"""Triton (CUDA) kernels of the renderer: the exact line integrals with no (Gaussian, pixel) pair tensors.

Same inputs and math as :mod:`ixgs.splat` (the reference) and the numba kernels: one program per
Gaussian walks its clipped pixel box in blocks of ``BLOCK`` pixels. Forward: atomic adds into the
image (rendering is additive, any order); backward: the program reads the pixel gradients of its
footprint and writes its own 16 table gradients (no conflicts). With ``TRITON_INTERPRET=1`` set
before triton is imported the same kernels run on a CPU with numpy (how the tests exercise them).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs

INTERPRETED = bool(knobs.runtime.interpret)
BLOCK = 128


@triton.jit
def _box(lower, extent, g, rows, cols):
    """Gaussian ``g``'s clipped box: first row, first column, width and number of pixels."""
    r0 = tl.maximum(tl.load(lower + 2 * g), 0)
    c0 = tl.maximum(tl.load(lower + 2 * g + 1), 0)
    r1 = tl.minimum(tl.load(lower + 2 * g) + tl.load(extent + 2 * g), rows)
    c1 = tl.minimum(tl.load(lower + 2 * g + 1) + tl.load(extent + 2 * g + 1), cols)
    width = tl.maximum(c1 - c0, 0)
    return r0, c0, width, tl.maximum(r1 - r0, 0) * width


@triton.jit
def _pair(table, pixels, n, pixel_count, g, p, mask):
    """The pixels ``p`` of Gaussian ``g``: direction, perpendicular offset, quadratic forms, unit integral."""
    d0 = tl.load(pixels + p, mask=mask, other=1.0)  # masked lanes get a valid ray: no 0 / 0
    d1 = tl.load(pixels + pixel_count + p, mask=mask, other=0.0)
    d2 = tl.load(pixels + 2 * pixel_count + p, mask=mask, other=0.0)
    t0, t1, t2 = tl.load(table + g), tl.load(table + n + g), tl.load(table + 2 * n + g)
    e0 = t1 * d2 - t2 * d1  # e = delta x d: the ray's perpendicular offset
    e1 = t2 * d0 - t0 * d2
    e2 = t0 * d1 - t1 * d0
    q = (e0 * (tl.load(table + 3 * n + g) * e0 + tl.load(table + 6 * n + g) * e1)
         + e1 * (tl.load(table + 4 * n + g) * e1 + tl.load(table + 7 * n + g) * e2)
         + e2 * (tl.load(table + 5 * n + g) * e2 + tl.load(table + 8 * n + g) * e0))
    a = (d0 * (tl.load(table + 9 * n + g) * d0 + tl.load(table + 12 * n + g) * d1)
         + d1 * (tl.load(table + 10 * n + g) * d1 + tl.load(table + 13 * n + g) * d2)
         + d2 * (tl.load(table + 11 * n + g) * d2 + tl.load(table + 14 * n + g) * d0))
    unit = tl.exp(-0.5 * q / a) / tl.sqrt(a)
    return d0, d1, d2, e0, e1, e2, q, a, unit


@triton.jit
def _forward(table, pixels, lower, extent, image, n, pixel_count, rows, cols, BLOCK: tl.constexpr):
    g = tl.program_id(0)
    r0, c0, width, area = _box(lower, extent, g, rows, cols)
    peak = tl.load(table + 15 * n + g)
    for start in range(0, area, BLOCK):
        i = start + tl.arange(0, BLOCK)
        mask = i < area
        p = (r0 + i // width) * cols + c0 + i % width
        unit = _pair(table, pixels, n, pixel_count, g, p, mask)[8]
        tl.atomic_add(image + p, peak * unit, mask=mask)


@triton.jit
def _backward(table, pixels, lower, extent, grad_image, grad_table, n, pixel_count, rows, cols,
              BLOCK: tl.constexpr):
    g = tl.program_id(0)
    r0, c0, width, area = _box(lower, extent, g, rows, cols)
    peak = tl.load(table + 15 * n + g)
    s3, s4, s5 = tl.load(table + 3 * n + g), tl.load(table + 4 * n + g), tl.load(table + 5 * n + g)
    s6, s7, s8 = tl.load(table + 6 * n + g), tl.load(table + 7 * n + g), tl.load(table + 8 * n + g)
    zero = tl.zeros([BLOCK], dtype=table.dtype.element_ty)
    a0, a1, a2, a3, a4, a5, a6, a7 = zero, zero, zero, zero, zero, zero, zero, zero
    a8, a9, a10, a11, a12, a13, a14, a15 = zero, zero, zero, zero, zero, zero, zero, zero
    for start in range(0, area, BLOCK):
        i = start + tl.arange(0, BLOCK)
        mask = i < area
        p = (r0 + i // width) * cols + c0 + i % width
        d0, d1, d2, e0, e1, e2, q, a, unit = _pair(table, pixels, n, pixel_count, g, p, mask)
        weighted = tl.load(grad_image + p, mask=mask, other=0.0) * unit
        gq = weighted * peak / a
        ga = 0.5 * (q / a - 1.0) * gq  # d loss / d a
        gq = -0.5 * gq  # d loss / d q
        # d q / d e = 2 (S / det S) e (off-diagonal coefficients are stored doubled).
        ge0 = (2.0 * s3 * e0 + s6 * e1 + s8 * e2) * gq
        ge1 = (2.0 * s4 * e1 + s6 * e0 + s7 * e2) * gq
        ge2 = (2.0 * s5 * e2 + s7 * e1 + s8 * e0) * gq
        a0 += d1 * ge2 - d2 * ge1  # d x grad_e
        a1 += d2 * ge0 - d0 * ge2
        a2 += d0 * ge1 - d1 * ge0
        a3 += gq * e0 * e0
        a4 += gq * e1 * e1
        a5 += gq * e2 * e2
        a6 += gq * e0 * e1
        a7 += gq * e1 * e2
        a8 += gq * e2 * e0
        a9 += ga * d0 * d0
        a10 += ga * d1 * d1
        a11 += ga * d2 * d2
        a12 += ga * d0 * d1
        a13 += ga * d1 * d2
        a14 += ga * d2 * d0
        a15 += weighted
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
    tl.store(grad_table + 10 * n + g, tl.sum(a10, axis=0))
    tl.store(grad_table + 11 * n + g, tl.sum(a11, axis=0))
    tl.store(grad_table + 12 * n + g, tl.sum(a12, axis=0))
    tl.store(grad_table + 13 * n + g, tl.sum(a13, axis=0))
    tl.store(grad_table + 14 * n + g, tl.sum(a14, axis=0))
    tl.store(grad_table + 15 * n + g, tl.sum(a15, axis=0))


class LineIntegrals(torch.autograd.Function):
    """Flat image (rows * cols,) of the line integrals; gradient with respect to the (16, N) table."""

    @staticmethod
    def forward(ctx, table, pixels, lower, extent, shape):
        rows, cols = shape
        table, pixels = table.detach().contiguous(), pixels.contiguous()
        lower, extent = lower.contiguous(), extent.contiguous()
        image = torch.zeros(rows * cols, dtype=table.dtype, device=table.device)
        n = table.shape[1]
        if n:
            _forward[(n,)](table, pixels, lower, extent, image, n, rows * cols, rows, cols, BLOCK=BLOCK)
        ctx.save_for_backward(table, pixels, lower, extent)
        ctx.shape = shape
        return image

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_image):
        table, pixels, lower, extent = ctx.saved_tensors
        rows, cols = ctx.shape
        grad_table = torch.zeros_like(table)
        n = table.shape[1]
        if n:
            _backward[(n,)](table, pixels, lower, extent, grad_image.to(table.dtype).contiguous(), grad_table, n,
                            rows * cols, rows, cols, BLOCK=BLOCK)
        return grad_table, None, None, None, None
