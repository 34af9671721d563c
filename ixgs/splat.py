"""Differentiable cone-beam rendering of radiative Gaussians: exact line integrals, summed.

For a ray ``o + t d`` (|d| = 1) and a Gaussian (m, S, rho), the line integral is
``rho sqrt(2 pi / a) exp(-1/2 q)`` with ``a = d^T S^-1 d`` and ``q = c - b^2 / a`` (DESIGN_NOTES).
``c - b^2 / a`` cancels catastrophically in float32 when the source is ~1000 mm away and scales are
~1 mm, so the renderer uses the equivalent cancellation-free form (Lagrange identity with
``S^-1 = L L^T``): with ``delta = o - m`` and ``e = delta x d`` (perpendicular offset, small),

    q = e^T S e / (det S * a).

Per Gaussian the renderer precomputes ``delta``, ``S / det S`` and ``S^-1`` (6 entries each) and
``rho sqrt(2 pi)``; per (Gaussian, pixel) pair it needs one cross product and two 6-term quadratic
forms. Pairs are those pixels inside the axis-aligned box of each Gaussian's projected k-sigma
ellipse (perspective Jacobian at the centre; only the box is approximate, every value is exact).
Rendering is additive, so pairs are summed with ``index_add_`` in any order. The per-pair kernel is
a custom autograd function that evaluates pairs in chunks sized to a memory budget and recomputes
them in its backward pass (keeping only their indices when they fit the budget), so autograd keeps
no per-pair tensors and a large case never holds more than the budget.

Speed (bench/kernel_profile.py, bench/results/profile-cpu.md): pairs come as flat pixel indices, chunks are
cache-sized on a CPU, the per-pair arithmetic is fused by hand (``addcmul``, in-place steps), and
``compile=True`` runs the same kernels through ``torch.compile`` (inductor: C++ on a CPU, Triton on
CUDA). The plain torch kernels are the reference and the fallback.
"""
from __future__ import annotations

import math
import os
import warnings

import torch

from .gaussians import GaussianModel
from .geometry import ViewRays
from .kernels.choice import kernel_module, resolve_kernel
from .pairs import box_pairs, clip_boxes

# The per-Gaussian table is transposed, (16, N): delta = source - mean (3), S / det S (6),
# S^-1 (6), rho sqrt(2 pi) (1); the pixel table is (3, pixels): the unit ray direction d. The per-pair
# kernel works on contiguous rows (P,), which on a CPU is several times faster than reducing over a
# short trailing axis; products of d are formed per pair (cheaper than gathering them).

# Pairs per chunk on a CPU: intermediates of ~0.5-1 MB per row stay in the caches (measured: 128k-512k
# pairs run 1.5-2x faster than 2M; bench/results/profile-cpu.md). Accelerators take what memory allows.
CPU_CHUNK_PAIRS = 262_144
# Bytes held per pair at once: float rows (times the float size) plus int64 indices; the backward pass keeps
# ~40 float rows and the pair enumeration a few integer ones (measured peak / pairs, with a margin).
_FLOAT_ROWS_PER_PAIR, _INDEX_BYTES_PER_PAIR = 64, 48


def pixel_table(directions: torch.Tensor) -> torch.Tensor:
    """(3, pixels) rows [d0, d1, d2] of unit ray directions (pixels, 3)."""
    return directions.T.contiguous()


def gaussian_table(model: GaussianModel, source: torch.Tensor, pose: torch.Tensor | None = None,
                   blur_mm2: torch.Tensor | None = None) -> torch.Tensor:
    """(16, N) per-Gaussian quantities the per-pair kernel needs, differentiable in the parameters
    (and in ``pose``, a (4, 4) rigid motion applied to the Gaussians before they are seen).

    ``blur_mm2`` (N,): isotropic variance added to each covariance with the mass kept (the density
    falls by the ratio of the square roots of the determinants), :func:`pixel_footprint_mm2`."""
    rotations, scales, means = model.rotations, model.scales, model.means
    if pose is not None:
        rotations = pose[:3, :3] @ rotations
        means = means @ pose[:3, :3].T + pose[:3, 3]
    peak = model.densities * math.sqrt(2.0 * math.pi)
    if blur_mm2 is None:
        inv_sq = scales ** -2
    else:
        inv_sq = 1.0 / (scales ** 2 + blur_mm2[:, None])
        peak = peak * (scales.prod(dim=1) * inv_sq.prod(dim=1).sqrt())
    # Eigenvalues of S / det S are 1 / (s_j s_k)^2: no determinant of a tiny number is formed.
    sdet = torch.stack([inv_sq[:, 1] * inv_sq[:, 2], inv_sq[:, 2] * inv_sq[:, 0], inv_sq[:, 0] * inv_sq[:, 1]], dim=1)
    return torch.cat([(source - means).T, symmetric6_from_eigen(rotations, sdet),
                      symmetric6_from_eigen(rotations, inv_sq), peak[None]], dim=0)


_SYMMETRIC6_ENTRIES = ((0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (2, 0))


def symmetric6_from_eigen(rotations: torch.Tensor, eigenvalues: torch.Tensor) -> torch.Tensor:
    """``symmetric6(R diag(lambda) R^T)`` (6, N), entry by entry on contiguous (N,) rows: cheaper than
    batched 3x3 matmuls, and ``unbind`` (not indexing) keeps the backward pass to one copy per input
    (each indexed entry's backward would zero-fill a whole (N, 3, 3) gradient)."""
    r = [row.unbind(0) for row in rotations.permute(1, 2, 0).contiguous().unbind(0)]  # r[i][k] = R[:, i, k]
    values = eigenvalues.T.contiguous().unbind(0)
    scaled = [[r[i][k] * values[k] for k in range(3)] for i in range(3)]
    return torch.stack([(scaled[i][0] * r[j][0]).addcmul_(scaled[i][1], r[j][1]).addcmul_(scaled[i][2], r[j][2])
                        * (1.0 if i == j else 2.0) for i, j in _SYMMETRIC6_ENTRIES], dim=0)


def quadratic_form6(coefficients, x) -> torch.Tensor:
    """``x^T M x`` row by row: ``M`` as its 6 :func:`symmetric6_from_eigen` rows, ``x`` as 3 rows."""
    c = coefficients
    return ((c[0] * x[0]).addcmul_(c[3], x[1]).mul_(x[0]) + (c[1] * x[1]).addcmul_(c[4], x[2]).mul_(x[1])
            + (c[2] * x[2]).addcmul_(c[5], x[0]).mul_(x[2]))


def _pair_terms(g, d):
    """Per pair: the exact line integral and the intermediates its gradient needs.

    ``g`` 16 gathered Gaussian rows (P,), ``d`` 3 gathered ray-direction rows (P,). Written with
    fused ``addcmul`` and in-place steps: on a CPU each pass over the pairs costs memory bandwidth.
    """
    e0 = torch.addcmul(g[1] * d[2], g[2], d[1], value=-1.0)  # e = delta x d: the ray's perpendicular offset
    e1 = torch.addcmul(g[2] * d[0], g[0], d[2], value=-1.0)
    e2 = torch.addcmul(g[0] * d[1], g[1], d[0], value=-1.0)
    # q_perp = e^T (S / det S) e = e0 (g3 e0 + g6 e1) + e1 (g4 e1 + g7 e2) + e2 (g5 e2 + g8 e0)
    q_perp = (g[3] * e0).addcmul_(g[6], e1).mul_(e0)
    q_perp.addcmul_((g[4] * e1).addcmul_(g[7], e2), e1).addcmul_((g[5] * e2).addcmul_(g[8], e0), e2)
    # a = d^T S^-1 d, the same way
    a = (g[9] * d[0]).addcmul_(g[12], d[1]).mul_(d[0])
    a.addcmul_((g[10] * d[1]).addcmul_(g[13], d[2]), d[1]).addcmul_((g[11] * d[2]).addcmul_(g[14], d[0]), d[2])
    unit = torch.exp(q_perp.div(a).mul_(-0.5)).mul_(torch.rsqrt(a))
    return unit * g[15], unit, (e0, e1, e2), q_perp, a


def _gather(rows: torch.Tensor, index: torch.Tensor) -> list[torch.Tensor]:
    """Columns ``index`` of a (K, M) table as K contiguous (P,) rows (row by row is faster on CPU
    than one strided ``index_select`` along dim 1)."""
    return [row.index_select(0, index) for row in rows]


def _forward_chunk(table, pixels, gauss, pix, image) -> None:
    """Add the line integrals of the pairs (gauss, pix) to the flat image, in place."""
    value = _pair_terms(_gather(table, gauss), _gather(pixels, pix))[0]
    image.index_add_(0, pix, value)


def _backward_terms(table, pixels, gauss, pix, grad_image) -> list[torch.Tensor]:
    """The pairs' (gauss, pix) contributions to d loss / d table: 16 rows (P,), one per table row."""
    g, d = _gather(table, gauss), _gather(pixels, pix)
    value, unit, (e0, e1, e2), q_perp, a = _pair_terms(g, d)
    grad_value = grad_image.index_select(0, pix)
    grad_q = (grad_value * value).div_(a)  # d loss / d q_perp = -0.5 grad_value value / a
    grad_a = (q_perp.div_(a).sub_(1.0)).mul_(grad_q).mul_(0.5)  # d loss / d a = 0.5 (q / a - 1) grad_value value / a
    grad_q.mul_(-0.5)
    # d q_perp / d e = 2 (S / det S) e (off-diagonal coefficients are stored doubled).
    ge0 = (2.0 * g[3] * e0).addcmul_(g[6], e1).addcmul_(g[8], e2).mul_(grad_q)
    ge1 = (2.0 * g[4] * e1).addcmul_(g[6], e0).addcmul_(g[7], e2).mul_(grad_q)
    ge2 = (2.0 * g[5] * e2).addcmul_(g[7], e1).addcmul_(g[8], e0).mul_(grad_q)
    qe0, qe1, qe2 = grad_q * e0, grad_q * e1, grad_q * e2
    ad0, ad1, ad2 = grad_a * d[0], grad_a * d[1], grad_a * d[2]
    return [
        torch.addcmul(d[1] * ge2, d[2], ge1, value=-1.0),  # d x grad_e
        torch.addcmul(d[2] * ge0, d[0], ge2, value=-1.0),
        torch.addcmul(d[0] * ge1, d[1], ge0, value=-1.0),
        qe0 * e0, qe1 * e1, qe2 * e2, qe0 * e1, qe1 * e2, qe2 * e0,
        ad0 * d[0], ad1 * d[1], ad2 * d[2], ad0 * d[1], ad1 * d[2], ad2 * d[0],
        grad_value * unit,
    ]


def _backward_rows(table, pixels, gauss, pix, grad_image) -> torch.Tensor:
    """(P, 16) :func:`_backward_terms` as rows: what a fused (compiled) kernel writes in one pass."""
    return torch.stack(_backward_terms(table, pixels, gauss, pix, grad_image), dim=1)


def _accumulate(grad_table: torch.Tensor, gauss: torch.Tensor, terms) -> None:
    """grad_table (16, N) += the pair terms at gauss. Plain: 16 ``index_add_`` of rows (stacking them
    would cost more than it saves); compiled: one (P, 16) block, added whole rows at a time (CPU:
    ``index_put_``, ~2x faster than 16 row ``index_add_``; CUDA: ``index_add_``, atomics)."""
    if isinstance(terms, list):
        for row, term in zip(grad_table, terms):
            row.index_add_(0, gauss, term)
    elif grad_table.device.type == "cpu":
        grad_table.T.index_put_((gauss,), terms, accumulate=True)
    else:
        grad_table.T.index_add_(0, gauss, terms)


_COMPILED: dict[str, object] = {}


_PLAIN = {"forward": _forward_chunk, "backward": _backward_terms}
_FUSED = {"forward": _forward_chunk, "backward": _backward_rows}


def _run_chunk(kernel: str, compiled: bool, *args):
    """One chunk through the plain torch kernel (the reference) or its ``torch.compile``d twin (fused,
    built on first use). A compiled kernel that cannot be built (no C compiler, unsupported platform)
    switches this process to the plain kernels, with a warning; it fails before touching any output."""
    if compiled and not _COMPILED.get("failed"):
        try:
            if kernel not in _COMPILED:
                _COMPILED[kernel] = torch.compile(_FUSED[kernel], dynamic=True)
            return _COMPILED[kernel](*args)
        except Exception as error:  # compilation errors come in many types; the plain path is exact
            _COMPILED["failed"] = True
            warnings.warn(f"torch.compile of the splat kernels failed, using plain torch: {error!r:.300}")
    return _PLAIN[kernel](*args)


def memory_budget_pairs(memory_bytes: int, dtype: torch.dtype) -> int:
    """The most (Gaussian, pixel) pairs one chunk may hold within ``memory_bytes`` (forward or backward)."""
    per_pair = _FLOAT_ROWS_PER_PAIR * torch.finfo(dtype).bits // 8 + _INDEX_BYTES_PER_PAIR
    return max(1, int(memory_bytes) // per_pair)


def default_memory_budget(device: torch.device) -> int:
    """Bytes the pair chunks may use at once: a quarter of the free memory of ``device`` (CUDA:
    ``mem_get_info``; CPU: available RAM), at most 4 GiB; 1 GiB where free memory cannot be read."""
    free = None
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):  # e.g. Windows
            free = None
    if not free or free <= 0:
        free = 4 * 2 ** 30
    return int(min(free // 4, 4 * 2 ** 30))


def chunk_pairs(device: torch.device, dtype: torch.dtype, memory_budget: int | None = None) -> int:
    """Pairs per chunk: within ``memory_budget`` bytes (default :func:`default_memory_budget`), and on
    a CPU at most :data:`CPU_CHUNK_PAIRS` (faster: cache-sized)."""
    budget = default_memory_budget(device) if memory_budget is None else memory_budget
    pairs = memory_budget_pairs(budget, dtype)
    return min(pairs, CPU_CHUNK_PAIRS) if device.type == "cpu" else pairs


class _LineIntegrals(torch.autograd.Function):
    """Image (rows * cols,) = sum over footprint pairs of the exact line integrals.

    The forward pass keeps the enumerated pairs for the backward pass while they take at most
    ``keep_bytes`` (16 bytes a pair); beyond that the backward pass enumerates them again."""

    @staticmethod
    def forward(ctx, table, pixels, lower, extent, shape, pair_budget, compiled, keep_bytes):
        image = torch.zeros(shape[0] * shape[1], dtype=table.dtype, device=table.device)
        kept, kept_pairs = [], 0
        for gauss, pix in box_pairs(lower, extent, shape, pair_budget, flat=True):
            _run_chunk("forward", compiled, table, pixels, gauss, pix, image)
            kept_pairs += gauss.numel()
            if kept is not None and 16 * kept_pairs <= keep_bytes:
                kept.append((gauss, pix))
            else:
                kept = None
        ctx.save_for_backward(table, pixels, lower, extent)
        ctx.shape, ctx.pair_budget, ctx.compiled, ctx.kept = shape, pair_budget, compiled, kept
        return image

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_image):
        table, pixels, lower, extent = ctx.saved_tensors
        # The compiled kernels add whole (16,) columns: store (16, N) as the transpose of (N, 16) for them.
        if ctx.compiled:
            grad_table = torch.zeros(table.shape[1], table.shape[0], dtype=table.dtype, device=table.device).T
        else:
            grad_table = torch.zeros_like(table)
        grad_image = grad_image.contiguous()
        chunks = ctx.kept if ctx.kept is not None else box_pairs(lower, extent, ctx.shape, ctx.pair_budget, flat=True)
        for gauss, pix in chunks:
            _accumulate(grad_table, gauss, _run_chunk("backward", ctx.compiled, table, pixels, gauss, pix, grad_image))
        ctx.kept = None
        return grad_table, None, None, None, None, None, None, None


def pixel_footprint_mm2(means: torch.Tensor, projection_matrix: torch.Tensor) -> torch.Tensor:
    """(N,) variance (mm^2) of one detector pixel seen at each point ``means`` (N, 3): a box of one
    pixel has variance 1/12 px^2 along each detector axis, and a pixel spans ``det(J J^T)^(-1/4)`` mm
    there (J the Jacobian of the pixel coordinates at the point, px/mm).

    A view's pixel is the mean over its area (a real detector, and ``ixgs simulate``); the exact line
    integral is taken along the pixel's central ray. Adding this variance to a Gaussian (mass kept)
    convolves its image across the ray with a Gaussian of the box's variance, so the model sees the
    views as blurred as they are and need not blur the volume to match them."""
    P = projection_matrix
    uvw = means @ P[:, :3].T + P[:, 3]
    w = uvw[:, 2].clamp(min=1e-6)
    uv = uvw[:, :2] / w[:, None]
    jacobian = (P[None, :2, :3] - uv[:, :, None] * P[None, 2:3, :3]) / w[:, None, None]  # (N, 2, 3)
    gram = jacobian @ jacobian.transpose(1, 2)
    det = (gram[:, 0, 0] * gram[:, 1, 1] - gram[:, 0, 1] * gram[:, 1, 0]).clamp(min=1e-30)
    return det.rsqrt() / 12.0


@torch.no_grad()
def footprints(model: GaussianModel, projection_matrix: torch.Tensor, shape: tuple[int, int],
               sigmas: float, blur_mm2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixel boxes (lower (N, 2), extent (N, 2) as (row, col)) of each Gaussian's projected
    ``sigmas``-sigma ellipse, and the radius in pixels (0 where culled: behind or too close to the
    source, or off the image); ``blur_mm2`` as for :func:`gaussian_table`."""
    means, scales = model.means, model.scales
    if blur_mm2 is not None:
        scales = (scales ** 2 + blur_mm2[:, None]).sqrt()
    covariance = symmetric6_from_eigen(model.rotations, scales ** 2)
    P = projection_matrix
    uvw = means @ P[:, :3].T + P[:, 3]
    w = uvw[:, 2]
    in_front = w > sigmas * scales.max(dim=1).values  # whole k-sigma ellipsoid before the source plane
    w_safe = torch.where(in_front, w, torch.ones_like(w))
    uv = uvw[:, :2] / w_safe[:, None]
    # Variance of u and v: quadratic forms of the rows of the Jacobian of (u, v) at the centre.
    variance = torch.stack([quadratic_form6(covariance, [(P[a, i] - uv[:, a] * P[2, i]) / w_safe for i in range(3)])
                            for a in range(2)], dim=1)
    radius_uv = sigmas * variance.clamp(min=0).sqrt()
    rows, cols = shape
    limit = torch.tensor([cols, rows], dtype=uv.dtype, device=uv.device)
    lo = torch.ceil(uv - radius_uv).clamp(min=-1.0).minimum(limit)
    hi = torch.floor(uv + radius_uv).clamp(min=-1.0).minimum(limit)
    lower = lo.flip(1).to(torch.int64)
    extent = (hi - lo + 1).clamp(min=0).flip(1).to(torch.int64)
    extent = torch.where(in_front[:, None], extent, torch.zeros_like(extent))
    visible = (clip_boxes(lower, extent, shape)[1].prod(dim=1) > 0)
    radius = torch.where(visible, radius_uv.max(dim=1).values, torch.zeros_like(w))
    return lower, extent, radius


def render(model: GaussianModel, rays: ViewRays, pair_budget: int | None = None, sigmas: float = 3.0,
           return_radii: bool = False, pose: torch.Tensor | None = None, *, memory_budget: int | None = None,
           compile: bool = False, kernel: str = "torch", pixel_footprint: bool = False):
    """Attenuation line integrals (rows, cols) of the model seen along ``rays``; differentiable.

    Each Gaussian contributes its exact cone-beam line integral to the pixels inside its projected
    ``sigmas``-sigma box; outside it a Gaussian's image is below about ``exp(-sigmas^2 / 2)`` of its
    peak (1.1 % at 3 sigma, 0.03 % at 4; the box comes from the projected covariance at the centre).
    With ``return_radii`` also returns (N,) footprint radii in pixels, 0 for Gaussians that touch
    no pixel (for densification statistics). ``pose`` (4, 4), a rigid motion
    of the world as this view sees it (the view's projection matrix becomes ``P @ pose``), is
    differentiable: it is how per-view pose corrections are learned (:mod:`ixgs.poses`).

    Pairs are processed in chunks of ``pair_budget`` pairs; by default the chunk is sized from
    ``memory_budget`` bytes (default: a quarter of the free memory, :func:`chunk_pairs`), so a large
    case never holds more than that at once. ``compile=True`` runs the per-pair kernels through
    ``torch.compile`` (fused: ~2x faster, after a one-off compilation of tens of seconds); where that
    cannot work it falls back to the plain torch kernels, which are the reference.

    ``kernel`` picks who evaluates the pairs (:func:`ixgs.kernels.choice.resolve_kernel`): "torch"
    (the chunked pairs above, the reference), "numba" (CPU) or "triton" (CUDA), which never hold
    pairs in memory (``pair_budget``, ``memory_budget`` and ``compile`` then do not apply), or "auto".

    ``pixel_footprint``: each pixel is the mean over its area rather than its central ray, to a
    Gaussian approximation (:func:`pixel_footprint_mm2`).
    """
    dtype, device = model.support_center.dtype, model.support_center.device
    shape = rays.shape
    P = rays.projection_matrix.to(device, dtype)
    source = rays.source.to(device, dtype)
    directions = rays.directions.to(device, dtype).reshape(-1, 3)
    if pose is not None:
        pose = pose.to(device, dtype)
        P = P @ pose.detach()
    budget = default_memory_budget(device) if memory_budget is None else int(memory_budget)
    if pair_budget is None:
        pair_budget = chunk_pairs(device, dtype, budget)
    blur = pixel_footprint_mm2(model.means.detach(), P) if pixel_footprint else None
    kernel = resolve_kernel(kernel, device)
    module = kernel_module(kernel) if kernel != "torch" else None
    # numba also forms the boxes and the table in one pass per Gaussian (torch's ~20 passes over N cost
    # as much as the pairs do at 150k Gaussians); not with a pixel footprint, nor the table with a pose.
    fused = hasattr(module, "GaussianTable") and blur is None
    if fused:
        means, scales = model.means, model.scales  # formed once for the boxes and the table
        lower, extent, radius = module.footprints(means, scales, model._rotation, P, shape, sigmas)
    else:
        lower, extent, radius = footprints(model, P, shape, sigmas, blur)
    if fused and pose is None:
        table = module.GaussianTable.apply(means, scales, model._rotation, model.densities, source)
    else:
        table = gaussian_table(model, source, pose, blur)
    if module is not None:
        image = module.LineIntegrals.apply(table, pixel_table(directions), lower, extent, shape)
        image = image.reshape(shape)
        return (image, radius) if return_radii else image
    # Half the budget may keep the pairs' indices for the backward pass (none is needed without one).
    keep_bytes = budget // 2 if torch.is_grad_enabled() and table.requires_grad else 0
    image = _LineIntegrals.apply(table, pixel_table(directions), lower, extent, shape, int(pair_budget),
                                 bool(compile), keep_bytes).reshape(shape)
    return (image, radius) if return_radii else image


@torch.no_grad()
def count_pairs(model: GaussianModel, rays: ViewRays, sigmas: float = 3.0) -> int:
    """Number of (Gaussian, pixel) pairs a render visits: its cost, for budgeting."""
    dtype, device = model.support_center.dtype, model.support_center.device
    lower, extent, _ = footprints(model, rays.projection_matrix.to(device, dtype), rays.shape, sigmas)
    return int(clip_boxes(lower, extent, rays.shape)[1].prod(dim=1).sum())
