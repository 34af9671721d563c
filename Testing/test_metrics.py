"""Metrics: known values, and comparison in physical space across different grids."""
from __future__ import annotations

import numpy as np
import pytest

from ixgs.metrics import dice, evaluate, otsu_threshold, psnr, resample_to, ssim
from ixgs.volume import Volume


def _ball(shape=(32, 32, 32), origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 1.0), center=(15.5, 15.5, 15.5), r=8.0):
    nz, ny, nx = shape
    z, y, x = np.meshgrid(*[origin[a] + spacing[a] * np.arange(n) for a, n in ((2, nz), (1, ny), (0, nx))],
                          indexing="ij")
    inside = (x - center[0]) ** 2 + (y - center[1]) ** 2 + (z - center[2]) ** 2 <= r**2
    soft_tissue = 0.02 + 0.005 * np.sin(0.2 * x) * np.cos(0.15 * y)  # a spread, as real tissue has
    return Volume((soft_tissue + 0.03 * inside).astype(np.float32), origin, spacing)


def test_psnr_known_value():
    reference = np.zeros((10, 10, 10))
    reference[0, 0, 0] = 2.0  # range 2
    values = reference + 0.1  # mse 0.01 -> 10 log10(4 / 0.01) = 26.02 dB
    assert psnr(values, reference) == pytest.approx(10 * np.log10(4 / 0.01))
    assert psnr(reference, reference) == float("inf")


def test_ssim_and_dice_extremes():
    ball = _ball().array
    assert ssim(ball, ball) == pytest.approx(1.0)
    assert ssim(ball + np.random.default_rng(0).normal(0, 0.02, ball.shape), ball) < 0.5
    mask = ball > 0.03
    assert dice(mask, mask) == 1.0 and dice(mask, ~mask) == 0.0
    assert dice(mask[:, :, ::-1], mask) == pytest.approx(1.0)  # symmetric ball


def test_otsu_separates_bone_from_soft_tissue():
    threshold = otsu_threshold(_ball().array)
    assert 0.0249 < threshold < 0.045  # in the gap between soft tissue and bone


def test_evaluation_resamples_in_physical_space():
    """The same ball on a grid with other spacing and origin scores as (nearly) identical."""
    reference = _ball()
    other = _ball(shape=(26, 26, 26), origin=(-0.5, -0.5, -0.5), spacing=(1.25, 1.25, 1.25))
    result = evaluate(other, reference)
    assert result["dice"] > 0.9 and result["ssim"] > 0.8
    shifted = _ball(center=(21.5, 15.5, 15.5))  # a 6 mm shift is clearly worse
    assert evaluate(shifted, reference)["dice"] < result["dice"] - 0.3
    values = resample_to(other, reference)
    assert values.shape == reference.array.shape
