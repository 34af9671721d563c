"""Realism simulator, bone-enhanced target and paired data: physics effects, scales, files, refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ixgs.phantom import MU_WATER_PER_MM, hu_to_attenuation, make_phantom
from ixgs.projector import project_volume
from ixgs.simulate import c_arm_projection_matrix, simulate_scan
from ixgs.standardize.pairs_data import (
    MANIFEST,
    TRAINING_PHANTOM_SEED_START,
    generate_pairs,
    make_standardization_data,
    pairs_from_scan,
    read_pairs,
)
from ixgs.standardize.realism import (
    DISPLAY_LEVELS,
    RealismSettings,
    detector_counts,
    display_image,
    log_image,
    polychromatic_transmission,
    random_realism,
    simulate_realistic_scan,
)
from ixgs.standardize.target import (
    BONE_WEIGHT,
    MU_BONE_PER_MM,
    SOFT_TISSUE_WEIGHT,
    bone_enhanced_drr,
    denormalize_target,
    material_fractions,
    normalize_target,
    target_attenuation,
    target_volume,
)
from ixgs.scan import read_scan
from ixgs.volume import Volume

CLEAN = RealismSettings(heel=0.0, flat_field=0.0, scatter_to_primary=0.0, blur_px=0.0, i0=1e6)


def test_material_split_reproduces_engine_attenuation_and_target_weights():
    hu = np.linspace(-1000.0, 1800.0, 281, dtype=np.float32)
    water, bone = material_fractions(hu)
    assert water.min() >= 0 and bone.min() >= 0
    np.testing.assert_allclose(MU_WATER_PER_MM * water + MU_BONE_PER_MM * bone, hu_to_attenuation(hu), rtol=1e-5, atol=1e-7)
    expected = SOFT_TISSUE_WEIGHT * MU_WATER_PER_MM * water + BONE_WEIGHT * MU_BONE_PER_MM * bone
    np.testing.assert_allclose(target_attenuation(hu), expected, rtol=1e-6)
    # Bone is weighted up relative to soft tissue: cortical bone / water is larger than at 60 keV.
    ratio = target_attenuation(np.float32(1500.0)) / target_attenuation(np.float32(0.0))
    assert ratio > 1.5 * hu_to_attenuation(1500.0) / hu_to_attenuation(0.0)
    values = np.array([0.0, 1.0, 4.0, 7.9], np.float32)
    np.testing.assert_allclose(denormalize_target(normalize_target(values)), values, atol=1e-5)


def test_target_drr_is_the_line_integral_of_the_target_volume():
    ct = make_phantom("knee", seed=3, voxel_size_mm=3.0)
    P = c_arm_projection_matrix(30.0, 10.0, 1100.0, 700.0, (24, 20), (6.0, 6.0))
    drr = bone_enhanced_drr(ct, P, (24, 20))
    direct = project_volume(target_volume(ct), P, (24, 20))
    assert drr.max() > 1.0  # crosses the knee
    np.testing.assert_allclose(drr, direct, rtol=1e-3, atol=1e-3)


def test_beam_hardening_lowers_effective_attenuation_with_thickness():
    water = np.array([[10.0, 300.0]])
    transmission = polychromatic_transmission(water, np.zeros_like(water), kvp=80.0, filtration_mm_al=3.0)
    mu_effective = -np.log(transmission) / water
    assert mu_effective[0, 1] < 0.95 * mu_effective[0, 0]  # about 9 % lower at 80 kVp, 3 mm Al
    bone = np.array([[5.0, 40.0]])
    transmission = polychromatic_transmission(np.zeros_like(bone), bone, kvp=80.0, filtration_mm_al=3.0)
    mu_bone = -np.log(transmission) / bone
    assert mu_bone[0, 1] < 0.85 * mu_bone[0, 0]


def test_quantum_noise_is_poisson_and_scatter_lowers_contrast():
    rng = np.random.default_rng(0)
    flat = np.zeros((64, 64))
    counts = detector_counts(flat, flat, RealismSettings(heel=0.0, flat_field=0.0, scatter_to_primary=0.0,
                                                          blur_px=0.0, i0=500.0), rng)
    assert abs(counts.var() / counts.mean() - 1.0) < 0.1 and abs(counts.mean() / 500.0 - 1.0) < 0.01
    water = np.full((64, 64), 150.0)
    bone = np.zeros((64, 64))
    bone[:, 24:40] = 20.0
    contrasts = []
    for spr in (0.0, 1.0):
        settings = RealismSettings(heel=0.0, flat_field=0.0, scatter_to_primary=spr, blur_px=0.0, i0=1e6)
        image = log_image(detector_counts(water, bone, settings, rng), settings.i0)
        contrasts.append(image[:, 28:36].mean() - image[:, :16].mean())
    assert contrasts[1] < 0.8 * contrasts[0]


def test_heel_collimator_and_display_processing():
    rng = np.random.default_rng(1)
    water = np.full((64, 64), 50.0)
    heel = detector_counts(water, 0 * water, RealismSettings(heel=0.2, flat_field=0.0, scatter_to_primary=0.0,
                                                              blur_px=0.0, i0=1e6), rng)
    assert 1.15 < heel[:, -4:].mean() / heel[:, :4].mean() < 1.25  # ramp along the columns (angle 0)
    settings = RealismSettings(heel=0.0, flat_field=0.0, scatter_to_primary=0.0, blur_px=0.0, i0=1e6,
                               collimator="shutters", collimator_size=0.8, collimator_leak=0.05)
    counts = detector_counts(water, 0 * water, settings, rng)
    assert abs(counts[:3].mean() / counts[28:36, 28:36].mean() - 0.05) < 0.01
    display = display_image(counts, RealismSettings(display=True))
    assert display.min() >= 0.0 and display.max() <= 1.0
    np.testing.assert_allclose(display * DISPLAY_LEVELS, np.round(display * DISPLAY_LEVELS), atol=1e-3)
    inverted = display_image(counts, RealismSettings(display=True, invert=True))
    np.testing.assert_allclose(inverted, 1.0 - display, atol=1e-6)


def test_realism_settings_are_validated_and_randomized():
    rng = np.random.default_rng(2)
    drawn = [random_realism(rng) for _ in range(50)]
    for settings in drawn:
        settings.validate()
    assert len({s.kvp for s in drawn}) == 50 and 0.3 < np.mean([s.display for s in drawn]) < 0.9
    with pytest.raises(ValueError, match="kvp"):
        RealismSettings(kvp=10.0).validate()
    with pytest.raises(ValueError, match="collimator"):
        detector_counts(np.zeros((4, 4)), np.zeros((4, 4)), RealismSettings(collimator="lead"), rng)
    with pytest.raises(ValueError, match="path lengths"):
        detector_counts(np.zeros((4, 4)), np.zeros((4, 5)), CLEAN, rng)


def test_generated_pairs_are_written_read_and_reproducible(tmp_path):
    out = make_standardization_data(tmp_path / "data", 3, seed=4, detector_px=32, views_per_phantom=2,
                                    voxel_size_mm=4.0)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["target"]["bone_weight"] == BONE_WEIGHT and len(manifest["pairs"]) == 3
    assert [p["phantom"] for p in manifest["pairs"]] == ["spine", "spine", "knee"]
    assert all(p["phantom_seed"] >= TRAINING_PHANTOM_SEED_START for p in manifest["pairs"])
    inputs, targets, _ = read_pairs(out)
    again, again_targets, _ = generate_pairs(3, seed=4, detector_px=32, views_per_phantom=2, voxel_size_mm=4.0)
    for a, b, t, u in zip(inputs, again, targets, again_targets):
        assert a.shape == t.shape == (32, 32)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(t, u)
        assert 0.0 <= t.min() and 0.5 < t.max() < 8.0  # line integrals of the bone-enhanced attenuation
    # Refusals name the folder or file.
    with pytest.raises(ValueError, match="no manifest"):
        read_pairs(tmp_path)
    (out / manifest["pairs"][0]["target"]).unlink()
    with pytest.raises(ValueError, match="pair 0.*not found"):
        read_pairs(out)
    with pytest.raises(ValueError, match="--pairs"):
        generate_pairs(0)


def test_site_pairs_from_a_scan_and_its_ct(tmp_path):
    ct = make_phantom("knee", seed=5, voxel_size_mm=4.0)
    scan = simulate_scan(ct, tmp_path / "scan", n_views=2, detector_px=24, seed=1)
    ct_path = tmp_path / "ct.nrrd"
    ct.write(ct_path)
    out = pairs_from_scan(scan, ct_path, tmp_path / "pairs")
    inputs, targets, manifest = read_pairs(out)
    assert manifest["source"] == "scan" and len(inputs) == 2
    P = np.asarray(manifest["pairs"][1]["projection_matrix"])
    np.testing.assert_allclose(targets[1], bone_enhanced_drr(ct, P, (24, 24)), rtol=1e-5, atol=1e-5)
    tilted = Volume(ct.array, ct.origin, ct.spacing, np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]], float))
    tilted.write(tmp_path / "tilted.nrrd")
    with pytest.raises(ValueError, match="tilted.nrrd.*axis-aligned"):
        pairs_from_scan(scan, tmp_path / "tilted.nrrd", tmp_path / "pairs2")


def test_realistic_scans_share_the_engine_geometry(tmp_path):
    ct = make_phantom("knee", seed=6, voxel_size_mm=4.0)
    clean = read_scan(simulate_scan(ct, tmp_path / "clean", n_views=2, detector_px=24, seed=2))
    raw = read_scan(simulate_realistic_scan(ct, tmp_path / "raw", RealismSettings(i0=1e5), n_views=2,
                                            detector_px=24, seed=2))
    display = read_scan(simulate_realistic_scan(ct, tmp_path / "display", RealismSettings(display=True),
                                                n_views=2, detector_px=24, seed=2))
    for a, b, c in zip(clean.views, raw.views, display.views):
        np.testing.assert_allclose(b.projection_matrix, a.projection_matrix, atol=1e-9)
        np.testing.assert_allclose(c.projection_matrix, a.projection_matrix, atol=1e-9)
        assert 0.0 <= c.image.min() and c.image.max() <= 1.0
        # Raw views (-log by the reader) follow the line integrals, lowered by scatter and beam hardening.
        assert np.corrcoef(a.image.ravel(), b.image.ravel())[0, 1] > 0.9
        assert 0.5 * a.image.max() < b.image.max() < 1.1 * a.image.max()
