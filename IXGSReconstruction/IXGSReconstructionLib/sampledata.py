"""The sample scan: a procedural spine phantom and simulated C-arm views, made locally (no download)."""
from __future__ import annotations

import os
from pathlib import Path

from ixgs.phantom import make_phantom
from ixgs.simulate import simulate_scan

SAMPLE_NAME = "IXGS spine phantom scan"


def generate_sample_scan(out_dir: str | os.PathLike, n_views: int = 16, detector_px: int = 128,
                         voxel_size_mm: float = 1.5, seed: int = 0, transmission: bool = False) -> Path:
    """Write (once) a simulated scan of the spine phantom with its ground-truth reference volume.

    An existing complete scan at ``out_dir`` is reused, so the SampleData button is instant the second time.
    """
    out_dir = Path(out_dir)
    if (out_dir / "scan.json").is_file():
        return out_dir
    phantom = make_phantom("spine", seed=seed, voxel_size_mm=voxel_size_mm)
    return simulate_scan(phantom, out_dir, n_views=n_views, detector_px=detector_px, seed=seed,
                         transmission=transmission)
