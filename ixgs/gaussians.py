"""Radiative 3D Gaussians (R2-Gaussian style): the model that is optimised.

Each Gaussian is ``rho * exp(-1/2 (x - m)^T S^-1 (x - m))`` with ``S = R diag(s^2) R^T``; the
attenuation field (1/mm) is their sum. Parameters are stored in optimiser-friendly form:

* centre normalised to the support box: ``m = support_center + half_extent * position`` with one
  scalar ``half_extent = max(support size) / 2`` (R2-Gaussian normalises the scene to [-1, 1]^3 with
  a single factor, so learning rates are the same along every axis);
* scale through a sigmoid, bounded to [0.0005, 0.5] x the support's largest side;
* rotation as a quaternion (w, x, y, z), normalised on use;
* density through a softplus, so it stays positive.

A Gaussian's mass (its integral over space, 1/mm x mm^3 = mm^2) is
``rho (2 pi)^(3/2) s_0 s_1 s_2``; adaptive control conserves it (:meth:`GaussianModel.densify_and_prune`).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .geometry import Grid, Roi

SCALE_BOUNDS = (0.0005, 0.5)  # fraction of the support's largest side
PARAMETER_NAMES = ("position", "scale", "rotation", "density")
# Kernel volume of a unit Gaussian: integral of exp(-1/2 |x|^2) over R^3.
UNIT_KERNEL_VOLUME = (2.0 * math.pi) ** 1.5
# A split shrinks the largest scale by 1.6 (R2-Gaussian's factor); the children sit at +-SPLIT_OFFSET x
# that scale along its axis, which keeps the pair's covariance the parent's: k^2 + (1 / 1.6)^2 = 1.
SPLIT_SHRINK = 1.6
SPLIT_OFFSET = math.sqrt(1.0 - SPLIT_SHRINK ** -2)
# The deterministic start fits densities to the voxelized sum truncated, like ixgs.voxelize.voxelize's
# default, at this many sigmas.
KERNEL_SIGMAS = 3.0


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """x with softplus(x) = y, stable for small and large y > 0."""
    return y + torch.log(-torch.expm1(-y))


def quaternion_to_matrix(quaternions: torch.Tensor) -> torch.Tensor:
    """(N, 4) quaternions (w, x, y, z), any norm -> (N, 3, 3) rotation matrices."""
    w, x, y, z = F.normalize(quaternions, dim=-1).unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=-1).reshape(-1, 3, 3)


def symmetric_from_eigen(rotations: torch.Tensor, eigenvalues: torch.Tensor) -> torch.Tensor:
    """R diag(lambda) R^T for (N, 3, 3) R and (N, 3) lambda."""
    return (rotations * eigenvalues[:, None, :]) @ rotations.transpose(1, 2)


def symmetric6(matrices: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) symmetric -> (6, N) coefficients of x^T M x on [x0^2, x1^2, x2^2, x0x1, x1x2, x2x0]
    (off-diagonals doubled): the per-pair kernels evaluate quadratic forms row by row."""
    m = matrices
    return torch.stack([m[:, 0, 0], m[:, 1, 1], m[:, 2, 2],
                        2 * m[:, 0, 1], 2 * m[:, 1, 2], 2 * m[:, 2, 0]], dim=0)


class GaussianModel(nn.Module):
    """N anisotropic 3D Gaussians whose sum is the attenuation volume (1/mm, LPS mm)."""

    def __init__(self, means: torch.Tensor, scales: torch.Tensor, rotations: torch.Tensor,
                 densities: torch.Tensor, support: Roi):
        """``means`` (N, 3) mm, ``scales`` (N, 3) mm, ``rotations`` (N, 4) quaternions,
        ``densities`` (N,) peak values in 1/mm; ``support`` the box that bounds the centres."""
        super().__init__()
        n = means.shape[0]
        for name, tensor, shape in (("means", means, (n, 3)), ("scales", scales, (n, 3)),
                                    ("rotations", rotations, (n, 4)), ("densities", densities, (n,))):
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
        if min(support.size) <= 0:
            raise ValueError(f"support size must be positive, got {support.size}")
        dtype = means.dtype if means.is_floating_point() else torch.get_default_dtype()
        device = means.device
        self.register_buffer("support_center", torch.as_tensor(support.center, dtype=dtype, device=device))
        self.register_buffer("support_size", torch.as_tensor(support.size, dtype=dtype, device=device))
        self._position = nn.Parameter(self._position_from_means(means.to(dtype)))
        self._scale = nn.Parameter(self._raw_from_scales(scales.to(device, dtype)))
        self._rotation = nn.Parameter(rotations.to(device, dtype).clone())
        self._density = nn.Parameter(inverse_softplus(densities.to(device, dtype)))

    # ----- construction -------------------------------------------------------------------------
    @classmethod
    def random(cls, support: Roi, n: int, generator: torch.Generator, density: float = 0.002,
               scale_mm: float | None = None, device=None, dtype=torch.float32) -> "GaussianModel":
        """``n`` isotropic Gaussians uniformly in ``support`` with a small density (1/mm).

        The default scale is half the mean spacing ``(volume / n)^(1/3)``, close to the
        nearest-neighbour distance, so neighbours overlap without blurring.
        """
        if n < 1:
            raise ValueError(f"number of Gaussians must be >= 1, got {n}")
        lower = torch.as_tensor(support.lower, dtype=dtype)
        size = torch.as_tensor(support.size, dtype=dtype)
        u = torch.rand((n, 3), generator=generator, dtype=dtype, device=generator.device)
        means = lower + u.cpu() * size
        if scale_mm is None:
            scale_mm = 0.5 * (float(np.prod(support.size)) / n) ** (1.0 / 3.0)
        scales = torch.full((n, 3), float(scale_mm), dtype=dtype)
        rotations = torch.zeros((n, 4), dtype=dtype)
        rotations[:, 0] = 1.0
        densities = torch.full((n,), float(density), dtype=dtype)
        model = cls(means, scales, rotations, densities, support)
        return model if device is None else model.to(device)

    @classmethod
    def from_volume(cls, values: torch.Tensor, grid: Grid, n: int, generator: torch.Generator,
                    support: Roi | None = None, spacing_fraction: float = 1.0) -> "GaussianModel":
        """Warm start from a volume (1/mm, (nz, ny, nx) on ``grid``), e.g. an FDK or SART result.

        Centres are drawn with probability proportional to the value (jittered inside their voxel).
        A sample at value v stands for a region of volume ``mass / (n v)`` (mm^3), so its scale is
        ``spacing_fraction`` times that region's side and its density is the per-sample mass over the
        kernel volume: the voxelized sum then approximates ``values`` where they vary slowly.
        """
        if tuple(values.shape) != tuple(grid.shape):
            raise ValueError(f"values shape {tuple(values.shape)} does not match grid shape {grid.shape}")
        if n < 1:
            raise ValueError(f"number of Gaussians must be >= 1, got {n}")
        support = grid.roi if support is None else support
        device, dtype = values.device, values.dtype if values.is_floating_point() else torch.float32
        weights = values.detach().to(dtype).clamp(min=0).reshape(-1)
        total = float(weights.sum())
        if not total > 0:
            raise ValueError("values must contain positive attenuation to initialise Gaussians from")
        # Inverse-CDF sampling (torch.multinomial is limited to 2^24 voxels).
        cdf = torch.cumsum(weights.double(), 0)
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device).to(device) * cdf[-1]
        flat = torch.searchsorted(cdf, u, right=True).clamp(max=weights.numel() - 1)
        nz, ny, nx = grid.shape
        index_xyz = torch.stack([flat % nx, (flat // nx) % ny, flat // (nx * ny)], dim=1).to(dtype)
        jitter = torch.rand((n, 3), generator=generator, dtype=dtype, device=generator.device).to(device) - 0.5
        spacing = torch.as_tensor(grid.spacing, dtype=dtype, device=device)
        origin = torch.as_tensor(grid.origin, dtype=dtype, device=device)
        means = origin + (index_xyz + jitter) * spacing
        voxel_volume = float(np.prod(grid.spacing))
        mass_per_sample = total * voxel_volume / n  # mm^2
        region_volume = mass_per_sample / weights[flat]  # mm^3
        size_ref = max(support.size)
        # At least half a voxel (the volume resolves no less), at most 0.1 x support (R2-Gaussian split size).
        scale = (spacing_fraction * region_volume ** (1.0 / 3.0)).clamp(
            min=max(0.5 * min(grid.spacing), 1.01 * SCALE_BOUNDS[0] * size_ref), max=0.1 * size_ref)
        densities = mass_per_sample / (UNIT_KERNEL_VOLUME * scale ** 3)
        rotations = torch.zeros((n, 4), dtype=dtype, device=device)
        rotations[:, 0] = 1.0
        return cls(means, scale[:, None].expand(n, 3), rotations, densities, support)

    @classmethod
    def from_volume_deterministic(cls, values: torch.Tensor, grid: Grid, max_gaussians: int, support: Roi,
                                  sigma_fraction: float = 0.6, iterations: int = 150) -> "GaussianModel":
        """Deterministic warm start: a regular lattice of isotropic Gaussians whose voxelized sum fits
        ``values`` (1/mm, (nz, ny, nx) on ``grid``, e.g. a SART result at output resolution).

        The lattice tiles ``support`` with near-cubic cells: ``grid``'s voxels when ``grid`` tiles the
        support and has at most ``max_gaussians`` voxels (one Gaussian per voxel), otherwise the finest
        cells that keep the count within ``max_gaussians``. Every Gaussian sits at its cell's centre
        with ``sigma = sigma_fraction x`` the cell's side (0.6: a constant field ripples by < 0.2 %
        per axis between centres). Densities solve the nonnegative least-squares problem
        ``min ||A rho - values||^2, rho >= 0`` with ``A`` the voxelization on ``grid`` (as
        :func:`ixgs.voxelize.voxelize` evaluates it, truncated at KERNEL_SIGMAS): for identical
        isotropic Gaussians on a lattice ``A`` is separable, ``A_z (x) A_y (x) A_x`` with small 1D
        matrices, so ``iterations`` steps of accelerated projected gradient (FISTA) cost seconds.
        Unlike :meth:`from_volume` nothing is random: no sampling noise for the views to undo.
        """
        if tuple(values.shape) != tuple(grid.shape):
            raise ValueError(f"values shape {tuple(values.shape)} does not match grid shape {grid.shape}")
        if max_gaussians < 1:
            raise ValueError(f"max_gaussians must be >= 1, got {max_gaussians}")
        if not sigma_fraction > 0:
            raise ValueError(f"sigma_fraction must be positive, got {sigma_fraction}")
        device = values.device
        dtype = values.dtype if values.is_floating_point() else torch.float32
        target = values.detach().to(dtype).clamp(min=0)
        if not float(target.max()) > 0:
            raise ValueError("values must contain positive attenuation to initialise Gaussians from")
        lattice = _lattice(grid, support, max_gaussians)
        sigma = sigma_fraction * max(lattice.spacing)
        # 1D kernels (voxels along an axis x lattice centres along it), in (z, y, x) order, as the
        # voxelizer averages a Gaussian over a voxel: variance sigma^2 + h^2/12, the same mass.
        from .voxelize import voxel_blur_mm2

        variance = sigma ** 2 + voxel_blur_mm2(grid)
        kernels = []
        for axis in (2, 1, 0):
            x = grid.origin[axis] + grid.spacing[axis] * torch.arange(grid.shape[2 - axis], dtype=torch.float64)
            c = lattice.origin[axis] + lattice.spacing[axis] * torch.arange(lattice.shape[2 - axis], dtype=torch.float64)
            offset = (x[:, None] - c[None, :]) / math.sqrt(variance)
            kernel = (sigma / math.sqrt(variance)) * torch.exp(-0.5 * offset ** 2) * (offset.abs() <= KERNEL_SIGMAS)
            kernels.append(kernel.to(device, dtype))
        densities = _nonnegative_separable_fit(kernels, target, iterations)
        # Softplus needs rho > 0: empty cells get a negligible density; densify_and_prune's mass rule
        # removes them unless the views raise it first.
        densities = densities.clamp(min=1e-6 * float(target.max())).reshape(-1)
        means = torch.as_tensor(lattice.voxel_centers(), dtype=dtype, device=device).reshape(-1, 3)
        n = means.shape[0]
        rotations = torch.zeros((n, 4), dtype=dtype, device=device)
        rotations[:, 0] = 1.0
        return cls(means, torch.full((n, 3), sigma, dtype=dtype, device=device), rotations, densities, support)

    @classmethod
    def from_state_dict(cls, state: dict) -> "GaussianModel":
        """A model restored from ``state_dict()`` (any number of Gaussians): renders identically."""
        center, size = state["support_center"], state["support_size"]
        n = state["_position"].shape[0]
        dtype = center.dtype
        placeholder_scale = 0.01 * float(size.max())
        rotations = torch.zeros((n, 4), dtype=dtype)
        rotations[:, 0] = 1.0
        model = cls(center.cpu().expand(n, 3).clone(), torch.full((n, 3), placeholder_scale, dtype=dtype),
                    rotations, torch.ones(n, dtype=dtype),
                    Roi(tuple(center.tolist()), tuple(size.tolist())))
        model.load_state_dict(state)
        return model.to(center.device)

    # ----- parameter transforms -----------------------------------------------------------------
    @property
    def half_extent(self) -> torch.Tensor:
        """Half the support's largest side (mm): the unit of the stored positions."""
        return 0.5 * self.support_size.max()

    @property
    def support(self) -> Roi:
        return Roi(tuple(self.support_center.tolist()), tuple(self.support_size.tolist()))

    def _position_from_means(self, means: torch.Tensor) -> torch.Tensor:
        return (means.to(self.support_center.device) - self.support_center) / self.half_extent

    def _raw_from_scales(self, scales: torch.Tensor) -> torch.Tensor:
        lo, hi = SCALE_BOUNDS
        fraction = (scales / (2.0 * self.half_extent) - lo) / (hi - lo)
        eps = 1e-6 if scales.dtype == torch.float64 else 1e-5
        return torch.logit(fraction.clamp(eps, 1.0 - eps))

    def __len__(self) -> int:
        return self._position.shape[0]

    @property
    def means(self) -> torch.Tensor:
        """(N, 3) centres, mm LPS."""
        return self.support_center + self.half_extent * self._position

    def _scales_from_raw(self, raw: torch.Tensor) -> torch.Tensor:
        lo, hi = SCALE_BOUNDS
        return 2.0 * self.half_extent * (lo + (hi - lo) * torch.sigmoid(raw))

    @property
    def scales(self) -> torch.Tensor:
        """(N, 3) standard deviations along the Gaussian's own axes, mm."""
        return self._scales_from_raw(self._scale)

    @property
    def rotations(self) -> torch.Tensor:
        """(N, 3, 3) rotation matrices (columns are the Gaussian's axes)."""
        return quaternion_to_matrix(self._rotation)

    @property
    def densities(self) -> torch.Tensor:
        """(N,) peak attenuation, 1/mm."""
        return F.softplus(self._density)

    def masses(self) -> torch.Tensor:
        """(N,) integral of each Gaussian over space, mm^2 (1/mm x mm^3): ``rho (2 pi)^(3/2) prod(s)``."""
        return self.densities * UNIT_KERNEL_VOLUME * self.scales.prod(dim=1)

    def covariances(self) -> torch.Tensor:
        """(N, 3, 3) covariance S = R diag(s^2) R^T, mm^2."""
        return symmetric_from_eigen(self.rotations, self.scales ** 2)

    def inverse_covariances(self) -> torch.Tensor:
        """(N, 3, 3) S^-1 = R diag(1/s^2) R^T, mm^-2 (no matrix inversion: stable for thin Gaussians)."""
        return symmetric_from_eigen(self.rotations, self.scales ** -2)

    # ----- optimisation -------------------------------------------------------------------------
    def _parameters_by_name(self) -> dict[str, nn.Parameter]:
        return {"position": self._position, "scale": self._scale, "rotation": self._rotation,
                "density": self._density}

    def parameter_groups(self, lr: dict[str, float]) -> list[dict]:
        """Adam parameter groups with one learning rate per parameter (R2-Gaussian: position 2e-4,
        scale 5e-3, rotation 1e-3, density 1e-2, in normalised units)."""
        missing = [name for name in PARAMETER_NAMES if name not in lr]
        if missing:
            raise ValueError(f"learning rates missing for {missing}; need {list(PARAMETER_NAMES)}")
        return [{"params": [param], "lr": float(lr[name]), "name": name}
                for name, param in self._parameters_by_name().items()]

    def _replace_parameters(self, optimizer: torch.optim.Optimizer | None, keep: torch.Tensor,
                            appended: dict[str, torch.Tensor]) -> None:
        """Keep rows ``keep`` of every parameter, append ``appended[name]`` rows, and carry the Adam
        moments along (zero for the appended rows)."""
        attribute = {"position": "_position", "scale": "_scale", "rotation": "_rotation", "density": "_density"}
        groups = {}
        if optimizer is not None:
            for group in optimizer.param_groups:
                if group.get("name") in attribute:
                    groups[group["name"]] = group
            missing = [name for name in PARAMETER_NAMES if name not in groups]
            if missing:
                raise ValueError(f"optimizer has no parameter group named {missing}; build it from parameter_groups()")
        for name, attr in attribute.items():
            old = getattr(self, attr)
            new = nn.Parameter(torch.cat([old.detach()[keep], appended[name].to(old)], dim=0))
            if name in groups:
                group = groups[name]
                state = optimizer.state.pop(old, None)
                group["params"] = [new]
                if state:
                    for key in ("exp_avg", "exp_avg_sq"):
                        if key in state:
                            extra = torch.zeros_like(appended[name], dtype=state[key].dtype, device=state[key].device)
                            state[key] = torch.cat([state[key][keep], extra], dim=0)
                    optimizer.state[new] = state
            setattr(self, attr, new)

    @torch.no_grad()
    def densify_and_prune(self, optimizer: torch.optim.Optimizer | None, grad_accum: torch.Tensor,
                          grad_threshold: float, voxel_size_mm: float, max_count: int, *,
                          split_voxels: float = 1.0, min_attenuation: float = 2e-3,
                          min_mass_voxels: float = 0.5) -> dict[str, int]:
        """Adaptive control that conserves mass; returns counts ``cloned, split, pruned, total``.

        Gaussians whose mean positional gradient norm ``grad_accum`` (N,) reaches ``grad_threshold``
        are densified, the largest gradients first, until ``max_count`` Gaussians exist:

        * split when the largest scale exceeds ``split_voxels`` output voxels (``voxel_size_mm``):
          such a Gaussian blurs detail the output can show. Moment-matching split: two children at
          ``m +- SPLIT_OFFSET s_max a`` (``a`` the axis of the largest scale ``s_max``), that scale
          divided by 1.6, the others kept, each child half the parent's mass. The pair then has the
          parent's mass, mean and covariance, so the views change little and the optimiser goes on
          from where it was; it is deterministic, unlike R2-Gaussian's sampled children (whose
          scales / 1.6 and density / 2 kept 24 % of the mass). A child whose centre leaves the
          support is pruned below like any other Gaussian;
        * cloned otherwise: the Gaussian and a copy in place, each at half density (same total mass).

        Then Gaussians are pruned whose centre leaves the support or whose mass is below
        ``min_mass_voxels`` voxels' worth of ``min_attenuation`` (1/mm; the default 2e-3 is a tenth
        of water's), i.e. ``mass < min_mass_voxels x min_attenuation x voxel_size_mm^3``: a faint
        but large Gaussian (soft tissue) stays, one that adds nothing visible to any voxel goes.
        Nothing is random (no generator): the same model and gradients give the same result.
        """
        n = len(self)
        if tuple(grad_accum.shape) != (n,):
            raise ValueError(f"grad_accum must have shape ({n},), got {tuple(grad_accum.shape)}")
        if not (math.isfinite(voxel_size_mm) and voxel_size_mm > 0):
            raise ValueError(f"voxel_size_mm must be a positive number, got {voxel_size_mm!r}")
        device = self._position.device
        grad_accum = grad_accum.to(device)
        scales = self.scales
        largest, axis = scales.max(dim=1)
        large = largest > split_voxels * voxel_size_mm
        candidates = torch.nonzero(grad_accum >= grad_threshold).squeeze(1)
        room = max(int(max_count) - n, 0)  # each clone or split adds one Gaussian
        if candidates.numel() > room:
            order = torch.argsort(grad_accum[candidates], descending=True)
            candidates = candidates[order[:room]]
        clone = candidates[~large[candidates]]
        split = candidates[large[candidates]]

        half_density = inverse_softplus(self.densities / 2.0)
        self._density[clone] = half_density[clone]
        keep = torch.ones(n, dtype=torch.bool, device=device)
        keep[split] = False

        rows = torch.arange(split.numel(), device=device)
        direction = self.rotations[split][rows, :, axis[split]]  # (k, 3): columns are the Gaussian's axes
        offset = SPLIT_OFFSET * largest[split, None] * direction
        child_means = torch.cat([self.means[split] + offset, self.means[split] - offset])
        child_scales = scales[split].clone()
        child_scales[rows, axis[split]] /= SPLIT_SHRINK
        child_raw = self._raw_from_scales(child_scales)
        # Densities from the scales as stored (the sigmoid bounds may clip them): mass stays exact.
        child_density = 0.5 * self.masses()[split] / (UNIT_KERNEL_VOLUME * self._scales_from_raw(child_raw).prod(dim=1))
        appended = {
            "position": torch.cat([self._position[clone], self._position_from_means(child_means)]),
            "scale": torch.cat([self._scale[clone], child_raw.repeat(2, 1)]),
            "rotation": torch.cat([self._rotation[clone], self._rotation[split].repeat(2, 1)]),
            "density": torch.cat([self._density[clone], inverse_softplus(child_density).repeat(2)]),
        }
        self._replace_parameters(optimizer, torch.nonzero(keep).squeeze(1), appended)

        means = self.means
        inside = ((means >= self.support_center - 0.5 * self.support_size)
                  & (means <= self.support_center + 0.5 * self.support_size)).all(dim=1)
        min_mass = min_mass_voxels * min_attenuation * voxel_size_mm ** 3
        survive = inside & (self.masses() >= min_mass)
        pruned = int((~survive).sum())
        if pruned:
            empty = {name: getattr(self, "_" + name)[:0].detach() for name in PARAMETER_NAMES}
            self._replace_parameters(optimizer, torch.nonzero(survive).squeeze(1), empty)
        return {"cloned": int(clone.numel()), "split": int(split.numel()), "pruned": pruned, "total": len(self)}


def _lattice(grid: Grid, support: Roi, max_gaussians: int) -> Grid:
    """Cells of the deterministic start: ``grid`` itself when it tiles ``support`` with at most
    ``max_gaussians`` voxels, otherwise the finest near-cubic tiling of ``support`` within that count."""
    fits = np.allclose(grid.roi.center, support.center) and np.allclose(grid.roi.size, support.size)
    if fits and int(np.prod(grid.shape)) <= max_gaussians:
        return grid
    cell = max(max(grid.spacing), (float(np.prod(support.size)) / max_gaussians) ** (1.0 / 3.0))
    lattice = support.grid(cell)
    while int(np.prod(lattice.shape)) > max_gaussians:  # rounding of the cell counts can overshoot
        cell *= 1.02
        lattice = support.grid(cell)
    return lattice


def _separable(matrices: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``(M_z (x) M_y (x) M_x) x`` for a 3D ``x`` (k, j, i) and matrices (., k), (., j), (., i): one axis at a time."""
    mz, my, mx = matrices
    return torch.einsum("zk,kyx->zyx", mz, torch.einsum("yj,kjx->kyx", my, x @ mx.T))


def _nonnegative_separable_fit(kernels: list[torch.Tensor], target: torch.Tensor, iterations: int) -> torch.Tensor:
    """``rho >= 0`` minimising ``||A rho - target||^2`` for ``A = kernels[0] (x) kernels[1] (x) kernels[2]``
    ((n_a, m_a) matrices along z, y, x), by FISTA with projection onto rho >= 0. The gradient
    ``A^T A rho - A^T target`` goes through the small Gram matrices ``K_a^T K_a``: a step costs
    (cells per axis)^4, not a pass over the voxels."""
    grams = [k.T @ k for k in kernels]
    projected = _separable([k.T for k in kernels], target)  # A^T target
    # Lipschitz constant of the gradient: the largest eigenvalue of A^T A, a product of the 1D ones.
    lipschitz = math.prod(float(torch.linalg.eigvalsh(g.double()).max()) for g in grams)
    # Start: one multiplicative (ISRA) step from uniform densities, A^T target / A^T A 1.
    ones = torch.ones_like(projected)
    rho = projected / _separable(grams, ones).clamp(min=1e-30)
    previous, momentum = rho, rho
    t = 1.0
    for _ in range(iterations):
        rho = (momentum - (_separable(grams, momentum) - projected) / lipschitz).clamp(min=0)
        t_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        momentum = rho + ((t - 1.0) / t_next) * (rho - previous)
        previous, t = rho, t_next
    return rho
