"""Scan I/O: round trips in every form, the default ROI, and every refusal of SCAN_FORMAT.md."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import ring_of_matrices

from ixgs.geometry import Roi, project_points, source_position
from ixgs.output_folder import OutputError
from ixgs.scan import ScanError, decompose_projection_matrix, read_scan, write_scan
from ixgs.volume import Volume


def _images(n, shape=(32, 40), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.uniform(0.0, 3.0, size=shape).astype(np.float32) for _ in range(n)]


def _same_projection(p, q):
    """Two matrices project identically (equal up to a positive scale)."""
    ratio = np.linalg.norm(p) / np.linalg.norm(q)
    return np.allclose(p, ratio * q, atol=1e-9 * np.abs(p).max())


@pytest.mark.parametrize("world", ["LPS", "RAS"])
@pytest.mark.parametrize("matrix_form", ["projection_matrix", "intrinsics"])
def test_round_trip_every_form(tmp_path, small_roi, world, matrix_form):
    matrices = ring_of_matrices(5)
    images = _images(5)
    write_scan(tmp_path / "scan", images, matrices, roi=small_roi, world=world, matrix_form=matrix_form)
    meta = json.loads((tmp_path / "scan" / "scan.json").read_text())
    assert meta["world"] == world and matrix_form in meta["views"][0]
    if world == "RAS":  # the file holds RAS coordinates: the ROI centre's x, y flipped
        assert meta["roi"]["center"] == [-0.0, -0.0, 0.0]
    scan = read_scan(tmp_path / "scan")
    assert len(scan.views) == 5
    assert scan.roi == small_roi
    points = np.array([[10.0, -20.0, 5.0], [0.0, 0.0, 0.0], [-25.0, 15.0, 20.0]])
    for view, image, matrix in zip(scan.views, images, matrices):
        np.testing.assert_array_equal(view.image, image)
        assert _same_projection(view.projection_matrix, matrix)
        np.testing.assert_allclose(project_points(view.projection_matrix, points)[:, :2],
                                   project_points(matrix, points)[:, :2], atol=1e-8)
        np.testing.assert_allclose(view.source, source_position(matrix), atol=1e-8)
        assert project_points(view.projection_matrix, points)[:, 2].min() > 0  # normalised: w > 0 in front


def test_ras_file_means_ras_points(tmp_path, small_roi):
    """A matrix written for RAS points maps the RAS point (-x, -y, z) where the LPS one goes."""
    matrices = ring_of_matrices(3)
    write_scan(tmp_path / "scan", _images(3), matrices, roi=small_roi, world="RAS")
    meta = json.loads((tmp_path / "scan" / "scan.json").read_text())
    p_ras = np.asarray(meta["views"][1]["projection_matrix"])
    lps, ras = np.array([12.0, -7.0, 3.0]), np.array([-12.0, 7.0, 3.0])
    np.testing.assert_allclose(project_points(p_ras, ras), project_points(matrices[1], lps), atol=1e-9)


def test_decomposition_gives_proper_rotation_and_same_matrix():
    rng = np.random.default_rng(3)
    for _ in range(10):
        p = rng.normal(size=(3, 4))
        intrinsics, world_to_camera = decompose_projection_matrix(p)
        rotation = world_to_camera[:3, :3]
        np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(rotation) == pytest.approx(1.0)
        assert intrinsics[2, 2] == 1.0 and intrinsics[1, 0] == intrinsics[2, 0] == intrinsics[2, 1] == 0.0
        q = intrinsics @ world_to_camera[:3]
        scale = p[2, 2] / q[2, 2]
        assert scale > 0
        np.testing.assert_allclose(p, scale * q, atol=1e-10)


def test_transmission_with_and_without_i0(tmp_path, small_roi):
    line_integrals = _images(3)
    i0 = 5000.0
    raw = [i0 * np.exp(-image) for image in line_integrals]
    for index in range(3):  # unattenuated pixels, so I0 can be estimated from the brightest ones
        raw[index][:2, :] = i0
    write_scan(tmp_path / "given", raw, ring_of_matrices(3), intensity="transmission", i0=i0, roi=small_roi)
    write_scan(tmp_path / "estimated", raw, ring_of_matrices(3), intensity="transmission", roi=small_roi)
    for folder in ("given", "estimated"):
        scan = read_scan(tmp_path / folder)
        for view, image in zip(scan.views, line_integrals):
            expected = image.copy()
            expected[:2, :] = 0.0
            np.testing.assert_allclose(view.image, expected, atol=1e-4)


def test_default_roi_is_the_box_of_what_every_view_sees(tmp_path):
    matrices = ring_of_matrices(6)
    write_scan(tmp_path / "scan", _images(6), matrices)
    scan = read_scan(tmp_path / "scan")
    roi = scan.roi
    points = np.random.default_rng(0).uniform(-150, 150, size=(200_000, 3))
    seen = np.ones(len(points), bool)
    for view in scan.views:
        uvw = project_points(view.projection_matrix, points)
        seen &= (uvw[:, 2] > 0) & (np.abs(uvw[:, 0] - 19.5) <= 20) & (np.abs(uvw[:, 1] - 15.5) <= 16)
    assert seen.sum() > 1000 and roi.contains(np.zeros(3))
    # The box bounds the seen region tightly: within a few mm (the search grid) on every side.
    np.testing.assert_allclose(points[seen].min(axis=0), roi.lower, atol=3.0)
    np.testing.assert_allclose(points[seen].max(axis=0), roi.upper, atol=3.0)


def test_reference_volume_written_and_found(tmp_path, small_roi):
    reference = Volume(np.ones((4, 5, 6), np.float32), (1.0, 2.0, 3.0), (0.5, 0.5, 2.0))
    write_scan(tmp_path / "scan", _images(2), ring_of_matrices(2), roi=small_roi, reference=reference)
    scan = read_scan(tmp_path / "scan")
    loaded = Volume.read(scan.reference_volume)
    assert loaded.array.shape == (4, 5, 6) and loaded.spacing == (0.5, 0.5, 2.0)


def _scan_with(tmp_path, small_roi, edit):
    """Write a valid 3-view scan, let ``edit(meta, folder)`` break it, and return its folder."""
    folder = tmp_path / "scan"
    write_scan(folder, _images(3), ring_of_matrices(3), roi=small_roi)
    meta = json.loads((folder / "scan.json").read_text())
    edit(meta, folder)
    (folder / "scan.json").write_text(json.dumps(meta))
    return folder


def _set(key, value, view=None):
    def edit(meta, folder):
        (meta if view is None else meta["views"][view])[key] = value
    return edit


def _nan_pixels(meta, folder):
    image = np.zeros((32, 40), np.float32)
    image[3, 4] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(image), str(folder / "views" / "002.nrrd"))


def _both_forms(meta, folder):
    meta["views"][1]["intrinsics"] = np.eye(3).tolist()
    meta["views"][1]["world_to_camera"] = np.eye(4).tolist()


@pytest.mark.parametrize("edit, message", [
    (lambda meta, folder: (folder / "views" / "001.nrrd").unlink(), r"view 1 \(views/001.nrrd\): image file not found"),
    (_set("projection_matrix", np.eye(3).tolist(), view=2), r"view 2 .*must be 3x4, got shape \(3, 3\)"),
    (_set("projection_matrix", [[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0]], view=0), r"view 0 .*singular"),
    (_set("projection_matrix", [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 5]], view=1), r"view 1 .*source lies inside the ROI"),
    (_nan_pixels, r"view 2 .*NaN or Inf pixels"),
    (_set("projection_matrix", [[float("nan")] * 4] * 3, view=0), r"view 0 .*NaN or Inf entries"),
    (lambda meta, folder: meta.__setitem__("views", meta["views"][:1]), r"at least 2 views, got 1"),
    (_set("format", "something"), r"'format' must be 'ixgs.scan'"),
    (_set("version", 2), r"'version' must be 1"),
    (_set("world", "RAI"), r"'world' must be one of"),
    (_set("intensity", "log"), r"'intensity' must be one of"),
    (_set("i0", -3), r"'i0' must be a positive number"),
    (_both_forms, r"view 1 .*either 'projection_matrix' or"),
    (_set("roi", {"center": [0, 0, 0], "size": [10, -1, 10]}), r"'roi': 'size' must be positive"),
    (_set("reference_volume", "missing.nrrd"), r"reference_volume 'missing.nrrd': file not found"),
])
def test_refusals_name_view_and_problem(tmp_path, small_roi, edit, message):
    folder = _scan_with(tmp_path, small_roi, edit)
    with pytest.raises(ScanError, match=message):
        read_scan(folder)


def test_not_a_scan_folder(tmp_path):
    with pytest.raises(ScanError, match="no scan.json"):
        read_scan(tmp_path)
    (tmp_path / "scan.json").write_text("{broken")
    with pytest.raises(ScanError, match="not valid JSON"):
        read_scan(tmp_path)


def test_failed_write_leaves_nothing(tmp_path, small_roi):
    images = _images(2) + [np.zeros((2, 3, 4), np.float32)]
    with pytest.raises(ScanError, match="view 2: image must be 2D"):
        write_scan(tmp_path / "scan", images, ring_of_matrices(3), roi=small_roi)
    assert list(tmp_path.iterdir()) == []


def test_write_refuses_to_overwrite_other_folders(tmp_path, small_roi):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(OutputError, match=r"is not an ixgs output \(no \.ixgs-output marker; it holds precious\.txt"):
        write_scan(tmp_path, _images(2), ring_of_matrices(2), roi=small_roi)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    write_scan(tmp_path / "scan", _images(2), ring_of_matrices(2), roi=small_roi)
    write_scan(tmp_path / "scan", _images(3, seed=1), ring_of_matrices(3), roi=small_roi)  # a scan is replaced
    assert len(read_scan(tmp_path / "scan").views) == 3


def test_roi_from_file_is_used(tmp_path):
    roi = Roi((5.0, -3.0, 2.0), (30.0, 40.0, 50.0))
    write_scan(tmp_path / "scan", _images(2), ring_of_matrices(2), roi=roi)
    assert read_scan(tmp_path / "scan").roi == roi


@pytest.mark.parametrize("world", ["LPS", "RAS"])
@pytest.mark.parametrize("matrix_form", ["projection_matrix", "intrinsics"])
def test_bead_lands_at_p_x_through_every_form(tmp_path, world, matrix_form):
    """Project a bead with the voxel projector, write the scan in each form and world, read it back:
    the bead's centroid in every view is within 0.5 px of P·X computed from the file's own matrix."""
    import torch

    from ixgs.geometry import LPS_RAS_FLIP, view_rays
    from ixgs.projector import forward_project

    bead = np.array([7.0, -11.0, 5.0])  # LPS mm
    grid = Roi((0.0, 0.0, 0.0), (60.0, 60.0, 60.0)).grid(0.5)
    inside = np.linalg.norm(grid.voxel_centers() - bead, axis=-1) <= 1.5
    volume = torch.as_tensor(inside.astype(np.float32) * 0.05)
    matrices = ring_of_matrices(4, shape=(64, 80), focal_px=400.0)
    images = [forward_project(volume, grid, view_rays(P, (64, 80))).numpy() for P in matrices]
    write_scan(tmp_path / "scan", images, matrices, roi=Roi((0.0, 0.0, 0.0), (60.0, 60.0, 60.0)), world=world,
               matrix_form=matrix_form)
    meta = json.loads((tmp_path / "scan" / "scan.json").read_text())
    bead_in_file = (LPS_RAS_FLIP[:3, :3] @ bead) if world == "RAS" else bead
    for view, entry in zip(read_scan(tmp_path / "scan").views, meta["views"]):
        if matrix_form == "projection_matrix":
            file_matrix = np.asarray(entry["projection_matrix"])
        else:
            file_matrix = np.asarray(entry["intrinsics"]) @ np.asarray(entry["world_to_camera"])[:3]
        expected = project_points(file_matrix, bead_in_file)[:2]
        rows, cols = np.indices(view.image.shape)
        weights = view.image / view.image.sum()
        centroid = np.array([(cols * weights).sum(), (rows * weights).sum()])
        assert np.linalg.norm(centroid - expected) < 0.5, (centroid, expected)
