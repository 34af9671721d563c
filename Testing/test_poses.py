"""Per-view pose corrections: geometry of the corrected view, gradients, and the gauge."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import look_at_projection_matrix

from ixgs.gaussians import GaussianModel
from ixgs.geometry import Roi, view_rays
from ixgs.poses import PoseCorrections, projection_displacement_px, transform_rays
from ixgs.projector import forward_project
from ixgs.splat import render

CENTER = (10.0, -5.0, 20.0)


def _poses(n: int = 3) -> PoseCorrections:
    poses = PoseCorrections(n, CENTER, lever_mm=50.0)
    with torch.no_grad():
        for k, values in enumerate(poses.per_view):
            values.copy_(torch.tensor([1.0, -0.5, 0.8, 2.0, -1.0, 0.5]) * (k + 1))
    return poses


def test_correction_is_a_rigid_motion_about_the_center():
    poses = _poses()
    T = poses.matrix(1).detach().double().numpy()
    rotation = T[:3, :3]
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-6)
    assert np.linalg.det(rotation) == pytest.approx(1.0, abs=1e-6)
    # The centre moves by the translation alone; the angle is |rotation vector| (mm of arc / lever).
    moved_center = T[:3, :3] @ np.array(CENTER) + T[:3, 3]
    np.testing.assert_allclose(moved_center - np.array(CENTER), [4.0, -2.0, 1.0], atol=1e-4)
    row = poses.report()[1]
    expected_angle = math.degrees(2.0 * np.linalg.norm([1.0, -0.5, 0.8]) / 50.0)
    assert row["angle_deg"] == pytest.approx(expected_angle, abs=1e-3)
    assert row["translation_mm"] == pytest.approx([4.0, -2.0, 1.0], abs=1e-4)


def test_common_motion_is_removed():
    poses = _poses(4)
    poses.remove_common_motion()
    np.testing.assert_allclose(poses.parameters_mm.detach().mean(dim=0).numpy(), 0.0, atol=1e-6)
    assert float(poses.parameters_mm.detach().abs().max()) > 1.0  # the differences stay


def test_transformed_rays_are_the_rays_of_the_corrected_matrix():
    P = look_at_projection_matrix((400.0, -300.0, 80.0), target=CENTER, shape=(24, 30))
    poses = _poses()
    rays = transform_rays(view_rays(P, (24, 30), dtype=torch.float64), poses.matrix(2).double())
    expected = view_rays(poses.corrected_matrix(2, P), (24, 30), dtype=torch.float64)
    np.testing.assert_allclose(rays.source.detach().numpy(), expected.source.numpy(), atol=1e-6)
    np.testing.assert_allclose(rays.directions.detach().numpy(), expected.directions.numpy(), atol=1e-9)
    # The pose error that matters: how far the two matrices put the anatomy apart on the detector.
    corners = np.array(CENTER) + 30.0 * np.array([[1, 1, 1], [-1, 1, -1], [1, -1, 1], [-1, -1, -1]])
    assert projection_displacement_px(P, P, corners) == 0.0
    assert projection_displacement_px(P, poses.corrected_matrix(2, P), corners) > 0.3


def _model() -> GaussianModel:
    generator = torch.Generator().manual_seed(0)
    return GaussianModel.random(Roi(CENTER, (40.0, 40.0, 40.0)), 60, generator, density=0.05)


def test_render_with_pose_equals_render_of_corrected_view():
    P = look_at_projection_matrix((400.0, -300.0, 80.0), target=CENTER, shape=(24, 30))
    model, poses = _model(), _poses()
    with torch.no_grad():
        posed = render(model, view_rays(P, (24, 30)), pose=poses.matrix(2))
        corrected = render(model, view_rays(poses.corrected_matrix(2, P), (24, 30)))
    assert float(posed.max()) > 0.1
    np.testing.assert_allclose(posed.numpy(), corrected.numpy(), atol=2e-3 * float(corrected.max()))


@pytest.mark.parametrize("which", ["gaussians", "voxels"])
def test_pose_gradient_matches_finite_differences(which):
    """Both renderers give the pose the gradient it should have: the trainer learns poses through both."""
    P = look_at_projection_matrix((400.0, -300.0, 80.0), target=CENTER, shape=(16, 20), focal_px=60.0)
    rays = view_rays(P, (16, 20), dtype=torch.float64)
    model = _model().double()
    grid = Roi(CENTER, (40.0, 40.0, 40.0)).grid(4.0)
    volume = torch.rand(grid.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.02
    weights = torch.rand(16, 20, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    poses = _poses().double()

    def objective() -> torch.Tensor:
        if which == "gaussians":
            image = render(model, rays, pose=poses.matrix(0))
        else:
            image = forward_project(volume, grid, transform_rays(rays, poses.matrix(0)), step_mm=0.5)
        return (image * weights).sum()

    objective().backward()
    gradient = poses.per_view[0].grad.clone()
    assert float(gradient.abs().max()) > 1e-4
    for k in range(6):
        step = 1e-4
        with torch.no_grad():
            poses.per_view[0][k] += step
            plus = float(objective())
            poses.per_view[0][k] -= 2 * step
            minus = float(objective())
            poses.per_view[0][k] += step
        assert (plus - minus) / (2 * step) == pytest.approx(float(gradient[k]), rel=0.02, abs=1e-3 * float(
            gradient.abs().max()))


def test_refinement_leaves_a_calibrated_scan_alone(small_knee_scan):
    """With exact poses, learning corrections must not invent motion or cost 3D quality."""
    from ixgs.metrics import evaluate
    from ixgs.reconstruct import ReconstructionSettings, reconstruct
    from ixgs.scan import read_scan
    from ixgs.volume import Volume

    scan = read_scan(small_knee_scan)
    reference = Volume.read(scan.reference_volume)
    common = dict(preset="fast", iterations=150, gaussians=3000, voxel_size_mm=2.5, device="cpu", seed=0)
    plain = reconstruct(scan, ReconstructionSettings(**common))
    refined = reconstruct(scan, ReconstructionSettings(refine_poses=True, **common))
    assert plain.pose_corrections == []
    assert [row["view"] for row in refined.pose_corrections] == [view.name for view in scan.views]
    # Each reported matrix is the view's matrix corrected by the reported motion.
    first = refined.pose_corrections[0]
    assert np.array(first["projection_matrix"]).shape == (3, 4)
    points = np.array(scan.roi.center) + 0.5 * np.array(scan.roi.size) * np.array(
        [[1, 1, 1], [-1, -1, -1], [1, -1, 1], [0, 0, 0]])
    displacements = [projection_displacement_px(view.projection_matrix, np.array(row["projection_matrix"]), points)
                     for view, row in zip(scan.views, refined.pose_corrections)]
    # Measured: at most ~0.1 px and 0.1 degrees of spurious correction; a broken gauge or sign drifts by pixels.
    assert max(displacements) < 0.5, displacements
    assert max(row["angle_deg"] for row in refined.pose_corrections) < 0.5
    mean_translation = np.mean([row["translation_mm"] for row in refined.pose_corrections], axis=0)
    np.testing.assert_allclose(mean_translation, 0.0, atol=1e-3)  # no common motion
    psnr_plain = evaluate(plain.volume, reference)["psnr"]
    psnr_refined = evaluate(refined.volume, reference)["psnr"]
    assert psnr_refined > psnr_plain - 0.5, (psnr_plain, psnr_refined)
