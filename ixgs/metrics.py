"""Quality metrics: 3D PSNR, SSIM and bone Dice against a reference CT, and 2D reprojection PSNR.

3D metrics compare on the reference's grid: the reconstruction is resampled there in physical
(LPS) space, so volumes of different extent, spacing or orientation are compared fairly.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from skimage.filters import threshold_otsu
from skimage.metrics import structural_similarity

from .volume import Volume


def resample_to(volume: Volume, reference: Volume, default: float = 0.0) -> np.ndarray:
    """``volume`` sampled (linearly) at the voxel centres of ``reference``; outside it, ``default``."""
    image = sitk.Resample(volume.to_sitk(), reference.to_sitk(), sitk.Transform(), sitk.sitkLinear,
                          float(default), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(image)


def psnr(values: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio (dB) with the reference's value range as the peak."""
    values, reference = np.asarray(values, np.float64), np.asarray(reference, np.float64)
    data_range = float(reference.max() - reference.min())
    mse = float(np.mean((values - reference) ** 2))
    if data_range <= 0:
        raise ValueError("reference is constant: PSNR is undefined")
    return float("inf") if mse == 0 else float(10.0 * np.log10(data_range**2 / mse))


def ssim(values: np.ndarray, reference: np.ndarray) -> float:
    """Structural similarity (Gaussian-free 7-voxel window), reference value range as data range."""
    reference = np.asarray(reference, np.float64)
    return float(structural_similarity(reference, np.asarray(values, np.float64),
                                       data_range=float(reference.max() - reference.min())))


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold over the voxels above air (the air peak would otherwise dominate).

    The histogram picks the split between bins; the threshold is then set half-way between the
    largest value below and the smallest value above it, so no voxel lands on the wrong side of its
    own bin's centre.
    """
    values = np.asarray(values, np.float64).ravel()
    foreground = values[values > 0.05 * values.max()] if values.max() > 0 else values
    if foreground.size < 2 or foreground.min() == foreground.max():
        foreground = values
    if values.min() == values.max():
        return float(values.min())
    counts, edges = np.histogram(foreground, bins=bins)
    centers = 0.5 * (edges[:-1] + edges[1:])
    split = int(np.searchsorted(centers, threshold_otsu(hist=(counts, centers))))
    below = foreground < edges[split + 1]
    if below.all() or not below.any():
        return float(centers[split])
    return float(0.5 * (foreground[below].max() + foreground[~below].min()))


def dice(mask: np.ndarray, reference_mask: np.ndarray) -> float:
    """Dice overlap; NaN (undefined, null in JSON) when both masks are empty, not a perfect score."""
    mask, reference_mask = np.asarray(mask, bool), np.asarray(reference_mask, bool)
    total = mask.sum() + reference_mask.sum()
    return float("nan") if total == 0 else float(2.0 * np.logical_and(mask, reference_mask).sum() / total)


def evaluate(reconstruction: Volume, reference: Volume, bone_threshold: float | None = None) -> dict:
    """PSNR, SSIM and bone Dice of ``reconstruction`` against ``reference`` (both in 1/mm).

    Bone is the same physical threshold on both (Otsu of the reference unless given), so Dice
    measures shape, not a difference in each volume's own threshold choice.
    """
    if bone_threshold is not None and not np.isfinite(bone_threshold):
        raise ValueError(f"bone threshold must be a finite number (1/mm), got {bone_threshold}")
    values = resample_to(reconstruction, reference)
    target = np.asarray(reference.array, np.float32)
    threshold = otsu_threshold(target) if bone_threshold is None else float(bone_threshold)
    return {
        "psnr": psnr(values, target),
        "ssim": ssim(values, target),
        "dice": dice(values > threshold, target > threshold),
        "bone_threshold": threshold,
    }


def reprojection_psnr(rendered: np.ndarray, measured: np.ndarray) -> float:
    """2D PSNR of a re-projected view against the measured one (peak: the measured range)."""
    return psnr(rendered, measured)
