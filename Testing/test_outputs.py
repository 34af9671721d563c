"""Output folder: bone label, coverage map against direct projection, previews, atomic writing."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import ring_of_matrices

from ixgs.geometry import Roi, project_points
from ixgs.outputs import FIGURES, bone_label, coverage_map, coverage_summary, estimated_write_s, write_outputs
from ixgs.scan import read_scan, write_scan
from ixgs.volume import Volume


@pytest.fixture
def ring_scan(tmp_path):
    images = [np.ones((32, 40), np.float32) for _ in range(4)]
    write_scan(tmp_path / "scan", images, ring_of_matrices(4), roi=Roi((0.0, 0.0, 0.0), (80.0, 80.0, 80.0)))
    return read_scan(tmp_path / "scan")


def _volume(grid_mm=4.0):
    grid = Roi((0.0, 0.0, 0.0), (80.0, 80.0, 80.0)).grid(grid_mm)
    centers = grid.voxel_centers()
    values = 0.02 + 0.03 * (np.linalg.norm(centers - [5.0, 0.0, 0.0], axis=-1) < 15)
    values += 0.002 * np.sin(centers[..., 1])  # some spread for Otsu
    return Volume.on_grid(values.astype(np.float32), grid)


def test_bone_label_otsu_and_given_threshold():
    volume = _volume()
    label, threshold = bone_label(volume)
    assert 0.021 < threshold < 0.048  # in the gap between soft tissue and bone
    np.testing.assert_array_equal(label.array, (volume.array > 0.035).astype(np.uint8))
    assert label.origin == volume.origin and label.spacing == volume.spacing
    label, threshold = bone_label(volume, 0.1)
    assert threshold == 0.1 and label.array.sum() == 0


def test_coverage_counts_views_that_see_each_voxel(ring_scan):
    grid = Roi((0.0, 0.0, 0.0), (200.0, 200.0, 200.0)).grid(10.0)  # wider than the views' common field
    coverage = coverage_map(ring_scan, grid)
    centers = grid.voxel_centers().reshape(-1, 3)
    expected = np.zeros(len(centers), int)
    for view in ring_scan.views:
        uvw = project_points(view.projection_matrix, centers)
        expected += (uvw[:, 0] >= -0.5) & (uvw[:, 0] <= 39.5) & (uvw[:, 1] >= -0.5) & (uvw[:, 1] <= 31.5)
    np.testing.assert_array_equal(coverage.array.ravel(), expected)
    assert coverage.array.max() == 4 and coverage.array.min() < 4  # the ROI's corners leave some views
    summary = coverage_summary(coverage, 4)
    assert summary["minimum_views"] == 2
    assert summary["fraction_under_constrained"] == pytest.approx(np.mean(expected < 2))


def test_write_outputs_folder(ring_scan, tmp_path):
    volume = _volume()
    out = tmp_path / "out"
    report = write_outputs(out, ring_scan, volume, {"elapsed_s": 1.0}, loss_curve=[(0, 1.0), (1, 0.5), (2, 0.2)],
                           reprojections={0: ring_scan.views[0].image, 3: ring_scan.views[3].image})
    names = sorted(p.name for p in out.iterdir())
    assert names == [".ixgs-output", "bone.nrrd", "coverage.nrrd", "previews", "report.html", "report.json", "volume.nrrd"]
    written = sitk.ReadImage(str(out / "volume.nrrd"))
    assert written.GetOrigin() == pytest.approx(volume.origin) and written.GetSpacing() == pytest.approx(volume.spacing)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), volume.array)
    assert json.loads((out / "report.json").read_text())["bone_threshold"] == pytest.approx(report["bone_threshold"])
    # Each figure (content checked in test_figures.py) and the page (test_report.py) is there.
    assert sorted(p.name for p in (out / "previews").iterdir()) == sorted(FIGURES)


def test_the_write_estimate_covers_the_write(ring_scan, tmp_path):
    """A time budget keeps back estimated_write_s for the outputs: it must cover what writing them
    costs here (with the 1.25 margin the trainer adds), figures and all, and grow with what is written."""
    volume = _volume(grid_mm=1.0)  # 80^3 voxels
    files, previews = (estimated_write_s(volume.grid, False, drawn) for drawn in (False, True))
    assert 0 < files < previews < estimated_write_s(volume.grid, True, True)
    started = time.perf_counter()
    write_outputs(tmp_path / "out", ring_scan, volume, {"elapsed_s": 1.0}, loss_curve=[(0, 1.0), (1, 0.5)])
    assert time.perf_counter() - started <= 1.25 * estimated_write_s(volume.grid, False, True)


def test_write_outputs_refuses_foreign_folder(ring_scan, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="contains the input"):
        write_outputs(tmp_path, ring_scan, _volume(), {})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "report.json").write_text("{}")  # not our marker: could be anyone's
    with pytest.raises(ValueError, match="is not an ixgs output .*report.json"):
        write_outputs(tmp_path / "other", ring_scan, _volume(), {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "other", "scan"]
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["report.json"]
