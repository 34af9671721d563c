"""C-arm geometry and simulated scans (attenuation and noisy transmission), read back as scans."""
from __future__ import annotations

import numpy as np
import pytest

from ixgs.geometry import Roi, project_points, source_position
from ixgs.phantom import default_roi, hu_to_attenuation, knee_phantom, spine_phantom
from ixgs.projector import project_volume
from ixgs.scan import read_scan
from ixgs.simulate import beam_direction, bone_roi, c_arm_projection_matrix, random_c_arm_poses, simulate_scan
from ixgs.volume import Volume

ISOCENTER = np.array([4.0, 20.0, -7.0])


def matrix(primary, secondary, offset=(0.0, 0.0), shape=(100, 120), spacing=(0.4, 0.3)):
    return c_arm_projection_matrix(primary, secondary, 1100.0, 700.0, shape, spacing, ISOCENTER, offset)


@pytest.mark.parametrize("primary, secondary", [(0, 0), (90, 0), (-37, 22), (130, -45)])
def test_isocentre_projects_to_the_detector_centre_plus_offset(primary, secondary):
    u, v, w = project_points(matrix(primary, secondary, offset=(2.5, -3.0)), ISOCENTER)
    assert (u, v) == pytest.approx(((120 - 1) / 2 - 3.0, (100 - 1) / 2 + 2.5), abs=1e-9)
    assert w == pytest.approx(700.0)  # normalised: w is the depth (mm) along the beam
    source = source_position(matrix(primary, secondary))
    assert np.linalg.norm(source - ISOCENTER) == pytest.approx(700.0)
    assert np.allclose((ISOCENTER - source) / 700.0, beam_direction(primary, secondary))


def test_source_sides_follow_dicom_angles():
    lao = source_position(matrix(90, 0)) - ISOCENTER   # detector at the patient's left
    assert lao == pytest.approx([-700.0, 0.0, 0.0], abs=1e-9)
    ap = source_position(matrix(0, 0)) - ISOCENTER     # detector anterior: source posterior (+y)
    assert ap == pytest.approx([0.0, 700.0, 0.0], abs=1e-9)
    cranial = source_position(matrix(0, 30)) - ISOCENTER  # detector cranial: source caudal
    assert cranial[2] == pytest.approx(-700.0 * np.sin(np.radians(30)))


def test_ap_image_has_head_up_and_patient_left_on_the_right():
    P = matrix(0, 0)
    center = project_points(P, ISOCENTER)[:2]
    superior = project_points(P, ISOCENTER + [0.0, 0.0, 10.0])[:2] - center
    left = project_points(P, ISOCENTER + [10.0, 0.0, 0.0])[:2] - center
    magnification = 1100.0 / 700.0
    assert superior == pytest.approx([0.0, -10.0 * magnification / 0.4])   # rows: spacing 0.4 mm
    assert left == pytest.approx([10.0 * magnification / 0.3, 0.0])       # columns: spacing 0.3 mm


def test_random_poses_are_stratified_and_seeded():
    poses = random_c_arm_poses(10, np.random.default_rng(5))
    again = random_c_arm_poses(10, np.random.default_rng(5))
    assert poses == again
    primary = np.array([p.primary_deg for p in poses])
    secondary = np.sort([p.secondary_deg for p in poses])
    assert np.all(np.floor((primary + 90.0) / 18.0) == np.arange(10))      # one per 18-degree stratum
    assert np.all(np.floor((secondary + 30.0) / 6.0) == np.arange(10))
    assert all(1000 <= p.source_to_detector_mm <= 1200 and 600 <= p.source_to_isocenter_mm <= 750 for p in poses)
    with pytest.raises(ValueError, match="n_views"):
        random_c_arm_poses(0, np.random.default_rng(0))


def test_bad_c_arm_geometry_is_refused():
    with pytest.raises(ValueError, match="source_to_isocenter_mm"):
        c_arm_projection_matrix(0, 0, 700.0, 900.0, (10, 10), (1.0, 1.0))


@pytest.fixture(scope="module")
def knee_scans(tmp_path_factory):
    """The same 3 poses of a coarse knee as an attenuation scan and a noisy transmission scan."""
    phantom = knee_phantom(seed=1, voxel_size_mm=4.0)
    # An odd number of 4 mm voxels around a phantom voxel centre: the reference grid is a subgrid.
    center = np.asarray(phantom.origin) + 4.0 * (np.asarray(phantom.array.shape[::-1]) // 2)
    roi = Roi(tuple(center), (84.0, 84.0, 84.0))
    folder = tmp_path_factory.mktemp("scans")
    calls = []
    attenuation = simulate_scan(phantom, folder / "attenuation", n_views=3, detector_px=32, seed=4, roi=roi,
                                progress=lambda done, total: calls.append((done, total)))
    transmission = simulate_scan(phantom, folder / "transmission", n_views=3, detector_px=32, seed=4, roi=roi,
                                 transmission=True, i0=1e5, blur_px=0.0)
    return phantom, roi, read_scan(attenuation), read_scan(transmission), calls


def test_written_scan_reads_back_with_its_geometry_roi_and_reference(knee_scans):
    phantom, roi, scan, _, calls = knee_scans
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert len(scan.views) == 3 and scan.roi == roi
    attenuation = Volume(hu_to_attenuation(phantom.array), phantom.origin, phantom.spacing)
    for view in scan.views:
        assert view.image.shape == (32, 32)
        assert project_points(view.projection_matrix, roi.center)[:2] == pytest.approx([15.5, 15.5], abs=1e-6)
        expected = project_volume(attenuation, view.projection_matrix, view.image.shape)
        assert np.allclose(view.image, expected, atol=1e-5)
    reference = Volume.read(scan.reference_volume)
    assert reference.array.shape == roi.grid(4.0).shape
    # The phantom's and the reference's 4 mm voxel centres coincide here: identical values.
    centers = reference.grid.voxel_centers()
    index = np.round((centers - np.asarray(phantom.origin)) / np.asarray(phantom.spacing)).astype(int)
    truth = attenuation.array[index[..., 2], index[..., 1], index[..., 0]]
    assert np.allclose(reference.array, truth, atol=1e-6)


def test_transmission_scan_is_the_line_integral_within_poisson_noise(knee_scans):
    _, _, exact, noisy, _ = knee_scans
    z_scores = []
    for clean, view in zip(exact.views, noisy.views):
        assert np.allclose(view.projection_matrix, clean.projection_matrix)
        sigma = np.sqrt(np.exp(clean.image.astype(np.float64)) / 1e5)  # std of -log(I/I0), I ~ Poisson
        z_scores.append((view.image - clean.image) / sigma)
    z = np.concatenate([s.ravel() for s in z_scores])
    assert abs(z.mean()) < 0.15
    assert 0.8 < z.std() < 1.2


def test_spine_views_are_truncated_by_the_body(tmp_path):
    phantom = spine_phantom(seed=0, voxel_size_mm=4.0)
    scan = read_scan(simulate_scan(phantom, tmp_path / "spine", n_views=2, detector_px=24, seed=1,
                                   roi=default_roi("spine")))
    for view in scan.views:
        border = np.concatenate([view.image[0], view.image[-1], view.image[:, 0], view.image[:, -1]])
        assert np.mean(border > 1.0) > 0.6  # rays at the detector edges still cross > 1 mean free path
    with pytest.raises(ValueError, match="i0"):
        simulate_scan(phantom, tmp_path / "bad", n_views=2, detector_px=8, transmission=True, i0=0.0)


def test_default_roi_is_the_bone_bounding_box():
    phantom = knee_phantom(seed=0, voxel_size_mm=4.0)
    roi = bone_roi(phantom, margin_mm=5.0)
    bone = np.argwhere(phantom.array > 300)[:, ::-1] * 4.0 + np.asarray(phantom.origin)
    assert roi.contains(bone).all()
    assert np.allclose(bone.min(axis=0) - 5.0, roi.lower) and np.allclose(bone.max(axis=0) + 5.0, roi.upper)
    with pytest.raises(ValueError, match="no bone"):
        bone_roi(Volume(np.zeros((4, 4, 4), np.float32), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))


def primary_angle(projection_matrix, isocenter) -> float:
    """DICOM primary angle (degrees) of a view from its source position."""
    beam = np.asarray(isocenter) - source_position(projection_matrix)
    return float(np.degrees(np.arctan2(beam[0], -beam[1])))


def test_analytic_scan_has_the_asked_arc_and_exact_views(tmp_path):
    from ixgs.analytic import make_analytic_phantom

    phantom = make_analytic_phantom("knee", seed=2)
    roi = default_roi("knee")
    scan = read_scan(simulate_scan(phantom, tmp_path / "knee", n_views=4, detector_px=16, seed=3, roi=roi,
                                   primary_range=(-60.0, 60.0), secondary_range=(0.0, 0.0), reference_voxel_mm=10.0))
    angles = [primary_angle(view.projection_matrix, roi.center) for view in scan.views]
    assert np.all(np.floor((np.array(angles) + 60.0) / 30.0) == np.arange(4))  # one per 30-degree stratum
    for view in scan.views:
        assert source_position(view.projection_matrix)[2] == pytest.approx(roi.center[2])  # secondary 0: level beam
        assert np.allclose(view.image, phantom.project(view.projection_matrix, (16, 16)), atol=1e-6)
    reference = Volume.read(scan.reference_volume)
    assert reference.array.shape == roi.grid(10.0).shape
    assert np.allclose(reference.array, phantom.reference(roi.grid(10.0)).array)
    with pytest.raises(ValueError, match="primary_range"):
        simulate_scan(phantom, tmp_path / "bad", n_views=2, detector_px=8, roi=roi, primary_range=(30.0, -30.0))
    with pytest.raises(ValueError, match="roi"):
        simulate_scan(phantom, tmp_path / "bad", n_views=2, detector_px=8)


def test_object_field_of_view_leaves_a_cropped_phantom_untruncated(tmp_path):
    from ixgs.analytic import box_corners, make_analytic_phantom

    roi = default_roi("spine")
    phantom = make_analytic_phantom("spine", seed=0).cropped(roi)
    scan = read_scan(simulate_scan(phantom, tmp_path / "spine", n_views=3, detector_px=20, seed=1, roi=roi,
                                   field_of_view="object", reference_voxel_mm=10.0))
    corners = box_corners(roi.lower, roi.upper)
    for view in scan.views:
        uv = project_points(view.projection_matrix, corners)[:, :2]
        assert np.all((uv > -0.5) & (uv < 19.5))
        assert np.abs(uv - 9.5).max() > 9.0  # and the detector is not much larger than needed
        border = np.concatenate([view.image[0], view.image[-1], view.image[:, 0], view.image[:, -1]])
        assert border.max() < 0.05 * view.image.max()  # nothing attenuates beyond the object


def test_simulate_command_defaults_to_the_analytic_model(tmp_path):
    from ixgs.analytic import make_analytic_phantom
    from ixgs.cli import main

    out = tmp_path / "scan"
    assert main(["simulate", "--phantom", "knee", "--views", "2", "--detector", "12", "--seed", "5",
                 "--primary-range", "-10", "10", "--secondary-range", "-5", "5", "--reference-voxel", "10",
                 "--progress", "none",
                 "-o", str(out)]) == 0
    scan = read_scan(out)
    phantom = make_analytic_phantom("knee", seed=5)
    assert np.allclose(scan.views[0].image, phantom.project(scan.views[0].projection_matrix, (12, 12)), atol=1e-6)
    assert all(abs(primary_angle(view.projection_matrix, scan.roi.center)) <= 10.0 for view in scan.views)
    assert main(["simulate", "--phantom", "knee", "--model", "voxel", "--crop", "1", "--views", "2",
                 "-o", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
