"""Peer formats: R2-Gaussian scenes, NAF pickles and TIGRE folders in; R2-Gaussian out; round trips."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from ixgs.geometry import Roi, project_points
from ixgs.peers import (
    ConeGeometry,
    export_r2gaussian,
    import_peer,
    read_naf,
    read_r2gaussian,
    read_tigre,
    tigre_projection_matrix,
)
from ixgs.scan import read_scan, write_scan
from ixgs.simulate import c_arm_projection_matrix
from ixgs.volume import Volume

ANGLES = np.linspace(0.0, np.pi, 5, endpoint=False) + 0.3
SHAPE = (12, 16)  # (v, u)


def relative_difference(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.abs(a / np.linalg.norm(a) - b / np.linalg.norm(b)).max())


def write_r2_scene(folder, offset_uv=(0.01, -0.02)):
    """A scene as R2-Gaussian's generator writes it: metres, rows flipped, volume [x, y, z]."""
    rng = np.random.default_rng(0)
    (folder / "proj_train").mkdir(parents=True)
    entries = []
    for index, angle in enumerate(ANGLES):
        name = f"proj_train/proj_train_{index:04d}.npy"
        np.save(folder / name, rng.random(SHAPE).astype(np.float32))
        entries.append({"file_path": name, "angle": float(angle)})
    np.save(folder / "vol_gt.npy", rng.random((4, 5, 6)).astype(np.float32))
    scanner = {"mode": "cone", "filter": None, "DSD": 1.5, "DSO": 1.0, "nDetector": list(SHAPE),
               "sDetector": [0.36, 0.4], "nVoxel": [4, 5, 6], "sVoxel": [0.2, 0.25, 0.3],
               "offOrigin": [0.01, 0.0, -0.02], "offDetector": list(offset_uv), "accuracy": 0.5,
               "totalAngle": 180.0, "startAngle": 0.0}
    meta = {"scanner": scanner, "vol": "vol_gt.npy", "bbox": [[-1, -1, -1], [1, 1, 1]], "proj_train": entries,
            "proj_test": []}
    (folder / "meta_data.json").write_text(json.dumps(meta))
    return meta


def test_tigre_model_matches_dicom_c_arm_turned_by_180_degrees():
    """Independent check: TIGRE's source at angle a is the C-arm's at primary a - 90 degrees; R2-Gaussian's
    image (TIGRE's, rows flipped) is the C-arm's image turned by 180 degrees."""
    geometry = ConeGeometry(1100.0, 700.0, SHAPE, (0.5, 0.4))
    points = np.random.default_rng(1).uniform(-50, 50, (20, 3))
    for angle in ANGLES:
        r2 = tigre_projection_matrix(angle, geometry, rows_up=True)
        c_arm = c_arm_projection_matrix(np.degrees(angle) - 90.0, 0.0, 1100.0, 700.0, SHAPE, (0.5, 0.4))
        ours = project_points(c_arm, points)[:, :2]
        theirs = project_points(r2, points)[:, :2]
        assert np.abs(theirs - ([SHAPE[1] - 1, SHAPE[0] - 1] - ours)).max() < 1e-9
    # A detector shifted by +offU (mm) along its u axis moves the central ray's pixel by -offU/du.
    shifted = ConeGeometry(1100.0, 700.0, SHAPE, (0.5, 0.4), (0.0, 0.8))
    u0 = project_points(tigre_projection_matrix(0.0, geometry), np.zeros(3))[0]
    u1 = project_points(tigre_projection_matrix(0.0, shifted), np.zeros(3))[0]
    assert u1 - u0 == pytest.approx(-2.0)


def test_r2gaussian_import_units_volume_and_export_round_trip(tmp_path):
    meta = write_r2_scene(tmp_path / "scene")
    scan = read_scan(import_peer(tmp_path / "scene", tmp_path / "scan", "r2gaussian"))
    assert len(scan.views) == len(ANGLES)
    assert np.array_equal(scan.views[2].image, np.load(tmp_path / "scene" / meta["proj_train"][2]["file_path"]))
    assert np.linalg.norm(scan.views[0].source) == pytest.approx(1000.0)  # DSO 1 m
    assert scan.roi.center == pytest.approx((10.0, 0.0, -20.0)) and scan.roi.size == pytest.approx((200, 250, 300))
    reference = Volume.read(scan.reference_volume)
    volume_xyz = np.load(tmp_path / "scene" / "vol_gt.npy")
    assert reference.array.shape == (6, 5, 4)
    assert reference.array[5, 1, 3] == pytest.approx(volume_xyz[3, 1, 5] / 1000.0)  # per metre -> per mm

    out = export_r2gaussian(tmp_path / "scan", tmp_path / "exported")
    again = read_scan(import_peer(out, tmp_path / "again", "r2gaussian"))
    for a, b in zip(scan.views, again.views):
        assert relative_difference(a.projection_matrix, b.projection_matrix) < 1e-9
        assert np.array_equal(a.image, b.image)
    exported = json.loads((out / "meta_data.json").read_text())
    assert exported["scanner"]["DSO"] == pytest.approx(1.0)
    assert exported["scanner"]["offDetector"] == pytest.approx(meta["scanner"]["offDetector"])
    assert [e["angle"] for e in exported["proj_train"]] == pytest.approx(ANGLES)
    assert np.allclose(np.load(out / "vol_gt.npy"), volume_xyz, rtol=1e-6)


def test_c_arm_orbit_exports_with_turned_images_and_non_orbits_are_refused(tmp_path):
    roi = Roi((5.0, -4.0, 3.0), (60.0, 60.0, 60.0))
    rng = np.random.default_rng(2)
    primaries = [-60.0, -20.0, 20.0, 60.0]
    matrices = [c_arm_projection_matrix(a, 0.0, 1100.0, 700.0, SHAPE, (0.5, 0.4), roi.center, (1.0, -2.0))
                for a in primaries]
    images = [rng.random(SHAPE).astype(np.float32) for _ in primaries]
    write_scan(tmp_path / "c_arm", images, matrices, roi=roi)
    out = export_r2gaussian(tmp_path / "c_arm", tmp_path / "r2")
    assert json.loads((out / "meta_data.json").read_text())["ixgs"]["image_flip"] == "rotate180"
    again = read_scan(import_peer(out, tmp_path / "again", "r2gaussian"))
    points = rng.uniform(-20, 20, (30, 3)) + roi.center
    for original, imported in zip(read_scan(tmp_path / "c_arm").views, again.views):
        ours = project_points(original.projection_matrix, points)[:, :2]
        theirs = project_points(imported.projection_matrix, points)[:, :2]
        assert np.abs(theirs - ([SHAPE[1] - 1, SHAPE[0] - 1] - ours)).max() < 1e-6
        assert np.array_equal(imported.image, original.image[::-1, ::-1])

    tilted = matrices[:2] + [c_arm_projection_matrix(20.0, 15.0, 1100.0, 700.0, SHAPE, (0.5, 0.4), roi.center)]
    write_scan(tmp_path / "tilted", images[:3], tilted, roi=roi)
    with pytest.raises(ValueError, match=r"view 2 \(views/002\.nrrd\): not a view of one circular orbit"):
        export_r2gaussian(tmp_path / "tilted", tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_naf_pickle_and_tigre_folder_give_the_same_views(tmp_path):
    meta = write_r2_scene(tmp_path / "scene")
    images, matrices, roi, reference = read_r2gaussian(tmp_path / "scene")
    scanner = meta["scanner"]
    # As R2-Gaussian's ours_to_naf_format.py converts: lengths in mm, projections and volume unchanged.
    naf = {**scanner, "DSD": 1500.0, "DSO": 1000.0, "sDetector": [360.0, 400.0], "sVoxel": [200.0, 250.0, 300.0],
           "offOrigin": [10.0, 0.0, -20.0], "offDetector": [10.0, -20.0], "dDetector": [30.0, 25.0],
           "dVoxel": [50.0, 50.0, 50.0], "numTrain": len(ANGLES), "numVal": 0,
           "train": {"projections": np.stack(images), "angles": ANGLES},
           "image": np.load(tmp_path / "scene" / "vol_gt.npy")}
    with open(tmp_path / "scene.pickle", "wb") as handle:
        pickle.dump(naf, handle, pickle.HIGHEST_PROTOCOL)
    naf_images, naf_matrices, naf_roi, naf_reference = read_naf(tmp_path / "scene.pickle")
    for a, b in zip(matrices, naf_matrices):
        assert relative_difference(a, b) < 1e-9
    assert np.array_equal(np.stack(naf_images), np.stack(images)) and naf_roi == pytest.approx(roi)
    assert np.allclose(naf_reference.array, reference.array)

    # TIGRE's own arrays: rows not flipped, (z, y, x) volume fields, offDetector (v, u), mm.
    folder = tmp_path / "tigre"
    folder.mkdir()
    np.save(folder / "angles.npy", np.stack([ANGLES, 0 * ANGLES, 0 * ANGLES], axis=1))
    np.save(folder / "projections.npy", np.stack(images)[:, ::-1, :])
    geo = {"mode": "cone", "DSD": 1500.0, "DSO": 1000.0, "nDetector": list(SHAPE), "dDetector": [30.0, 25.0],
           "offDetector": [-20.0, 10.0], "nVoxel": [6, 5, 4], "sVoxel": [300.0, 250.0, 200.0],
           "offOrigin": [-20.0, 0.0, 10.0]}
    (folder / "geometry.json").write_text(json.dumps(geo))
    tigre_images, tigre_matrices, tigre_roi, _ = read_tigre(folder)
    points = np.random.default_rng(3).uniform(-100, 100, (20, 3))
    for image, tigre_image, P, Q in zip(images, tigre_images, matrices, tigre_matrices):
        flipped = project_points(Q, points)[:, :2] * [1, -1] + [0, SHAPE[0] - 1]
        assert np.abs(flipped - project_points(P, points)[:, :2]).max() < 1e-9
        assert np.array_equal(tigre_image[::-1], image)
    assert tigre_roi == pytest.approx(roi)

    (folder / "geometry.json").write_text(json.dumps({**geo, "COR": 1.5}))
    with pytest.raises(ValueError, match="geometry.json: 'COR' must be zero"):
        read_tigre(folder)


def test_bad_peer_files_are_refused_by_name(tmp_path):
    write_r2_scene(tmp_path / "scene")
    meta = json.loads((tmp_path / "scene" / "meta_data.json").read_text())
    meta["scanner"]["DSO"] = 2.0
    (tmp_path / "scene" / "meta_data.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"meta_data.json: need 0 < DSO"):
        read_r2gaussian(tmp_path / "scene")
    meta["scanner"]["DSO"] = 1.0
    meta["proj_train"][1]["file_path"] = "missing.npy"
    (tmp_path / "scene" / "meta_data.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"proj_train\[1\]: file .*missing.npy not found"):
        read_r2gaussian(tmp_path / "scene")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pickle", "wb") as handle:
        pickle.dump({"train": Evil()}, handle)
    with pytest.raises(ValueError, match="evil.pickle: not a NAF pickle .*refusing to load builtins.print"):
        read_naf(tmp_path / "evil.pickle")
    with pytest.raises(ValueError, match="--format must be one of"):
        import_peer(tmp_path / "scene", tmp_path / "x", "colmap")
