"""Voxel forward projector: line integrals, geometry for a general camera, exact adjoint."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ixgs.geometry import Grid, Roi, project_points, view_rays
from ixgs.projector import back_project, forward_project, project_volume, sample_volume
from ixgs.volume import Volume

MU = 0.02  # 1/mm


def general_projection_matrix(seed: int, shape, distance_mm=700.0, focal_px=(1500.0, 1400.0), skew=35.0,
                              principal_offset_px=(3.3, -2.6)) -> np.ndarray:
    """A pinhole camera with a random rotation, skew and principal point offset, aimed at the origin."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    rotation = q * np.sign(np.diag(r))
    source = -distance_mm * rotation[2]  # the optical axis (third row) points from the source to the origin
    rows, cols = shape
    intrinsics = np.array([[focal_px[0], skew, (cols - 1) / 2 + principal_offset_px[0]],
                           [0.0, focal_px[1], (rows - 1) / 2 + principal_offset_px[1]],
                           [0.0, 0.0, 1.0]])
    return intrinsics @ np.hstack([rotation, (-rotation @ source)[:, None]])


def ball(grid: Grid, center, radius_mm: float, value: float, supersample: int = 4) -> np.ndarray:
    """A ball with partial-volume edges (fraction of each voxel inside, by supersampling)."""
    centers = grid.voxel_centers()
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    inside = np.zeros(grid.shape)
    for dx in offsets:
        for dy in offsets:
            for dz in offsets:
                points = centers + np.array([dx, dy, dz]) * np.asarray(grid.spacing)
                inside += np.linalg.norm(points - np.asarray(center), axis=-1) <= radius_mm
    return (value * inside / supersample ** 3).astype(np.float32)


def chord_lengths(rays, center, radius_mm: float) -> np.ndarray:
    """Exact lengths (mm) of each ray inside a sphere."""
    source = rays.source.double().numpy()
    directions = rays.directions.double().numpy()
    to_center = np.asarray(center) - source
    along = directions @ to_center
    miss_sq = (to_center @ to_center) - along ** 2
    return 2.0 * np.sqrt(np.maximum(radius_mm ** 2 - miss_sq, 0.0))


def test_uniform_cube_line_integral_is_length_times_mu():
    grid = Roi((0.0, 0.0, 0.0), (40.0, 40.0, 40.0)).grid(1.0)
    volume = torch.zeros(grid.shape)
    volume[10:30, 10:30, 10:30] = MU  # a 20 mm cube centred on the origin
    # Look straight along -y through the cube centre: rotation rows (x, -z, -y).
    P = np.array([[1500.0, 0, 16, 0], [0, 1500.0, 16, 0], [0, 0, 1, 0]]) @ np.array(
        [[1.0, 0, 0, 0], [0, 0, -1, 0], [0, -1, 0, 700.0], [0, 0, 0, 1]])
    image = forward_project(volume, grid, view_rays(P, (33, 33)))
    assert float(image[16, 16]) == pytest.approx(20.0 * MU, rel=1e-3)


def test_ball_line_integrals_match_chord_lengths_for_a_general_camera():
    grid = Roi((0.0, 0.0, 0.0), (48.0, 48.0, 48.0)).grid(1.0)
    center, radius = (1.3, -0.7, 2.1), 18.0
    volume = torch.as_tensor(ball(grid, center, radius, MU))
    rays = view_rays(general_projection_matrix(1, (24, 24), focal_px=(600.0, 560.0)), (24, 24))
    image = forward_project(volume, grid, rays, chunk_rays=100).numpy().ravel()
    expected = MU * chord_lengths(rays, center, radius).ravel()
    deep = expected > 1.5 * MU * radius  # rays through the middle of the ball
    assert deep.sum() > 100
    assert np.max(np.abs(image[deep] / expected[deep] - 1.0)) < 0.01
    # Rays grazing the voxelized (one-voxel soft) surface differ most; the total still agrees.
    assert image.sum() == pytest.approx(expected.sum(), rel=0.01)


def test_bead_projects_onto_the_projection_of_its_centre():
    grid = Roi((0.0, 0.0, 0.0), (32.0, 32.0, 32.0)).grid(1.0)
    for seed, bead in enumerate([(3.3, -2.7, 4.1), (-6.2, 5.5, -3.8)]):
        volume = torch.as_tensor(ball(grid, bead, 2.0, 1.0))
        P = general_projection_matrix(seed + 10, (40, 48))
        image = forward_project(volume, grid, view_rays(P, (40, 48))).numpy()
        rows, cols = np.indices(image.shape)
        centroid = np.array([(image * cols).sum(), (image * rows).sum()]) / image.sum()
        expected = project_points(P, np.array(bead))[:2]
        assert np.linalg.norm(centroid - expected) < 0.5


def test_adjoint_matches_forward_projection():
    grid = Grid(shape=(12, 14, 10), origin=(-5.0, -6.5, -5.5), spacing=(1.1, 1.0, 0.9))
    rays = view_rays(general_projection_matrix(2, (9, 11), focal_px=(350.0, 330.0)), (9, 11),
                     dtype=torch.float64)
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(grid.shape, generator=generator, dtype=torch.float64)
    y = torch.rand(rays.shape, generator=generator, dtype=torch.float64)
    forward = float((forward_project(x, grid, rays, chunk_rays=37) * y).sum())
    adjoint = float((x * back_project(y, grid, rays, chunk_rays=23)).sum())
    assert forward > 0
    assert abs(forward - adjoint) <= 1e-4 * abs(forward)
    # The autograd gradient of <A x, y> is the same adjoint.
    x.requires_grad_(True)
    (forward_project(x, grid, rays) * y).sum().backward()
    assert torch.allclose(x.grad, back_project(y, grid, rays), rtol=1e-10, atol=1e-12)


def test_sample_volume_is_exact_at_voxel_centres_and_zero_outside():
    grid = Grid(shape=(3, 4, 5), origin=(10.0, -2.0, 7.0), spacing=(2.0, 0.5, 1.5))
    volume = torch.arange(60, dtype=torch.float64).reshape(grid.shape) + 1.0
    centers = torch.as_tensor(grid.voxel_centers())
    assert torch.allclose(sample_volume(volume, grid, centers), volume, rtol=0, atol=1e-9)
    # Half a voxel outside: half the edge value; a whole voxel or more outside: zero.
    outside = torch.tensor([[9.0, -2.0, 7.0], [8.0, -2.0, 7.0], [10.0, -2.0, 7.0 + 3 * 1.5]], dtype=torch.float64)
    assert torch.allclose(sample_volume(volume, grid, outside), torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64),
                          rtol=0, atol=1e-12)


def test_project_volume_matches_forward_project_and_refuses_rotated_volumes():
    grid = Roi((0.0, 0.0, 0.0), (20.0, 20.0, 20.0)).grid(2.0)
    array = ball(grid, (0.0, 0.0, 0.0), 7.0, MU, supersample=2)
    P = general_projection_matrix(3, (10, 12), focal_px=(300.0, 300.0))
    image = project_volume(Volume.on_grid(array, grid), -P, (10, 12))  # either sign of P is accepted
    expected = forward_project(torch.as_tensor(array), grid, view_rays(P, (10, 12))).numpy()
    assert image.dtype == np.float32 and np.allclose(image, expected, atol=1e-6)
    rotated = Volume(array, grid.origin, grid.spacing, np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]]))
    with pytest.raises(ValueError, match="axis-aligned"):
        project_volume(rotated, P, (10, 12))
    with pytest.raises(ValueError, match="does not match grid"):
        forward_project(torch.zeros(3, 3, 3), grid, view_rays(P, (10, 12)))
