"""The Gaussian model: parameter transforms, initialisations, adaptive control, checkpoints."""
import copy
import math

import numpy as np
import pytest
import torch

from ixgs.gaussians import GaussianModel
from ixgs.geometry import Roi, compose_projection_matrix, normalize_projection_matrix, view_rays
from ixgs.splat import render
from ixgs.voxelize import voxelize

SUPPORT = Roi((10.0, -5.0, 3.0), (80.0, 60.0, 40.0))
LEARNING_RATES = {"position": 2e-4, "scale": 5e-3, "rotation": 1e-3, "density": 1e-2}



def small_view(shape=(32, 32)):
    intrinsics = np.array([[700.0 / 2.0, 0.0, 15.5], [0.0, 700.0 / 2.0, 15.5], [0.0, 0.0, 1.0]])
    world_to_camera = np.eye(4)
    world_to_camera[:3, 3] = -np.asarray(SUPPORT.center) + [0.0, 0.0, 700.0]
    P = normalize_projection_matrix(compose_projection_matrix(intrinsics, world_to_camera), np.asarray(SUPPORT.center))
    return view_rays(P, shape)


def test_random_init_and_parameter_transforms():
    g = torch.Generator().manual_seed(0)
    model = GaussianModel.random(SUPPORT, 500, g, density=0.003)
    assert len(model) == 500
    means = model.means.detach().numpy()
    assert SUPPORT.contains(means).all()
    assert np.abs(means.mean(axis=0) - np.asarray(SUPPORT.center)).max() < 0.1 * max(SUPPORT.size)
    expected_scale = 0.5 * (np.prod(SUPPORT.size) / 500) ** (1 / 3)
    assert torch.allclose(model.scales, torch.tensor(expected_scale, dtype=torch.float32), rtol=1e-4)
    assert torch.allclose(model.densities, torch.tensor(0.003), rtol=1e-4)
    # Scale stays inside the sigmoid bounds whatever the raw value.
    with torch.no_grad():
        model._scale[:2] = torch.tensor([[-1e4] * 3, [1e4] * 3])
    assert model.scales[0].min() >= 0.0005 * 80.0 * (1 - 1e-6)
    assert model.scales[1].max() <= 0.5 * 80.0 * (1 + 1e-6)
    # S^-1 from R diag(1/s^2) R^T keeps float32 accuracy for thin Gaussians (no matrix inversion).
    with torch.no_grad():
        model._rotation.copy_(torch.randn(500, 4, generator=g))
        model._scale[:, 0] = -8.0  # ~0.04 mm against ~5 mm
    reference = copy.deepcopy(model).double()
    inverse64 = torch.linalg.inv(reference.covariances())
    relative = (model.inverse_covariances().double() - inverse64).abs().amax((1, 2)) / inverse64.abs().amax((1, 2))
    assert relative.max() < 1e-5
    assert torch.allclose(reference.inverse_covariances(), inverse64, rtol=1e-6, atol=0)


def test_from_volume_approximates_the_volume():
    g = torch.Generator().manual_seed(1)
    grid = SUPPORT.grid(2.0)
    centres = torch.as_tensor(grid.voxel_centers(), dtype=torch.float32)
    # A smooth ellipsoidal "body" with a denser "bone" inside (1/mm).
    body = torch.sigmoid((1.0 - (((centres - torch.tensor(SUPPORT.center)) / torch.tensor([30.0, 22.0, 15.0])) ** 2)
                          .sum(-1)) * 8.0) * 0.02
    bone = torch.sigmoid((1.0 - (((centres - torch.tensor(SUPPORT.center)) / 8.0) ** 2).sum(-1)) * 8.0) * 0.03
    values = body + bone
    model = GaussianModel.from_volume(values, grid, 6000, g)
    assert len(model) == 6000
    with torch.no_grad():
        approx = voxelize(model, grid)
    mass_error = abs(approx.sum().item() - values.sum().item()) / values.sum().item()
    assert mass_error < 0.03
    relative_rmse = ((approx - values).pow(2).mean().sqrt() / values.pow(2).mean().sqrt()).item()
    assert relative_rmse < 0.22  # sampling noise of ~16 overlapping kernels per point (measured 0.17)
    with pytest.raises(ValueError, match="positive"):
        GaussianModel.from_volume(torch.zeros(grid.shape), grid, 10, g)


def test_densify_and_prune_updates_model_and_optimizer():
    g = torch.Generator().manual_seed(2)
    model = GaussianModel.random(SUPPORT, 200, g, density=0.003, scale_mm=3.0)
    with torch.no_grad():
        model._scale[:20] = model._raw_from_scales(torch.full((20, 3), 12.0))  # large: > 0.1 x 80 mm
        model._position[:20] *= 0.1  # near the centre: split children stay inside the support
        model._density[190:] = -30.0  # density ~1e-13: pruned
    optimizer = torch.optim.Adam(model.parameter_groups(LEARNING_RATES), eps=1e-15)
    rays = small_view()
    render(model, rays).sum().backward()
    optimizer.step()
    grad = torch.zeros(200)
    grad[:10] = 1.0     # large Gaussians with large gradient: split
    grad[100:130] = 1.0  # small ones: cloned
    densities_before = model.densities.detach().clone()
    scales_before = model.scales.detach().clone()
    stats = model.densify_and_prune(optimizer, grad, grad_threshold=0.5, split_scale_fraction=0.1,
                                    min_density=1e-5, max_count=1000, generator=g)
    assert stats == {"cloned": 30, "split": 10, "pruned": 10, "total": 200 - 10 + 30 + 20 - 10}
    assert len(model) == 230
    # Kept originals first, then clones, then split children.
    survivors = torch.cat([torch.arange(10, 190)])
    assert torch.allclose(model.densities[:180], torch.where(
        (survivors >= 100) & (survivors < 130), densities_before[survivors] / 2, densities_before[survivors]), rtol=1e-5)
    assert torch.allclose(model.densities[180:210], densities_before[100:130] / 2, rtol=1e-5)
    assert torch.allclose(model.densities[210:], densities_before[:10].repeat(2) / 2, rtol=1e-5)
    assert torch.allclose(model.scales[210:], scales_before[:10].repeat(2, 1) / 1.6, rtol=1e-4)
    for group in optimizer.param_groups:
        (param,) = group["params"]
        state = optimizer.state[param]
        assert param.shape[0] == 230
        assert state["exp_avg"].shape == param.shape and state["exp_avg_sq"].shape == param.shape
        assert state["exp_avg"][-50:].abs().max() == 0  # new Gaussians start with zero moments
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {id(p) for p in model.parameters()}
    # Training continues after densification.
    before = model.means.detach().clone()
    optimizer.zero_grad()
    render(model, rays).sum().backward()
    optimizer.step()
    assert (model.means.detach() - before).abs().max() > 0
    # The cap on the count limits growth to the largest gradients.
    stats = model.densify_and_prune(optimizer, torch.ones(230), 0.5, 0.1, 1e-5, max_count=240, generator=g)
    assert stats["total"] == 240


def test_checkpoint_round_trip_renders_identically(tmp_path):
    g = torch.Generator().manual_seed(3)
    model = GaussianModel.random(SUPPORT, 300, g, density=0.003)
    with torch.no_grad():
        model._rotation.copy_(torch.randn(300, 4, generator=g))
        model._scale.add_(torch.randn(300, 3, generator=g))
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    loaded = GaussianModel.from_state_dict(torch.load(path))
    assert loaded.support == model.support
    rays = small_view()
    with torch.no_grad():
        assert torch.equal(render(loaded, rays), render(model, rays))


def test_bad_inputs_raise_value_errors():
    g = torch.Generator().manual_seed(4)
    model = GaussianModel.random(SUPPORT, 10, g)
    with pytest.raises(ValueError, match="density"):
        model.parameter_groups({"position": 1e-4, "scale": 1e-3, "rotation": 1e-3})
    with pytest.raises(ValueError, match="grad_accum"):
        model.densify_and_prune(None, torch.zeros(3), 0.1, 0.1, 1e-5, 100)
    with pytest.raises(ValueError, match="means"):
        GaussianModel(torch.zeros(4, 2), torch.ones(4, 3), torch.ones(4, 4), torch.ones(4), SUPPORT)
    with torch.no_grad():
        assert math.isfinite(float(render(model, small_view()).sum()))
