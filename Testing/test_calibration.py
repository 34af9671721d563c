"""Fiducial calibration: simulated helix-phantom views with noise, missing and spurious beads."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ixgs.calibration import (
    calibrate_scan,
    calibrate_view,
    detect_beads,
    helix_layout,
    load_layout,
    render_beads,
)
from ixgs.geometry import project_points
from ixgs.scan import read_scan, write_scan
from ixgs.simulate import c_arm_projection_matrix

SHAPE = (160, 160)
SPACING = (1.2, 1.2)
# (primary, secondary) nominal angles; the true pose is off by a few degrees, mm and a different SID.
POSES = [(-60.0, 10.0), (-10.0, -20.0), (35.0, 15.0), (80.0, -5.0)]


def phantom_image(layout, true_matrix, rng, missing=3, spurious=3, noise=0.03) -> np.ndarray:
    """Beads (some hidden) plus bead-like foreign bodies, a smooth soft-tissue background and noise."""
    keep = np.ones(len(layout.positions_mm), bool)
    keep[rng.choice(len(keep), missing, replace=False)] = False
    foreign = layout.positions_mm.mean(axis=0) + rng.uniform(-50.0, 50.0, (spurious, 3))
    image = render_beads(np.vstack([layout.positions_mm[keep], foreign]), layout.diameter_mm, true_matrix, SHAPE)
    v, u = np.mgrid[:SHAPE[0], :SHAPE[1]]
    background = 1.5 + 0.8 * np.exp(-((u - 70.0) ** 2 + (v - 90.0) ** 2) / (2 * 40.0 ** 2))
    return (image + background + rng.normal(0.0, noise, SHAPE)).astype(np.float32)


def true_and_prior(primary, secondary):
    true = c_arm_projection_matrix(primary + 4.0, secondary - 3.0, 1030.0, 680.0, SHAPE, SPACING,
                                   isocenter=(8.0, -6.0, 10.0))
    prior = c_arm_projection_matrix(primary, secondary, 1000.0, 700.0, SHAPE, SPACING)
    return true, prior


def max_reprojection_difference(P, Q, points) -> float:
    return float(np.linalg.norm(project_points(P, points)[:, :2] - project_points(Q, points)[:, :2], axis=1).max())


def test_views_are_calibrated_to_under_half_a_pixel():
    layout = helix_layout()
    rng = np.random.default_rng(0)
    # Points spread over the phantom's box: the whole calibrated region, not only the beads.
    corners = np.array(np.meshgrid(*[[lo, hi] for lo, hi in zip(layout.roi.lower, layout.roi.upper)])).reshape(3, -1).T
    for index, (primary, secondary) in enumerate(POSES):
        true, prior = true_and_prior(primary, secondary)
        assert max_reprojection_difference(prior, true, layout.positions_mm) > 10.0  # the prior is rough
        result = calibrate_view(phantom_image(layout, true, rng), layout, prior, f"view {index}")
        assert result.rms_px < 0.5 and result.max_px < 0.5
        assert result.matched >= 12
        assert max_reprojection_difference(result.projection_matrix, true, layout.positions_mm) < 0.5
        assert max_reprojection_difference(result.projection_matrix, true, np.vstack([corners, layout.roi.center])) < 0.5


def test_detected_centroids_are_sub_pixel():
    layout = helix_layout()
    true, _ = true_and_prior(20.0, 0.0)
    image = phantom_image(layout, true, np.random.default_rng(1), missing=0, spurious=0)
    detected = detect_beads(image, radius_px=1.9)
    truth = project_points(true, layout.positions_mm)[:, :2]
    distances = np.linalg.norm(detected[:, None, :] - truth[None, :, :], axis=2).min(axis=1)
    assert len(detected) >= 18
    assert np.median(distances) < 0.1 and distances.max() < 0.3


def test_calibrate_scan_writes_calibrated_matrices_and_refuses_blank_views(tmp_path):
    layout = helix_layout()
    rng = np.random.default_rng(2)
    truths, priors, images = [], [], []
    for primary, secondary in POSES[:3]:
        true, prior = true_and_prior(primary, secondary)
        truths.append(true)
        priors.append(prior)
        images.append(phantom_image(layout, true, rng))
    write_scan(tmp_path / "phantom", images, priors)
    path, report = calibrate_scan(tmp_path / "phantom", "helix", tmp_path / "calibrated")
    scan = read_scan(path)
    for view, true in zip(scan.views, truths):
        assert max_reprojection_difference(view.projection_matrix, true, layout.positions_mm) < 0.5
    saved = json.loads((path / "calibration.json").read_text())
    assert [v["image"] for v in saved["views"]] == ["views/000.nrrd", "views/001.nrrd", "views/002.nrrd"]
    assert all(v["rms_px"] < 0.5 for v in report["views"])

    blank = np.random.default_rng(3).normal(1.0, 0.03, SHAPE).astype(np.float32)
    write_scan(tmp_path / "with_blank", images[:2] + [blank], priors)
    with pytest.raises(ValueError, match=r"views/002\.nrrd: cannot be calibrated"):
        calibrate_scan(tmp_path / "with_blank", "helix", tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_layout_json_round_trip_and_errors(tmp_path):
    layout = helix_layout(n_beads=10, diameter_mm=2.0)
    (tmp_path / "layout.json").write_text(json.dumps(layout.to_dict()))
    loaded = load_layout(tmp_path / "layout.json")
    assert np.array_equal(loaded.positions_mm, layout.positions_mm) and loaded.diameter_mm == 2.0
    (tmp_path / "few.json").write_text(json.dumps({**layout.to_dict(), "beads_mm": [[0, 0, 0]] * 3}))
    with pytest.raises(ValueError, match="few.json: 'beads_mm' must hold at least 8"):
        load_layout(tmp_path / "few.json")
    with pytest.raises(ValueError, match="missing.json: bead layout not found"):
        load_layout(tmp_path / "missing.json")
