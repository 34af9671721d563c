"""Shared fixtures: small scans written with the engine's own writer."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ixgs.geometry import Roi

# One thread: results are then bit-for-bit repeatable, and small torch operations stay fast on a
# shared 2-core machine (oversubscribed OpenMP threads made them erratically slow, up to 100x).
torch.set_num_threads(1)


def look_at_projection_matrix(source, target=(0.0, 0.0, 0.0), shape=(32, 40), focal_px=120.0,
                              principal_offset_px=(0.0, 0.0), skew=0.0) -> np.ndarray:
    """A pinhole projection matrix looking from ``source`` (LPS mm) at ``target``; w > 0 in front."""
    source = np.asarray(source, float)
    forward = np.asarray(target, float) - source
    forward /= np.linalg.norm(forward)
    helper = np.array([0.0, 0.0, 1.0]) if abs(forward[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    right = np.cross(forward, helper)
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    rotation = np.stack([right, down, forward])
    rows, cols = shape
    intrinsics = np.array([
        [focal_px, skew, (cols - 1) / 2 + principal_offset_px[0]],
        [0.0, focal_px, (rows - 1) / 2 + principal_offset_px[1]],
        [0.0, 0.0, 1.0],
    ])
    return intrinsics @ np.hstack([rotation, (-rotation @ source)[:, None]])


def ring_of_matrices(n_views: int, distance_mm: float = 500.0, shape=(32, 40), focal_px=120.0):
    """``n_views`` sources on a tilted ring around the origin."""
    matrices = []
    for k in range(n_views):
        angle = np.pi * k / n_views
        source = distance_mm * np.array([np.sin(angle), -np.cos(angle), 0.2 * np.sin(3 * angle)])
        matrices.append(look_at_projection_matrix(source, shape=shape, focal_px=focal_px))
    return matrices


@pytest.fixture
def small_roi() -> Roi:
    return Roi((0.0, 0.0, 0.0), (60.0, 60.0, 60.0))


@pytest.fixture
def scene():
    """A fresh real MRML scene (PyPI slicer-core) as ``slicer.mrmlScene``, cleared afterwards."""
    slicer = pytest.importorskip("slicer")
    mrml_scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = mrml_scene
    yield mrml_scene
    mrml_scene.Clear(1)


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def small_spine_scan(tmp_path_factory):
    """A truncated 12-view, 64-pixel attenuation scan of the spine phantom (2 mm), with its reference."""
    from ixgs.phantom import default_roi, make_phantom
    from ixgs.simulate import simulate_scan

    folder = tmp_path_factory.mktemp("spine") / "scan"
    return simulate_scan(make_phantom("spine", seed=3, voxel_size_mm=2.0), folder, n_views=12, detector_px=64,
                         seed=3, roi=default_roi("spine"))


@pytest.fixture(scope="session")
def small_knee_scan(tmp_path_factory):
    """A 12-view, 64-pixel attenuation scan of the knee phantom (2 mm), with its reference."""
    from ixgs.phantom import default_roi, make_phantom
    from ixgs.simulate import simulate_scan

    folder = tmp_path_factory.mktemp("knee") / "scan"
    return simulate_scan(make_phantom("knee", seed=3, voxel_size_mm=2.0), folder, n_views=12, detector_px=64,
                         seed=3, roi=default_roi("knee"))
