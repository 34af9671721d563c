"""Procedural phantoms: seeded, anatomically placed tissue classes, HU <-> attenuation."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from ixgs.phantom import (MU_WATER_PER_MM, attenuation_to_hu, default_roi, hu_to_attenuation, knee_phantom,
                          make_phantom, spine_phantom)


def hu_at(volume, point_mm, radius_vox: int = 0) -> float:
    """Mean HU of the voxels within ``radius_vox`` of the voxel nearest a world point."""
    index = np.round((np.asarray(point_mm) - np.asarray(volume.origin)) / np.asarray(volume.spacing)).astype(int)
    i, j, k = index
    r = radius_vox
    return float(volume.array[k - r:k + r + 1, j - r:j + r + 1, i - r:i + r + 1].mean())


@pytest.fixture(scope="module")
def spine():
    started = time.perf_counter()
    volume = spine_phantom(seed=0)
    return volume, time.perf_counter() - started


@pytest.fixture(scope="module")
def knee():
    return knee_phantom(seed=0)


def test_phantoms_are_deterministic_per_seed_and_vary_across_seeds():
    for maker in (spine_phantom, knee_phantom):
        a, b, c = maker(seed=3, voxel_size_mm=4.0), maker(seed=3, voxel_size_mm=4.0), maker(seed=4, voxel_size_mm=4.0)
        assert np.array_equal(a.array, b.array)
        assert np.abs(a.array - c.array).mean() > 5.0  # HU


def test_spine_geometry_and_tissue_classes(spine):
    volume, seconds = spine
    assert seconds < 6.0  # ~1.7 s alone on this CPU; headroom for a shared machine
    assert volume.array.dtype == np.float32
    extent = np.asarray(volume.spacing) * np.asarray(volume.array.shape[::-1])
    assert 300 <= extent[0] <= 340 and 230 <= extent[1] <= 260 and 120 <= extent[2] <= 160
    assert hu_at(volume, (0, 0, 0), 2) == pytest.approx(250, abs=100)          # trabecular body centre
    assert hu_at(volume, (0, 0, 18.5), 1) == pytest.approx(80, abs=20)          # disc between L-levels
    assert hu_at(volume, (100, 20, 0), 1) == pytest.approx(40, abs=10)          # soft tissue
    assert hu_at(volume, (0, 82, 0), 0) == pytest.approx(-100, abs=20)          # posterior subcutaneous fat
    assert hu_at(volume, (-160, -150, 0), 0) == -1000.0                         # air outside the body
    assert volume.array.max() <= 1600
    assert np.count_nonzero(volume.array >= 1000) > 5000                        # cortical shells (voxels)
    assert np.count_nonzero((volume.array > 150) & (volume.array < 400)) > 50000  # trabecular bone


def test_spine_roi_holds_the_vertebrae_and_the_body_is_much_larger(spine):
    volume, _ = spine
    roi = default_roi("spine")
    bone = np.argwhere(volume.array > 300)[:, ::-1] * np.asarray(volume.spacing) + np.asarray(volume.origin)
    middle = bone[np.abs(bone[:, 2]) < 15]  # the middle vertebra, (x, y, z) mm
    assert len(middle) > 10000 and roi.contains(middle).mean() > 0.995
    body_i = np.nonzero((volume.array > -500).any(axis=(0, 1)))[0]
    body_width = (body_i.max() - body_i.min() + 1) * volume.spacing[0]
    assert body_width > 2.5 * roi.size[0]                                        # views will be truncated


def test_knee_tissue_classes(knee):
    assert hu_at(knee, (0, 4, 30), 2) == pytest.approx(250, abs=100)            # femoral metaphysis marrow
    assert hu_at(knee, (0, 3, 80), 2) == pytest.approx(60, abs=60)              # fatty shaft marrow
    assert 1100 <= hu_at(knee, (12, 3, 80), 0) <= 1600                          # shaft cortex
    assert hu_at(knee, (0, -42, 22), 2) == pytest.approx(250, abs=100)          # patella
    assert hu_at(knee, (0, 4, -12), 2) == pytest.approx(250, abs=100)           # tibial plateau
    assert 20 <= hu_at(knee, (20, 5, 0), 0) <= 100                              # joint space
    assert hu_at(knee, (0, 0, 0), 0) > -1000 and knee.array[0, 0, 0] == -1000.0
    joint = knee.array[int(round(-knee.origin[2] / knee.spacing[2]))]  # the axial slice z = 0
    leg_i = np.nonzero((joint > -500).any(axis=0))[0]
    assert 110 <= (leg_i.max() - leg_i.min() + 1) * knee.spacing[0] <= 150


def test_attenuation_conversion():
    assert hu_to_attenuation(0.0) == pytest.approx(0.0206, rel=1e-6)
    assert hu_to_attenuation(-1000.0) == pytest.approx(0.0, abs=1e-12)
    assert hu_to_attenuation(-1200.0) == 0.0
    assert float(hu_to_attenuation(torch.tensor(1000.0))) == pytest.approx(2 * MU_WATER_PER_MM)
    hu = np.array([-1000.0, -100.0, 40.0, 1500.0])
    assert np.allclose(attenuation_to_hu(hu_to_attenuation(hu)), hu, atol=1e-9)


def test_bad_names_are_refused():
    with pytest.raises(ValueError, match="phantom"):
        default_roi("elbow")
    with pytest.raises(ValueError, match="phantom"):
        make_phantom("elbow")
