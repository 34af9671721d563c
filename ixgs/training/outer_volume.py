"""The attenuation outside the Gaussians' support: a coarse voxel volume, as far as the views reach.

Intraoperative views are truncated: every ray also crosses tissue outside the ROI. Modelling it in
3D keeps that tissue from being pushed into the ROI. The volume is masked where the Gaussians'
support begins: one owner per region.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..geometry import Grid, Roi
from ..poses import transform_rays
from ..projector import forward_project


class OuterVolume(nn.Module):
    """Non-negative attenuation (1/mm) on ``grid``, zero inside ``support``."""

    def __init__(self, grid: Grid, support: Roi, values: torch.Tensor):
        super().__init__()
        if tuple(values.shape) != tuple(grid.shape):
            raise ValueError(f"outer values shape {tuple(values.shape)} does not match grid shape {grid.shape}")
        self.grid = grid
        self.values = nn.Parameter(values.detach().clone())
        self.register_buffer("mask", torch.as_tensor(~support.contains(grid.voxel_centers()), dtype=torch.float32,
                                                     device=values.device).reshape(grid.shape))

    def attenuation(self) -> torch.Tensor:
        """(nz, ny, nx) 1/mm, zero inside the support."""
        return self.values * self.mask

    def project(self, rays, pose: torch.Tensor | None = None, kernel: str = "torch", upsample: int = 1,
                shape: tuple[int, int] | None = None) -> torch.Tensor:
        """Line integrals through the outer volume along ``rays`` (moved by the view's ``pose``), by the
        ray marcher of ``kernel`` (:mod:`ixgs.kernels.choice`). With ``upsample``: ``rays`` are of the
        view binned that many times (:func:`~ixgs.geometry.binning_matrix`), and the image is
        interpolated bilinearly to the view's ``shape`` (pixel centres kept exact)."""
        if pose is not None:
            rays = transform_rays(rays, pose)
        image = forward_project(self.attenuation(), self.grid, rays, kernel=kernel)
        if upsample == 1:
            return image
        image = F.interpolate(image[None, None], scale_factor=upsample, mode="bilinear", align_corners=False)
        return image[0, 0, :shape[0], :shape[1]]

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep the attenuation non-negative after an optimiser step."""
        self.values.clamp_(min=0.0)
