"""The cone-beam Gaussian renderer against numerical line integrals and finite differences."""
import math

import numpy as np
import pytest
import torch

from ixgs.gaussians import GaussianModel
from ixgs.geometry import Roi, binning_matrix, compose_projection_matrix, normalize_projection_matrix, view_rays
from ixgs.pairs import box_pairs
from ixgs.splat import count_pairs, render



def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def general_projection(rng, distance_mm: float, focal_px: float, shape) -> np.ndarray:
    """A non-C-arm camera: random orientation, skew, unequal focal lengths, off-centre principal point,
    source ``distance_mm`` from the world origin, which projects near the image centre."""
    rows, cols = shape
    intrinsics = np.array([[focal_px, 0.02 * focal_px, 0.5 * cols + 1.3],
                           [0.0, 1.07 * focal_px, 0.5 * rows - 2.1],
                           [0.0, 0.0, 1.0]])
    world_to_camera = np.eye(4)
    world_to_camera[:3, :3] = random_rotation(rng)
    world_to_camera[:3, 3] = [0.7, -1.1, distance_mm]
    return normalize_projection_matrix(compose_projection_matrix(intrinsics, world_to_camera), np.zeros(3))


def make_model(rng, n, scale_range, spread_mm, dtype=torch.float64) -> GaussianModel:
    means = torch.as_tensor(rng.uniform(-spread_mm, spread_mm, size=(n, 3)), dtype=dtype)
    scales = torch.as_tensor(rng.uniform(*scale_range, size=(n, 3)), dtype=dtype)
    rotations = torch.as_tensor(rng.normal(size=(n, 4)), dtype=dtype)
    densities = torch.as_tensor(rng.uniform(0.02, 0.08, size=n), dtype=dtype)
    return GaussianModel(means, scales, rotations, densities, Roi((0.0, 0.0, 0.0), (60.0, 60.0, 60.0)))


def quadrature(model: GaussianModel, rays, step_mm: float) -> np.ndarray:
    """Trapezoid rule of the Gaussian sum along every pixel's ray, in float64, over +-7 sigma."""
    source = rays.source.double().numpy()
    directions = rays.directions.double().numpy().reshape(-1, 3)
    image = np.zeros(len(directions))
    with torch.no_grad():
        means = model.means.double().numpy()
        inverse = model.inverse_covariances().double().numpy()
        densities = model.densities.double().numpy()
        reach = 7.0 * model.scales.double().max(dim=1).values.numpy()
    for m, A, rho, half in zip(means, inverse, densities, reach):
        t = np.arange(-half, half + step_mm, step_mm)
        for block in np.array_split(np.arange(len(directions)), max(1, len(directions) // 64)):
            d = directions[block]
            centre = (m - source) @ d.T  # depth of the closest approach per ray
            points = source + (centre[:, None] + t[None, :])[..., None] * d[:, None, :] - m
            q = np.einsum("pti,ij,ptj->pt", points, A, points)
            image[block] += np.trapezoid(rho * np.exp(-0.5 * q), dx=step_mm, axis=1)
    return image.reshape(rays.shape)


def test_render_matches_quadrature_for_general_projection():
    rng = np.random.default_rng(1)
    shape = (40, 48)
    P = general_projection(rng, 700.0, 700.0 / 1.2, shape)  # ~1.2 mm pixels at the isocentre
    rays = view_rays(P, shape, dtype=torch.float64)
    model = make_model(rng, 4, (1.5, 6.0), 15.0)
    expected = quadrature(model, rays, 0.02)
    peak = expected.max()
    assert peak > 0.1
    with torch.no_grad():
        image = render(model, rays, sigmas=4.0).numpy()  # 4 sigma: truncation below exp(-8) of a peak
        assert np.abs(image - expected).max() < 1e-3 * peak
        chunked = render(model, rays, pair_budget=37, sigmas=4.0).numpy()
        assert count_pairs(model, rays, sigmas=4.0) > 20 * 37  # many chunks, items cut across them
        assert np.abs(chunked - image).max() < 1e-12 * peak
        # Default 3 sigma footprint: each Gaussian loses at most exp(-4.5) of its peak per pixel.
        truncated = render(model, rays).numpy()
        assert np.abs(truncated - expected).max() < 4 * math.exp(-4.5) * peak


def test_pixel_footprint_renders_the_mean_over_each_pixel():
    """Gaussians far smaller than a pixel (0.1-0.6 mm against ~1.8 mm at the isocentre), as cortical
    shells are: the central ray misses what the pixel's area averages; the footprint model
    (a Gaussian of the box's variance) comes close to the mean of 7 x 7 sub-rays and keeps the mass."""
    rng = np.random.default_rng(8)
    shape = (36, 40)
    P = general_projection(rng, 700.0, 700.0 / 1.8, shape)
    model = make_model(rng, 60, (0.1, 0.6), 20.0)
    k = 7
    fine = np.linalg.inv(binning_matrix(k)) @ P
    with torch.no_grad():
        mean = render(model, view_rays(fine, (shape[0] * k, shape[1] * k), dtype=torch.float64),
                      sigmas=5.0).reshape(shape[0], k, shape[1], k).mean(dim=(1, 3))
        central = render(model, view_rays(P, shape, dtype=torch.float64), sigmas=5.0)
        footprint = render(model, view_rays(P, shape, dtype=torch.float64), sigmas=5.0, pixel_footprint=True)

    def error(image):
        return float((image - mean).norm() / mean.norm())

    assert error(central) > 0.4
    assert error(footprint) < 0.12
    assert abs(float(footprint.sum() / mean.sum()) - 1.0) < 0.03


def test_float32_small_gaussians_far_from_source():
    """0.3 mm Gaussians 1000 mm from the source: c - b^2/a would lose everything in float32."""
    rng = np.random.default_rng(2)
    shape = (32, 32)
    P = general_projection(rng, 1000.0, 1000.0 / 0.1, shape)  # 0.1 mm pixels at the isocentre
    model64 = make_model(rng, 3, (0.25, 0.35), 0.8)
    expected = quadrature(model64, view_rays(P, shape, dtype=torch.float64), 0.002)
    model32 = GaussianModel.from_state_dict({k: v.float() for k, v in model64.state_dict().items()})
    with torch.no_grad():
        image = render(model32, view_rays(P, shape, dtype=torch.float32), sigmas=4.0)
    assert image.dtype == torch.float32
    assert np.abs(image.numpy() - expected).max() < 1e-3 * expected.max()


@pytest.mark.parametrize("name", ["_position", "_scale", "_rotation", "_density"])
def test_gradients_match_finite_differences(name):
    rng = np.random.default_rng(3)
    shape = (24, 24)
    P = general_projection(rng, 700.0, 700.0 / 2.0, shape)
    rays = view_rays(P, shape, dtype=torch.float64)
    model = make_model(rng, 3, (2.0, 6.0), 12.0)
    weights = torch.as_tensor(rng.normal(size=shape))

    def loss() -> torch.Tensor:  # wide footprint so that box edges carry ~exp(-18) of a peak
        return (render(model, rays, sigmas=6.0, pair_budget=101) * weights).sum()

    param = getattr(model, name)
    loss().backward()
    analytic = param.grad.clone()
    numeric = torch.zeros_like(analytic)
    eps = 1e-6
    with torch.no_grad():
        for index in np.ndindex(*param.shape):
            original = param[index].item()
            param[index] = original + eps
            plus = loss().item()
            param[index] = original - eps
            minus = loss().item()
            param[index] = original
            numeric[index] = (plus - minus) / (2 * eps)
    scale = numeric.abs().max().item()
    assert scale > 0
    assert (analytic - numeric).abs().max().item() < 1e-5 * scale


def test_radii_mark_visible_gaussians_and_culls():
    rng = np.random.default_rng(4)
    shape = (32, 32)
    P = general_projection(rng, 700.0, 700.0 / 1.5, shape)
    rays = view_rays(P, shape, dtype=torch.float64)
    source = rays.source.numpy()
    axis = -source / np.linalg.norm(source)
    means = torch.as_tensor(np.stack([np.zeros(3), source - 100.0 * axis,  # behind the source
                                      np.array([0.0, 0.0, 0.0]) + 400.0 * np.cross(axis, [0.0, 0.0, 1.0])]))
    model = GaussianModel(means, torch.full((3, 3), 3.0, dtype=torch.float64), torch.tensor([[1.0, 0, 0, 0]] * 3,
                          dtype=torch.float64), torch.full((3,), 0.05, dtype=torch.float64),
                          Roi((0.0, 0.0, 0.0), (2000.0, 2000.0, 2000.0)))
    image, radii = render(model, rays, return_radii=True)
    assert radii[0] > 1.0 and radii[1] == 0 and radii[2] == 0
    alone = render(GaussianModel(means[:1], torch.full((1, 3), 3.0, dtype=torch.float64),
                                 torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64),
                                 torch.full((1,), 0.05, dtype=torch.float64), model.support), rays)
    assert torch.equal(image.detach(), alone.detach())


@pytest.mark.parametrize("grid_shape", [(7, 9), (5, 6, 4)])
def test_box_pairs_enumerate_each_clipped_cell_once(grid_shape):
    g = torch.Generator().manual_seed(5)
    n, dims = 40, len(grid_shape)
    lower = torch.randint(-4, 9, (n, dims), generator=g)
    extent = torch.randint(0, 6, (n, dims), generator=g)
    expected = set()
    for item in range(n):
        ranges = [range(max(0, int(lo)), min(size, int(lo + ex)))
                  for lo, ex, size in zip(lower[item], extent[item], grid_shape)]
        for cell in np.ndindex(*[len(r) for r in ranges]):
            expected.add((item, *(r[c] for r, c in zip(ranges, cell))))
    got = []
    for items, cells in box_pairs(lower, extent, grid_shape, pair_budget=13):
        assert len(items) <= 13
        got.extend((int(i), *map(int, c)) for i, c in zip(items, cells))
    assert len(got) == len(set(got)) == len(expected)
    assert set(got) == expected
