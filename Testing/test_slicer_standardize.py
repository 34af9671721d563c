"""IXGSStandardize logic: scan views as nodes, standardized nodes, standardized scan with the same geometry."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import vtk

slicer = pytest.importorskip("slicer", reason="needs PyPI slicer-core (pip install slicer-core)")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "IXGSStandardize"))

from IXGSStandardizeLib import logic  # noqa: E402
from conftest import ring_of_matrices  # noqa: E402
from ixgs.scan import read_scan, write_scan  # noqa: E402
from ixgs.standardize import ClassicalSettings, standardize_image  # noqa: E402

SHAPE = (32, 40)


pytestmark = pytest.mark.usefixtures("scene")


def _images(n: int) -> list[np.ndarray]:
    rows, cols = np.mgrid[0:SHAPE[0], 0:SHAPE[1]]
    return [(1.0 + 0.4 * np.sin(rows / 5.0 + k) + 1.5 * (np.abs(cols - 20) < 3)).astype(np.float32) for k in range(n)]


def test_views_as_nodes_standardized_and_written_back(tmp_path, small_roi):
    matrices = ring_of_matrices(3, shape=SHAPE)
    scan_path = write_scan(tmp_path / "scan", _images(3), matrices, roi=small_roi)
    originals = logic.radiograph_nodes_from_scan(scan_path)
    assert len(originals) == 3
    np.testing.assert_array_equal(logic.node_image(originals[1]), read_scan(scan_path).views[1].image)
    matrix = vtk.vtkMatrix4x4()
    originals[1].GetIJKToRASMatrix(matrix)
    # Shown unmirrored in the axial view: columns towards screen right (L), rows downwards (P).
    np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(matrix)[:3, :3], np.diag([-1.0, -1.0, 1.0]))

    settings = ClassicalSettings(clahe_tile_px=16)
    outputs = logic.standardize_nodes(originals, "classical", settings)
    assert [n.GetName() for n in outputs] == [f"{o.GetName()} standardized" for o in originals]
    expected = standardize_image(read_scan(scan_path).views[2].image, settings)
    np.testing.assert_allclose(logic.node_image(outputs[2]), expected, atol=1e-6)

    out = logic.write_scan_from_nodes(outputs, tmp_path / "standardized")
    assert json.loads((out / "scan.json").read_text())["intensity"] == "attenuation"
    before, after = read_scan(scan_path), read_scan(out)
    for a, b in zip(before.views, after.views):
        np.testing.assert_allclose(b.projection_matrix, a.projection_matrix, atol=1e-9)
    np.testing.assert_allclose(after.roi.center, before.roi.center, atol=1e-9)
    np.testing.assert_allclose(logic.node_image(outputs[0]), after.views[0].image, atol=1e-6)


def test_plain_radiograph_nodes_and_refusals(tmp_path, scene):
    transmission = (1000.0 * np.exp(-_images(1)[0])).astype(np.float32)
    transmission[:, :4] = 1000.0  # unattenuated air beside the patient: the I0 estimate
    node = slicer.util.addVolumeFromArray(transmission[np.newaxis], name="DX")
    [output] = logic.standardize_nodes([node], "classical", intensity="transmission")
    assert 0.5 < float(np.median(logic.node_image(output))) < 3.5  # -log applied: line-integral scale
    with pytest.raises(ValueError, match="no projection matrix"):
        logic.write_scan_from_nodes([output], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="method"):
        logic.standardize_nodes([node], "magic")
    volume = slicer.util.addVolumeFromArray(np.zeros((4, 5, 6), np.float32), name="3D")
    count = scene.GetNumberOfNodes()
    with pytest.raises(ValueError, match="not a 2D radiograph"):
        logic.standardize_nodes([node, volume])
    assert scene.GetNumberOfNodes() == count  # the failed call left the scene as it was
    assert "classical" in logic.available_methods()
