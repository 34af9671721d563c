"""The attenuation field of the Gaussians sampled on a voxel grid (differentiable).

``field(x) = sum_g rho_g exp(-1/2 (x - m_g)^T S_g^-1 (x - m_g))`` at voxel centres, visiting only
the voxels inside each Gaussian's axis-aligned k-sigma box (:mod:`ixgs.pairs`, D = 3). A
``region`` (block of the grid) is voxelized on its own, touching only the Gaussians whose box
overlaps it: this is what makes a 3D TV term on random 32^3 patches cheap.
"""
from __future__ import annotations

import torch

from .gaussians import GaussianModel, symmetric6
from .geometry import Grid
from .pairs import box_pairs


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


def voxelize(model: GaussianModel, grid: Grid, pair_budget: int = 4_000_000, region=None,
             sigmas: float = 3.0) -> torch.Tensor:
    """Attenuation (1/mm) at the voxel centres of ``grid`` (or of ``region`` of it), (nz, ny, nx).

    ``region``: tuple of 3 slices (z, y, x) with step 1; the result then has the block's shape and
    equals the same block of the full voxelization. Each Gaussian is truncated to its ``sigmas``
    box (at 3 sigma the lost mass is below 0.8 %).
    """
    start, shape = _region_bounds(grid.shape, region)
    dtype, device = model.support_center.dtype, model.support_center.device
    origin = torch.as_tensor(grid.origin, dtype=dtype, device=device)
    spacing = torch.as_tensor(grid.spacing, dtype=dtype, device=device)
    block_origin = origin + spacing * torch.as_tensor(start[::-1], dtype=dtype, device=device)
    means = model.means
    inverse = model.inverse_covariances()
    coefficients = symmetric6(inverse)
    densities = model.densities
    with torch.no_grad():
        radius = sigmas * torch.diagonal(model.covariances(), dim1=1, dim2=2).sqrt()  # (N, 3) x, y, z mm
        lower_xyz = torch.ceil((means - radius - block_origin) / spacing)
        upper_xyz = torch.floor((means + radius - block_origin) / spacing)
        limit = torch.as_tensor(shape[::-1], dtype=dtype, device=device)
        lower_xyz = lower_xyz.clamp(min=-1.0).minimum(limit)
        upper_xyz = upper_xyz.clamp(min=-1.0).minimum(limit)
        lower = lower_xyz.flip(1).to(torch.int64)
        extent = (upper_xyz - lower_xyz + 1).clamp(min=0).flip(1).to(torch.int64)
    volume = torch.zeros(shape[0] * shape[1] * shape[2], dtype=dtype, device=device)
    for gauss, cell in box_pairs(lower, extent, shape, pair_budget):
        # Offsets (mm) of the voxel centres from the Gaussian centres, per axis x, y, z.
        x = [block_origin[a] + spacing[a] * cell[:, 2 - a] - means[gauss, a] for a in range(3)]
        c = coefficients[:, gauss]
        q = c[0] * x[0] * x[0] + c[1] * x[1] * x[1] + c[2] * x[2] * x[2] \
            + c[3] * x[0] * x[1] + c[4] * x[1] * x[2] + c[5] * x[2] * x[0]
        flat = (cell[:, 0] * shape[1] + cell[:, 1]) * shape[2] + cell[:, 2]
        volume.index_add_(0, flat, densities[gauss] * torch.exp(-0.5 * q))
    return volume.reshape(shape)
