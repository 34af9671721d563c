"""Classical standardization: attenuation scale, unchanged geometry, bone emphasis, refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage
from conftest import ring_of_matrices

from ixgs.scan import read_scan, write_scan
from ixgs.standardize import ClassicalSettings, standardize_image, standardize_scan

SHAPE = (32, 40)


def _radiograph(seed: int) -> np.ndarray:
    """Line integrals of a smooth soft-tissue slab plus a dense 'bone' bar (dimensionless)."""
    rows, cols = np.mgrid[0:SHAPE[0], 0:SHAPE[1]]
    soft = 1.0 + 0.5 * np.exp(-((rows - 16) ** 2 + (cols - 20) ** 2) / 300.0)
    bone = 1.5 * (np.abs(cols - 20 - seed) < 3)
    return (soft + bone).astype(np.float32)


def test_standardize_image_keeps_attenuation_scale_and_emphasizes_bone():
    image = _radiograph(0)
    out = standardize_image(image, ClassicalSettings(clahe_tile_px=16, bone_emphasis=1.0, background_sigma_px=4.0))
    assert out.dtype == np.float32 and out.shape == image.shape
    low, high = np.percentile(image, (0.5, 99.5))
    assert out.min() >= low - 1e-5 and out.max() <= high + 1e-5  # within the view's own line-integral range
    # Bone-to-soft-tissue contrast relative to the range grows (the bar stands out more).
    bar = np.zeros(image.shape, bool)
    bar[:, 18:23] = True
    near = ndimage.binary_dilation(bar, iterations=4) & ~bar
    contrast_in = (image[bar].mean() - image[near].mean()) / (high - low)
    contrast_out = (out[bar].mean() - out[near].mean()) / (high - low)
    assert contrast_out > contrast_in + 0.02
    # Still the same picture: strongly correlated with the input.
    assert np.corrcoef(image.ravel(), out.ravel())[0, 1] > 0.8


def test_standardize_scan_from_transmission_keeps_geometry(tmp_path, small_roi):
    matrices = ring_of_matrices(3, shape=SHAPE)
    i0 = 1000.0
    transmission = [(i0 * np.exp(-_radiograph(k))).astype(np.float32) for k in range(3)]
    source = write_scan(tmp_path / "raw", transmission, matrices, intensity="transmission", i0=i0, roi=small_roi)
    out = standardize_scan(source, tmp_path / "std", ClassicalSettings(clahe_tile_px=16))

    meta = json.loads((out / "scan.json").read_text())
    assert meta["intensity"] == "attenuation"
    before, after = read_scan(source), read_scan(out)
    assert len(after.views) == 3
    for a, b in zip(before.views, after.views):
        np.testing.assert_allclose(b.projection_matrix, a.projection_matrix, atol=1e-9)
        assert b.image.min() >= 0.0
        # -log was applied: values lie on the line-integral scale (about 1..3), not the detector's (0..1000).
        assert 0.5 < float(np.median(b.image)) < 3.5
    np.testing.assert_allclose(after.roi.center, before.roi.center, atol=1e-9)
    np.testing.assert_allclose(after.roi.size, before.roi.size, atol=1e-9)


def test_refusals_name_the_problem(tmp_path, small_roi):
    with pytest.raises(ValueError, match="clahe_clip_limit"):
        standardize_image(_radiograph(0), ClassicalSettings(clahe_clip_limit=0.0))
    with pytest.raises(ValueError, match="2D"):
        standardize_image(np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        standardize_image(np.full(SHAPE, np.nan, np.float32))
    source = write_scan(tmp_path / "raw", [_radiograph(0), _radiograph(1)], ring_of_matrices(2, shape=SHAPE),
                        roi=small_roi)
    with pytest.raises(ValueError, match="is the input"):
        standardize_scan(source, source)
