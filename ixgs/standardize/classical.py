"""Classical standardization of radiographs, without learning.

Steps per view, in the order the physics asks for them:

1. transmission to attenuation (flat field, -log): done by :func:`ixgs.scan.read_scan`, which every
   scan goes through, so a transmission scan arrives here as line integrals already;
2. CLAHE (contrast-limited adaptive histogram equalization) on the robust intensity range, which
   evens out exposure differences between views and devices;
3. bone emphasis: an unsharp mask that removes part of the smooth soft-tissue / scatter background
   so bone edges dominate;
4. back to the attenuation scale: the result is mapped onto the view's own robust range of line
   integrals (non-negative, dimensionless), which is the scale the reconstruction expects.

The output is a valid scan with the same geometry and ``"intensity": "attenuation"``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage import exposure

from ..scan import read_scan, write_scan
from ..volume import Volume

# Percentiles (in %) of the robust intensity range; outside them lie dead pixels and collimator edges.
ROBUST_PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class ClassicalSettings:
    """``clahe_clip_limit`` in (0, 1] (0.01 = mild); ``clahe_tile_px`` side of a CLAHE tile in pixels;
    ``bone_emphasis`` >= 0 is the unsharp-mask gain (0 = off); ``background_sigma_px`` the scale of the
    soft-tissue background removed by the bone emphasis, in pixels."""

    clahe_clip_limit: float = 0.01
    clahe_tile_px: int = 64
    bone_emphasis: float = 0.5
    background_sigma_px: float = 8.0

    def validate(self) -> None:
        if not 0.0 < self.clahe_clip_limit <= 1.0:
            raise ValueError(f"clahe_clip_limit must be in (0, 1], got {self.clahe_clip_limit}")
        if self.clahe_tile_px < 8:
            raise ValueError(f"clahe_tile_px must be >= 8 pixels, got {self.clahe_tile_px}")
        if self.bone_emphasis < 0:
            raise ValueError(f"bone_emphasis must be >= 0, got {self.bone_emphasis}")
        if self.background_sigma_px <= 0:
            raise ValueError(f"background_sigma_px must be > 0 pixels, got {self.background_sigma_px}")


def standardize_image(attenuation: np.ndarray, settings: ClassicalSettings = ClassicalSettings()) -> np.ndarray:
    """One view: attenuation line integrals in, standardized line integrals (float32, >= 0) out."""
    settings.validate()
    image = np.asarray(attenuation, dtype=np.float64)
    if image.ndim != 2:
        raise ValueError(f"attenuation image must be 2D, got shape {image.shape}")
    if not np.all(np.isfinite(image)):
        raise ValueError("attenuation image has NaN or Inf pixels")
    low, high = np.percentile(image, ROBUST_PERCENTILES)
    low = max(float(low), 0.0)
    if high - low <= 1e-12:  # a flat view carries no structure to standardize
        return np.clip(image, 0.0, None).astype(np.float32)
    normalized = np.clip((image - low) / (high - low), 0.0, 1.0)
    tile = tuple(max(2, min(settings.clahe_tile_px, n)) for n in image.shape)
    equalized = exposure.equalize_adapthist(normalized, kernel_size=tile, clip_limit=settings.clahe_clip_limit)
    background = ndimage.gaussian_filter(equalized, settings.background_sigma_px, mode="nearest")
    emphasized = np.clip(equalized + settings.bone_emphasis * (equalized - background), 0.0, 1.0)
    return (low + emphasized * (high - low)).astype(np.float32)


def standardize_scan(scan_path: str | os.PathLike, output_path: str | os.PathLike,
                     settings: ClassicalSettings = ClassicalSettings()) -> Path:
    """Standardize every view of a scan folder and write a new scan with the same geometry.

    Written atomically by :func:`ixgs.scan.write_scan`: a failure leaves nothing at ``output_path``.
    """
    settings.validate()
    scan = read_scan(scan_path)
    images = [standardize_image(view.image, settings) for view in scan.views]
    reference = Volume.read(scan.reference_volume) if scan.reference_volume is not None else None
    return write_scan(output_path, images, scan.projection_matrices, intensity="attenuation",
                      roi=scan.roi, reference=reference, inputs=[scan_path])
