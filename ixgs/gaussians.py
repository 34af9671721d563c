"""Radiative 3D Gaussians (R2-Gaussian style): the model that is optimised.

Each Gaussian is ``rho * exp(-1/2 (x - m)^T S^-1 (x - m))`` with ``S = R diag(s^2) R^T``; the
attenuation field (1/mm) is their sum. Parameters are stored in optimiser-friendly form:

* centre normalised to the support box: ``m = support_center + half_extent * position`` with one
  scalar ``half_extent = max(support size) / 2`` (R2-Gaussian normalises the scene to [-1, 1]^3 with
  a single factor, so learning rates are the same along every axis);
* scale through a sigmoid, bounded to [0.0005, 0.5] x the support's largest side;
* rotation as a quaternion (w, x, y, z), normalised on use;
* density through a softplus, so it stays positive.
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

    @property
    def scales(self) -> torch.Tensor:
        """(N, 3) standard deviations along the Gaussian's own axes, mm."""
        lo, hi = SCALE_BOUNDS
        return 2.0 * self.half_extent * (lo + (hi - lo) * torch.sigmoid(self._scale))

    @property
    def rotations(self) -> torch.Tensor:
        """(N, 3, 3) rotation matrices (columns are the Gaussian's axes)."""
        return quaternion_to_matrix(self._rotation)

    @property
    def densities(self) -> torch.Tensor:
        """(N,) peak attenuation, 1/mm."""
        return F.softplus(self._density)

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
                          grad_threshold: float, split_scale_fraction: float, min_density: float,
                          max_count: int, generator: torch.Generator | None = None) -> dict[str, int]:
        """R2-Gaussian adaptive control; returns counts ``cloned, split, pruned, total``.

        Gaussians whose mean positional gradient norm ``grad_accum`` (N,) reaches ``grad_threshold``
        are cloned (largest scale <= ``split_scale_fraction`` x support size; density halved for
        both) or split (2 children drawn from the Gaussian, scales / 1.6, density / 2; parent
        removed). At most ``max_count`` Gaussians result (largest gradients first). Then Gaussians
        with density < ``min_density`` (1/mm) or centre outside the support are pruned.
        """
        n = len(self)
        if tuple(grad_accum.shape) != (n,):
            raise ValueError(f"grad_accum must have shape ({n},), got {tuple(grad_accum.shape)}")
        device = self._position.device
        grad_accum = grad_accum.to(device)
        scales = self.scales
        large = scales.max(dim=1).values > split_scale_fraction * 2.0 * self.half_extent
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

        # Split children: two samples of N(m, S), scales / 1.6, half the density each.
        rot = self.rotations[split]
        noise = torch.randn((2, split.numel(), 3), generator=generator, dtype=scales.dtype,
                            device=generator.device if generator is not None else device).to(device)
        offsets = torch.einsum("nij,knj->kni", rot, noise * scales[split]).reshape(-1, 3)
        child_means = self.means[split].repeat(2, 1) + offsets
        appended = {
            "position": torch.cat([self._position[clone], self._position_from_means(child_means)]),
            "scale": torch.cat([self._scale[clone], self._raw_from_scales(scales[split].repeat(2, 1) / 1.6)]),
            "rotation": torch.cat([self._rotation[clone], self._rotation[split].repeat(2, 1)]),
            "density": torch.cat([self._density[clone], half_density[split].repeat(2)]),
        }
        self._replace_parameters(optimizer, torch.nonzero(keep).squeeze(1), appended)

        means = self.means
        inside = ((means >= self.support_center - 0.5 * self.support_size)
                  & (means <= self.support_center + 0.5 * self.support_size)).all(dim=1)
        survive = inside & (self.densities >= min_density)
        pruned = int((~survive).sum())
        if pruned:
            empty = {name: getattr(self, "_" + name)[:0].detach() for name in PARAMETER_NAMES}
            self._replace_parameters(optimizer, torch.nonzero(survive).squeeze(1), empty)
        return {"cloned": int(clone.numel()), "split": int(split.numel()), "pruned": pruned, "total": len(self)}
