"""Analytic phantoms: exact chords, finite pixels, honest partial-volume references, cropping."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ixgs.analytic import (AnalyticPhantom, cylinder, ellipsoid, make_analytic_phantom, rod, shell)
from ixgs.geometry import Roi, view_rays
from ixgs.phantom import default_roi
from ixgs.projector import forward_project
from ixgs.simulate import c_arm_projection_matrix

CENTER = np.array([3.0, -2.0, 5.0])


def rays_of(P, shape):
    rays = view_rays(P, shape, dtype=torch.float64)
    directions = rays.directions.numpy()
    return np.broadcast_to(rays.source.numpy(), directions.shape), directions


def test_sphere_view_is_the_closed_form_chord():
    radius, density = 20.0, 0.03
    phantom = AnalyticPhantom((ellipsoid(CENTER, (radius,) * 3, density),))
    P = c_arm_projection_matrix(35.0, -12.0, 1100.0, 700.0, (24, 24), (3.0, 3.0), CENTER)
    image = phantom.project(P, (24, 24), supersample=1)
    origins, directions = rays_of(P, (24, 24))
    offset = CENTER - origins
    distance_sq = (offset ** 2).sum(-1) - ((offset * directions).sum(-1)) ** 2  # ray-to-centre distance^2
    expected = density * 2.0 * np.sqrt(np.clip(radius ** 2 - distance_sq, 0.0, None))
    assert np.abs(image - expected).max() < 1e-9
    assert (expected > 0).mean() > 0.2  # the sphere covers a good part of the view


def test_rotated_cylinder_chords_across_and_along_its_axis():
    axis = np.array([1.0, 2.0, -0.5]) / np.linalg.norm([1.0, 2.0, -0.5])
    bar = rod(CENTER - 15.0 * axis, CENTER + 15.0 * axis, 6.0, 1.0)
    across = np.cross(axis, [0.0, 0.0, 1.0])
    across /= np.linalg.norm(across)
    offset = np.cross(axis, across)  # perpendicular to both: the ray misses the centre by 4 mm
    chord = AnalyticPhantom((bar,)).line_integrals(CENTER + 4.0 * offset - 100.0 * across, across)
    assert chord == pytest.approx(2.0 * np.sqrt(36.0 - 16.0), abs=1e-9)
    along = AnalyticPhantom((bar,)).line_integrals(CENTER - 100.0 * axis + 2.0 * across, axis)
    assert along == pytest.approx(30.0, abs=1e-9)  # the full length, end cap to end cap
    behind = AnalyticPhantom((bar,)).line_integrals(CENTER + 100.0 * axis, axis)
    assert behind == 0.0  # rays start at their source: nothing behind it counts


def small_phantom() -> AnalyticPhantom:
    """A bone-like shell, a tilted cylinder through soft tissue and a hole of air."""
    body = ellipsoid((0.0, 0.0, 0.0), (26.0, 20.0, 22.0), 0.02)
    bone = shell(ellipsoid((4.0, -2.0, 3.0), (12.0, 9.0, 10.0), 0.0), 2.0, 0.05, 0.026, 0.02)
    tilted = rod((-15.0, 5.0, -12.0), (-2.0, 8.0, 10.0), 3.5, 0.02)
    air = ellipsoid((10.0, 9.0, -8.0), (4.0, 3.0, 5.0), -0.02)
    return AnalyticPhantom((body, *bone, tilted, air))


def test_line_integrals_match_a_fine_ray_march_of_the_voxelized_phantom():
    phantom = small_phantom()
    grid = Roi((0.0, 0.0, 0.0), (60.0, 48.0, 52.0)).grid(0.5)
    volume = torch.as_tensor(phantom.reference(grid, subsamples=2).array, dtype=torch.float32)
    P = c_arm_projection_matrix(50.0, 20.0, 1100.0, 700.0, (20, 20), (5.0, 5.0))
    exact = phantom.project(P, (20, 20), supersample=1)
    marched = forward_project(volume, grid, view_rays(P, (20, 20)), step_mm=0.25).numpy()
    error = np.abs(marched - exact)
    assert exact.max() > 1.0
    assert error.max() < 0.03 * exact.max()  # close (a 0.5 mm voxelization), not equal
    assert error.max() > 1e-4


def test_finite_pixel_is_the_mean_of_its_sub_rays():
    phantom = small_phantom()
    P = c_arm_projection_matrix(-20.0, 5.0, 1100.0, 700.0, (6, 6), (8.0, 8.0))
    # An image 3x finer: its pixel centres 0, 1, 2 sit at -1/3, 0, +1/3 of the coarse pixel 0.
    fine = phantom.project(np.array([[3.0, 0.0, 1.0], [0.0, 3.0, 1.0], [0.0, 0.0, 1.0]]) @ P, (18, 18), supersample=1)
    coarse = phantom.project(P, (6, 6), supersample=3)
    assert np.allclose(coarse, fine.reshape(6, 3, 6, 3).mean(axis=(1, 3)), atol=1e-12)


def test_reference_is_the_mean_density_of_each_voxel():
    phantom = small_phantom()
    grid = Roi((0.0, 0.0, 0.0), (60.0, 48.0, 52.0)).grid(4.0)
    reference = phantom.reference(grid, subsamples=4).array
    n = 8  # a finer, brute-force average over each voxel
    offsets = ((np.arange(n) + 0.5) / n - 0.5)
    sub = np.stack(np.meshgrid(offsets, offsets, offsets, indexing="ij"), -1).reshape(-1, 3) * np.asarray(grid.spacing)
    brute = phantom.density(grid.voxel_centers()[..., None, :] + sub).mean(axis=-1)
    assert np.abs(reference - brute).max() < 0.004  # 4^3 samples on boundary voxels vs 8^3
    assert np.abs(reference - brute).mean() < 2e-4
    body = (0.02 * 4 / 3 * np.pi * 26 * 20 * 22 - 0.02 * 4 / 3 * np.pi * 4 * 3 * 5
            + 0.02 * np.pi * 3.5 ** 2 * np.linalg.norm([13.0, 3.0, 22.0])
            + 0.03 * 4 / 3 * np.pi * 12 * 9 * 10 - 0.024 * 4 / 3 * np.pi * 10 * 7 * 8)
    assert reference.sum() * 64.0 == pytest.approx(body, rel=0.01)  # mass: the analytic volumes
    interior = phantom.reference(Roi((4.0, -2.0, 3.0), (4.0, 4.0, 4.0)).grid(2.0)).array
    assert np.allclose(interior, 0.026)  # wholly inside the marrow: exact, no sampling


def test_cropped_phantom_keeps_only_the_box():
    phantom = AnalyticPhantom((cylinder((0.0, 0.0, 0.0), (10.0, 10.0), 100.0, 0.02),))
    box = Roi((0.0, 0.0, 0.0), (40.0, 40.0, 30.0))
    along = phantom.cropped(box).line_integrals(np.array([0.0, 0.0, -500.0]), np.array([0.0, 0.0, 1.0]))
    assert along == pytest.approx(0.02 * 30.0)
    assert phantom.cropped(box).bounds() == box
    grid = Roi((0.0, 0.0, 0.0), (24.0, 24.0, 36.0)).grid(3.0)
    cropped = phantom.cropped(box).reference(grid).array
    full = phantom.reference(grid).array
    assert np.allclose(cropped[1:-1], full[1:-1]) and np.allclose(cropped[[0, -1]], 0.0)


@pytest.mark.parametrize("name", ["spine", "knee"])
def test_anatomy_phantoms_have_bone_in_the_roi_and_no_negative_attenuation(name):
    phantom = make_analytic_phantom(name, seed=3)
    roi = default_roi(name)
    reference = phantom.reference(roi.grid(4.0), subsamples=2).array
    assert reference.min() >= 0.0
    assert reference.max() > 0.04  # cortical bone, 1/mm
    assert 0.01 < np.mean(reference > 0.03) < 0.3  # bone is a part of the ROI, not all of it
    bounds = phantom.bounds()
    assert np.all(bounds.lower < roi.lower) and np.all(bounds.upper > roi.upper)  # the body is larger: truncation
    again = make_analytic_phantom(name, seed=3)  # seeded: the same anatomy
    assert [p.center + p.radii for p in again.primitives] == [p.center + p.radii for p in phantom.primitives]
    with pytest.raises(ValueError, match="phantom name"):
        make_analytic_phantom("hand")
