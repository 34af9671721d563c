"""IXGSReconstruction logic against a real MRML scene (PyPI slicer-core): geometry, outputs, display,
alignment, CT comparison, MRB round trip."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import vtk

slicer = pytest.importorskip("slicer", reason="needs PyPI slicer-core (pip install slicer-core)")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "IXGSReconstruction"))

from IXGSReconstructionLib import align, compare, nodes, results  # noqa: E402
from ixgs.geometry import LPS_RAS_FLIP, Roi, project_points, source_position  # noqa: E402
from ixgs.volume import Volume  # noqa: E402

from conftest import ring_of_matrices  # noqa: E402


pytestmark = pytest.mark.usefixtures("scene")


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    a, b = [i for i in range(3) if i != axis]
    matrix = np.eye(3)
    matrix[a, a], matrix[a, b], matrix[b, a], matrix[b, b] = c, -s, s, c
    return matrix


def _phantom(shape=(20, 24, 28), spacing=(1.5, 1.5, 1.5), origin=(-20.0, -17.0, -14.0)) -> Volume:
    """Air (0) around soft tissue (0.02 /mm) holding a dense ellipsoid 'bone' (0.05 /mm)."""
    k, j, i = np.indices(shape)
    centre = np.array(shape) / 2
    inside = ((k - centre[0]) / 5) ** 2 + ((j - centre[1]) / 5) ** 2 + ((i - centre[2]) / 9) ** 2 <= 1
    body = ((j - centre[1]) / 9) ** 2 + ((i - centre[2]) / 12) ** 2 <= 1
    array = np.where(inside, 0.05, np.where(body, 0.02, 0.0)).astype(np.float32)
    return Volume(array, origin, spacing)


def _write_outputs(folder: Path, volume: Volume, report: dict) -> Path:
    folder.mkdir(parents=True)
    volume.write(folder / "volume.nrrd")
    Volume((volume.array > 0.035).astype(np.uint8), volume.origin, volume.spacing, volume.direction).write(
        folder / "bone.nrrd")
    coverage = np.full(volume.array.shape, 7, np.uint8)
    coverage[:, :, :3] = 2
    Volume(coverage, volume.origin, volume.spacing, volume.direction).write(folder / "coverage.nrrd")
    (folder / "report.json").write_text(json.dumps(report))
    return folder


def test_volume_node_geometry_matches_engine_nrrd(tmp_path):
    direction = _rotation(2, 30.0) @ _rotation(0, 10.0)
    volume = Volume(np.random.default_rng(0).random((5, 6, 7), dtype=np.float32), (12.5, -40.25, 7.0),
                    (0.7, 0.8, 1.1), direction)
    volume.write(tmp_path / "v.nrrd")
    image = sitk.ReadImage(str(tmp_path / "v.nrrd"))
    node = nodes.volume_node_from_volume(Volume.read(tmp_path / "v.nrrd"), "v")

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = slicer.util.arrayFromVTKMatrix(matrix)
    for index in [(0, 0, 0), (6, 0, 0), (0, 5, 0), (0, 0, 4), (3, 2, 1)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(index))
        ras = ijk_to_ras @ np.array([*index, 1.0])
        np.testing.assert_allclose(ras[:3], LPS_RAS_FLIP[:3, :3] @ lps, atol=1e-6)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), sitk.GetArrayFromImage(image))

    back = nodes.volume_from_node(node)
    np.testing.assert_allclose(back.origin, volume.origin, atol=1e-6)
    np.testing.assert_allclose(back.spacing, volume.spacing, atol=1e-6)
    np.testing.assert_allclose(back.direction, direction, atol=1e-6)


def test_roi_node_round_trip_and_view_poses():
    roi = Roi((10.0, -20.0, 30.0), (60.0, 50.0, 40.0))
    node = nodes.roi_node_from_roi(roi)
    center = [0.0] * 3
    node.GetCenter(center)
    np.testing.assert_allclose(center, [-10.0, 20.0, 30.0], atol=1e-9)  # LPS -> RAS
    back = nodes.roi_from_roi_node(node)
    np.testing.assert_allclose(back.center, roi.center, atol=1e-9)
    np.testing.assert_allclose(back.size, roi.size, atol=1e-9)

    shape = (32, 40)
    matrices = ring_of_matrices(3, shape=shape)
    sources, detectors = nodes.view_poses_nodes(matrices, [shape] * 3, np.zeros(3))
    assert sources.GetNumberOfControlPoints() == 3
    points = slicer.util.arrayFromModelPoints(detectors)
    assert points.shape == (12, 3)
    for index, P in enumerate(matrices):
        position = [0.0] * 3
        sources.GetNthControlPointPosition(index, position)
        np.testing.assert_allclose(position, LPS_RAS_FLIP[:3, :3] @ source_position(P), atol=1e-6)
        corners_lps = points[4 * index: 4 * index + 4] @ LPS_RAS_FLIP[:3, :3]
        uvw = project_points(P / np.linalg.norm(P[2, :3]), corners_lps)
        # vtkPoints store float32: 1e-4 pixel at ~1 m from the origin.
        np.testing.assert_allclose(uvw[:, :2], [[-0.5, -0.5], [39.5, -0.5], [39.5, 31.5], [-0.5, 31.5]], atol=1e-4)
        assert np.all(uvw[:, 2] > 500.0)  # behind the isocentre, seen from the source


def test_load_results_segments_at_threshold_and_shows_bone(tmp_path, scene):
    volume = _phantom()
    out = _write_outputs(tmp_path / "run", volume, {"bone_threshold": 0.035, "metrics": {}})
    result = results.load_results(out, "Recon")
    assert result.bone_threshold == pytest.approx(0.035)
    mask = nodes.segment_mask(result.segmentation_node, result.volume_node)
    assert int(mask.sum()) == int((volume.array >= 0.035).sum()) > 100
    surface = vtk.vtkPolyData()
    bone_id = result.segmentation_node.GetSegmentation().GetSegmentIdBySegmentName("Bone")
    assert result.segmentation_node.GetClosedSurfaceRepresentation(bone_id, surface)
    assert surface.GetNumberOfPoints() > 50
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(result.coverage_node)[0, 0, :4], [2, 2, 2, 7])
    rendering = slicer.vtkSlicerVolumeRenderingLogic()
    rendering.SetMRMLScene(scene)
    display = rendering.GetFirstVolumeRenderingDisplayNode(result.volume_node)
    opacity = display.GetVolumePropertyNode().GetVolumeProperty().GetScalarOpacity()
    assert opacity.GetValue(0.02) == pytest.approx(0.0) and opacity.GetValue(0.05) > 0.5

    # The slider: a new threshold replaces the segment's content.
    nodes.bone_segmentation(result.volume_node, 0.01, result.segmentation_node)
    mask = nodes.segment_mask(result.segmentation_node, result.volume_node)
    assert int(mask.sum()) == int((volume.array >= 0.01).sum()) > 3 * int((volume.array >= 0.035).sum())


def test_load_results_otsu_default_and_all_or_nothing(tmp_path, scene):
    volume = _phantom()
    out = _write_outputs(tmp_path / "run", volume, {"metrics": {}})
    result = results.load_results(out, volume_rendering=False)
    assert 0.02 < result.bone_threshold < 0.05  # Otsu between soft tissue and bone

    before = scene.GetNumberOfNodes()
    (out / "coverage.nrrd").unlink()
    with pytest.raises(ValueError, match="coverage.nrrd"):
        results.load_results(out)
    (out / "coverage.nrrd").write_text("not an image")
    with pytest.raises(ValueError, match="coverage.nrrd"):
        results.load_results(out)
    # A failure after nodes were added (a flat volume has no Otsu threshold) also rolls back.
    flat = _write_outputs(tmp_path / "flat", Volume(np.zeros((4, 5, 6), np.float32), (0, 0, 0), (1, 1, 1)),
                          {"metrics": {}})
    with pytest.raises(ValueError, match="no contrast"):
        results.load_results(flat)
    assert scene.GetNumberOfNodes() == before


def test_kept_outputs_are_complete_atomic_and_never_replace_a_users_folder(tmp_path):
    """keep_outputs follows the engine's output-folder policy: previews included, our marker written,
    an earlier kept output replaced, a user's folder refused untouched (and refused before a run)."""
    run = _write_outputs(tmp_path / "run", _phantom(), {"bone_threshold": 0.035})
    (run / "previews").mkdir()
    (run / "previews" / "slices.png").write_bytes(b"png")
    (run / "report.html").write_text("<html></html>")
    kept = results.keep_outputs(run, tmp_path / "kept")
    names = sorted(p.relative_to(kept).as_posix() for p in kept.rglob("*"))
    assert names == [".ixgs-output", "bone.nrrd", "coverage.nrrd", "previews", "previews/slices.png", "report.html",
                     "report.json", "volume.nrrd"]
    assert results.report_path(kept) == kept / "report.html" and results.report_path(run / "previews") is None
    (run / "report.json").write_text(json.dumps({"bone_threshold": 0.04}))
    results.keep_outputs(run, kept)  # an earlier kept output is ours: replaced
    assert json.loads((kept / "report.json").read_text()) == {"bone_threshold": 0.04}
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="mine: exists and is not an ixgs output .*notes.txt"):
        results.check_keep_destination(mine)
    with pytest.raises(ValueError, match="notes.txt"):
        results.keep_outputs(run, mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "mine", "run"]  # nothing half-written


def test_align_to_anatomy_principal_axes_and_landmarks():
    shape = (40, 40, 40)
    k, j, i = np.indices(shape).astype(float) - 19.5
    tilt = _rotation(0, 25.0)  # a long bone tilted 25 degrees about the L-R axis
    ras = np.stack([i, j, k], axis=-1) @ tilt  # coordinates in the bone's own frame
    mask = (np.abs(ras[..., 2]) < 16) & (np.abs(ras[..., 1]) < 4) & (np.abs(ras[..., 0]) < 6)
    matrix = align.principal_axes_alignment(mask, np.eye(4))
    long_axis = tilt @ np.array([0.0, 0.0, 1.0])  # the bone's long axis in RAS (p = tilt q)
    aligned = matrix[:3, :3] @ long_axis
    assert abs(aligned[2]) > np.cos(np.radians(1.0))
    assert np.allclose(matrix[:3, :3] @ matrix[:3, :3].T, np.eye(3), atol=1e-9)
    assert np.linalg.det(matrix[:3, :3]) == pytest.approx(1.0)

    inferior, superior, anterior = np.array([0, 0, -10.0]), np.array([0, 10.0, 0]), np.array([0, 10.0, -10.0])
    matrix = align.landmark_alignment(inferior, superior, anterior)
    direction = matrix[:3, :3] @ (superior - inferior) / np.linalg.norm(superior - inferior)
    np.testing.assert_allclose(direction, [0, 0, 1], atol=1e-9)
    centre = 0.5 * (inferior + superior)
    np.testing.assert_allclose(matrix[:3, :3] @ centre + matrix[:3, 3], centre, atol=1e-9)
    assert (matrix[:3, :3] @ (anterior - centre))[1] > 0
    with pytest.raises(ValueError, match="coincide"):
        align.landmark_alignment(inferior, inferior, anterior)


def test_compare_to_ct_registration_metrics_table_and_mrb(tmp_path, scene):
    reference = _phantom()
    noisy = reference.array + np.random.default_rng(1).normal(0, 0.001, reference.array.shape).astype(np.float32)
    # The reconstruction sits 3 mm off along x (a frame difference the registration must remove).
    shifted = Volume(noisy, tuple(np.add(reference.origin, (3.0, 0.0, 0.0))), reference.spacing)
    recon_node = nodes.volume_node_from_volume(shifted, "Recon")
    hu = ((reference.array / 0.0206 - 1.0) * 1000.0).astype(np.float32)  # the CT in Hounsfield units
    ct_node = nodes.volume_node_from_volume(Volume(hu, reference.origin, reference.spacing), "CT")

    plain, table, _ = compare.compare_nodes(recon_node, ct_node, register=False, bone_threshold=0.035)
    metrics, table, transform = compare.compare_nodes(recon_node, ct_node, register=True, bone_threshold=0.035,
                                                      table_node=table)
    assert metrics["psnr"] > plain["psnr"] + 3.0
    assert metrics["dice"] > 0.9 > plain["dice"]
    matrix = slicer.util.arrayFromTransformMatrix(transform)
    # Moving the reconstruction 3 mm back along LPS x is +3 mm along RAS x.
    assert matrix[0, 3] == pytest.approx(3.0, abs=0.75)
    assert np.allclose(matrix[:3, :3], np.eye(3), atol=0.02)
    assert table.GetNumberOfRows() == 2
    assert table.GetCellText(1, compare.METRIC_COLUMNS.index("registered")) == "yes"
    assert float(table.GetCellText(1, compare.METRIC_COLUMNS.index("psnr_db"))) == pytest.approx(metrics["psnr"],
                                                                                                  abs=1e-3)

    # Save the scene as MRB and read it back.
    scene.SetRootDirectory(str(tmp_path))
    mrb = tmp_path / "session.mrb"
    assert scene.WriteToMRB(str(mrb))
    io_manager, cache = slicer.vtkDataIOManager(), slicer.vtkCacheManager()
    cache.SetRemoteCacheDirectory(str(tmp_path / "cache"))
    io_manager.SetCacheManager(cache)
    loaded = slicer.vtkMRMLScene()
    loaded.SetDataIOManager(io_manager)
    loaded.SetCacheManager(cache)
    assert loaded.ReadFromMRB(str(mrb))
    recon_back = loaded.GetFirstNodeByName("Recon")
    np.testing.assert_allclose(slicer.util.arrayFromVolume(recon_back), noisy, atol=1e-7)
    table_back = loaded.GetFirstNodeByName(table.GetName())
    assert table_back.GetNumberOfRows() == 2
    assert table_back.GetCellText(1, 3) == table.GetCellText(1, 3)


def test_sample_scan_is_generated_locally_and_reused(tmp_path):
    from IXGSReconstructionLib.sampledata import generate_sample_scan
    from ixgs.scan import read_scan

    path = generate_sample_scan(tmp_path / "sample", n_views=3, detector_px=32, voxel_size_mm=4.0)
    scan = read_scan(path)
    assert len(scan.views) == 3 and scan.views[0].shape == (32, 32)
    assert scan.reference_volume is not None and Volume.read(scan.reference_volume).array.max() > 0.02
    stamp = (path / "scan.json").stat().st_mtime_ns
    assert generate_sample_scan(path, n_views=3, detector_px=32, voxel_size_mm=4.0) == path
    assert (path / "scan.json").stat().st_mtime_ns == stamp
