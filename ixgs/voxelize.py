"""The attenuation field of the Gaussians sampled on a voxel grid (differentiable).

``field(x) = sum_g rho_g exp(-1/2 (x - m_g)^T S_g^-1 (x - m_g))`` at voxel centres, visiting only
the voxels inside each Gaussian's axis-aligned k-sigma box (:mod:`ixgs.pairs`, D = 3). A
``region`` (block of the grid) is voxelized on its own, touching only the Gaussians whose box
overlaps it: this is what makes a 3D TV term on random 32^3 patches cheap.
"""
from __future__ import annotations

import torch

from .gaussians import GaussianModel
from .geometry import Grid
from .pairs import box_pairs, clip_boxes
from .splat import chunk_pairs, symmetric6_from_eigen


def _region_bounds(shape: tuple[int, int, int], region) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(start, shape) of a (z, y, x) block given as a tuple of 3 unit-step slices, or the whole grid."""
    if region is None:
        return (0, 0, 0), tuple(shape)
    if len(region) != 3 or not all(isinstance(s, slice) for s in region):
        raise ValueError(f"region must be a tuple of 3 slices (z, y, x), got {region!r}")
    start, size = [], []
    for axis, (s, n) in enumerate(zip(region, shape)):
        lo, hi, step = s.indices(n)
        if step != 1 or hi <= lo:
            raise ValueError(f"region slice {s} on axis {axis} must be non-empty with step 1 (grid size {n})")
        start.append(lo)
        size.append(hi - lo)
    return tuple(start), tuple(size)


def voxelize(model: GaussianModel, grid: Grid, pair_budget: int | None = None, region=None,
             sigmas: float = 3.0, *, memory_budget: int | None = None) -> torch.Tensor:
    """Attenuation (1/mm) at the voxel centres of ``grid`` (or of ``region`` of it), (nz, ny, nx).

    ``region``: tuple of 3 slices (z, y, x) with step 1; the result then has the block's shape and
    equals the same block of the full voxelization. Each Gaussian is truncated to its ``sigmas``
    box (at 3 sigma the lost mass is below 0.8 %). Only the Gaussians whose box meets the block are
    evaluated (and carry gradients): a small TV patch costs what its neighbourhood costs.

    (Gaussian, voxel) pairs are evaluated in chunks of ``pair_budget`` pairs, by default sized from
    ``memory_budget`` bytes as the renderer does (:func:`ixgs.splat.chunk_pairs`). Without gradients
    that bounds the memory; with gradients autograd keeps a few rows per pair of every chunk.
    """
    start, shape = _region_bounds(grid.shape, region)
    dtype, device = model.support_center.dtype, model.support_center.device
    origin = torch.as_tensor(grid.origin, dtype=dtype, device=device)
    spacing = torch.as_tensor(grid.spacing, dtype=dtype, device=device)
    block_origin = origin + spacing * torch.as_tensor(start[::-1], dtype=dtype, device=device)
    means, rotations, scales = model.means, model.rotations, model.scales
    with torch.no_grad():
        # Box half-sides (mm) along x, y, z: sigmas x the standard deviation along each axis.
        radius = sigmas * ((rotations * scales[:, None, :]) ** 2).sum(dim=2).sqrt()
        lower_xyz = torch.ceil((means - radius - block_origin) / spacing)
        upper_xyz = torch.floor((means + radius - block_origin) / spacing)
        limit = torch.as_tensor(shape[::-1], dtype=dtype, device=device)
        lower_xyz = lower_xyz.clamp(min=-1.0).minimum(limit)
        upper_xyz = upper_xyz.clamp(min=-1.0).minimum(limit)
        lower = lower_xyz.flip(1).to(torch.int64)
        extent = (upper_xyz - lower_xyz + 1).clamp(min=0).flip(1).to(torch.int64)
        touching = torch.nonzero(clip_boxes(lower, extent, shape)[1].prod(dim=1) > 0).squeeze(1)
    # Offsets of the voxel centres from the Gaussian centres are spacing x cell - (mean - block origin).
    centres = (means.index_select(0, touching) - block_origin).T
    coefficients = symmetric6_from_eigen(rotations.index_select(0, touching), scales.index_select(0, touching) ** -2)
    densities = model.densities.index_select(0, touching)
    if pair_budget is None:
        pair_budget = chunk_pairs(device, dtype, memory_budget)
    volume = torch.zeros(shape[0] * shape[1] * shape[2], dtype=dtype, device=device)
    for local, cell in box_pairs(lower.index_select(0, touching), extent.index_select(0, touching), shape, pair_budget):
        # Offsets (mm) of the voxel centres from the Gaussian centres, per axis x, y, z.
        x = [spacing[a] * cell[:, 2 - a] - centres[a].index_select(0, local) for a in range(3)]
        c = [row.index_select(0, local) for row in coefficients]
        q = (c[0] * x[0]).addcmul(c[3], x[1]).mul(x[0]) + (c[1] * x[1]).addcmul(c[4], x[2]).mul(x[1]) \
            + (c[2] * x[2]).addcmul(c[5], x[0]).mul(x[2])
        flat = (cell[:, 0] * shape[1] + cell[:, 1]) * shape[2] + cell[:, 2]
        volume.index_add_(0, flat, densities.index_select(0, local) * torch.exp(-0.5 * q))
    return volume.reshape(shape)
