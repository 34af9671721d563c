"""Losses of the reconstruction: L1 + D-SSIM on projections, 3D total variation on volume patches."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _gaussian_window(size: int, sigma: float, device, dtype) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def ssim_2d(image: torch.Tensor, target: torch.Tensor, data_range: float | torch.Tensor,
            window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM of two (rows, cols) images with a separable Gaussian window (as in 3DGS)."""
    kernel = _gaussian_window(window, sigma, image.device, image.dtype)
    x = torch.stack([image, target, image * image, target * target, image * target])[:, None]

    def blur(t):
        t = F.conv2d(t, kernel.view(1, 1, 1, -1), padding=(0, window // 2))
        return F.conv2d(t, kernel.view(1, 1, -1, 1), padding=(window // 2, 0))

    mu_x, mu_y, xx, yy, xy = blur(x)[:, 0]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean()


def projection_loss(rendered: torch.Tensor, measured: torch.Tensor, dssim_weight: float = 0.25) -> torch.Tensor:
    """L1 + ``dssim_weight`` x (1 - SSIM), R2-Gaussian's projection loss."""
    data_range = measured.max().clamp_min(1e-6)
    l1 = (rendered - measured).abs().mean()
    return l1 + dssim_weight * (1.0 - ssim_2d(rendered, measured, data_range))


def isotropic_total_variation(volume: torch.Tensor, epsilon: float = 1e-6) -> torch.Tensor:
    """Sum over voxels of sqrt(dx^2 + dy^2 + dz^2 + epsilon^2) (forward differences, replicated
    border): the isotropic TV that SART+TV descends; ``epsilon`` (1/mm per voxel) smooths |gradient|
    at zero, far below any edge."""
    padded = F.pad(volume[None, None], (0, 1, 0, 1, 0, 1), mode="replicate")[0, 0]
    dz = padded[1:, :-1, :-1] - volume
    dy = padded[:-1, 1:, :-1] - volume
    dx = padded[:-1, :-1, 1:] - volume
    return (dx.square() + dy.square() + dz.square() + epsilon ** 2).sqrt().sum()


def total_variation_3d(volume: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring voxels along the three axes."""
    return ((volume[1:] - volume[:-1]).abs().mean() + (volume[:, 1:] - volume[:, :-1]).abs().mean()
            + (volume[:, :, 1:] - volume[:, :, :-1]).abs().mean())
