"""The Gaussian model: parameter transforms, initialisations, adaptive control, checkpoints."""
import copy
import math

import numpy as np
import pytest
import torch

from ixgs.gaussians import GaussianModel, inverse_softplus
from ixgs.geometry import Roi, compose_projection_matrix, normalize_projection_matrix, view_rays
from ixgs.metrics import psnr
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
    values = _smooth_volume(grid)
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
        model._scale[:20] = model._raw_from_scales(torch.full((20, 3), 12.0))  # large: > 1 voxel of 5 mm
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
    stats = model.densify_and_prune(optimizer, grad, grad_threshold=0.5, voxel_size_mm=5.0, max_count=1000)
    assert stats == {"cloned": 30, "split": 10, "pruned": 10, "total": 200 - 10 + 30 + 20 - 10}
    assert len(model) == 230
    # Kept originals first, then clones, then split children.
    survivors = torch.cat([torch.arange(10, 190)])
    assert torch.allclose(model.densities[:180], torch.where(
        (survivors >= 100) & (survivors < 130), densities_before[survivors] / 2, densities_before[survivors]), rtol=1e-5)
    assert torch.allclose(model.densities[180:210], densities_before[100:130] / 2, rtol=1e-5)
    # Split children: the largest scale / 1.6, the others kept, density x 1.6 / 2 (half the mass each).
    assert torch.allclose(model.densities[210:], densities_before[:10].repeat(2) * 0.8, rtol=1e-4)
    child_scales = model.scales[210:].detach().sort(dim=1).values
    parent_scales = scales_before[:10].repeat(2, 1).sort(dim=1).values
    assert torch.allclose(child_scales, torch.cat([parent_scales[:, :1] / 1.6, parent_scales[:, 1:]], 1), rtol=1e-4)
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
    stats = model.densify_and_prune(optimizer, torch.ones(230), 0.5, 5.0, max_count=240)
    assert stats["total"] == 240


def _anisotropic_model(n: int, seed: int, scale_range_mm=(1.0, 8.0)) -> GaussianModel:
    """``n`` Gaussians near the support's centre with random orientations and anisotropic scales."""
    g = torch.Generator().manual_seed(seed)
    model = GaussianModel.random(SUPPORT, n, g, density=0.01)
    lo, hi = scale_range_mm
    with torch.no_grad():
        model._position.mul_(0.2)
        model._rotation.copy_(torch.randn(n, 4, generator=g))
        model._scale.copy_(model._raw_from_scales(lo + (hi - lo) * torch.rand(n, 3, generator=g)))
        model._density.copy_(inverse_softplus(0.005 + 0.03 * torch.rand(n, generator=g)))
    return model


def test_split_conserves_mass_mean_and_covariance():
    model = _anisotropic_model(50, seed=5)
    parent_mass = model.masses().detach().clone()
    parent_means = model.means.detach().clone()
    parent_cov = model.covariances().detach().clone()
    parent_scales = model.scales.detach().clone()
    stats = model.densify_and_prune(None, torch.ones(50), 0.5, voxel_size_mm=0.5, max_count=1000)
    assert stats == {"cloned": 0, "split": 50, "pruned": 0, "total": 100}
    mass = model.masses().detach()
    children = mass[:50], mass[50:]  # child + and child - of parent i
    assert ((children[0] + children[1]) / parent_mass - 1).abs().max() < 0.01  # measured ~1e-6
    # The pair is the parent's mixture moments too: same mean, same covariance.
    means, cov = model.means.detach(), model.covariances().detach()
    assert torch.allclose(0.5 * (means[:50] + means[50:]), parent_means, atol=1e-4)
    pair_cov = 0.5 * (cov[:50] + cov[50:]) + 0.25 * torch.einsum("ni,nj->nij", means[:50] - means[50:],
                                                                    means[:50] - means[50:])
    assert ((pair_cov - parent_cov).abs().amax((1, 2)) / parent_cov.abs().amax((1, 2))).max() < 1e-3
    # The largest scale shrinks by 1.6; the smaller two are kept.
    expected = parent_scales.clone()
    expected[torch.arange(50), parent_scales.argmax(1)] /= 1.6
    assert torch.allclose(model.scales[:50], expected, rtol=1e-4)
    assert torch.allclose(model.scales[:50], model.scales[50:], rtol=1e-6)


def test_clone_conserves_mass():
    model = _anisotropic_model(40, seed=6, scale_range_mm=(0.5, 1.5))
    total = model.masses().sum().item()
    stats = model.densify_and_prune(None, torch.ones(40), 0.5, voxel_size_mm=2.0, max_count=1000)
    assert stats == {"cloned": 40, "split": 0, "pruned": 0, "total": 80}
    mass = model.masses().detach()
    assert ((mass[:40] + mass[40:]) / (2 * mass[40:]) - 1).abs().max() < 1e-6  # original and copy alike
    assert abs(mass.sum().item() / total - 1) < 0.01
    # Same place, same shape: the voxelized field is unchanged.
    assert torch.equal(model.means[:40], model.means[40:]) and torch.equal(model.scales[:40], model.scales[40:])


def test_split_or_clone_follows_the_output_voxel():
    model = _anisotropic_model(4, seed=7)
    with torch.no_grad():  # largest sigma 0.5, 0.9, 1.2 and 3 mm
        model._scale.copy_(model._raw_from_scales(torch.tensor(
            [[0.5, 0.3, 0.2], [0.4, 0.9, 0.6], [1.2, 0.5, 0.5], [1.0, 2.0, 3.0]])))
    for voxel_mm, split_voxels, expected_split in ((1.0, 1.0, 2), (2.0, 1.0, 1), (0.5, 2.0, 2), (0.4, 1.0, 4)):
        trial = copy.deepcopy(model)
        stats = trial.densify_and_prune(None, torch.ones(4), 0.5, voxel_mm, 100, split_voxels=split_voxels)
        assert stats["split"] == expected_split and stats["cloned"] == 4 - expected_split, (voxel_mm, stats)
    # Only Gaussians with a large gradient are densified.
    stats = copy.deepcopy(model).densify_and_prune(None, torch.tensor([0.0, 0.0, 0.0, 1.0]), 0.5, 1.0, 100)
    assert (stats["split"], stats["cloned"], stats["total"]) == (1, 0, 5)


def test_prune_by_mass_keeps_faint_large_gaussians():
    means = torch.tensor([[0.0, -5.0, 3.0], [20.0, -5.0, 3.0], [30.0, 0.0, 0.0], [10.0, 40.0, 3.0]])
    # Soft tissue: sigma 6 mm at 1e-4/mm (mass 0.34 mm^2; the old density rule, 2e-4/mm, pruned it);
    # a bright speck far below a voxel (sigma 0.1 mm, 0.03/mm: 4.7e-4 mm^2); a water-like Gaussian;
    # one centred outside the support.
    scales = torch.tensor([[6.0] * 3, [0.1] * 3, [2.0] * 3, [2.0] * 3])
    densities = torch.tensor([1e-4, 0.03, 0.02, 0.02])
    rotations = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(4, 1)
    model = GaussianModel(means, scales, rotations, densities, SUPPORT)
    assert torch.allclose(model.masses(), densities * (2 * math.pi) ** 1.5 * scales.prod(1), rtol=1e-3)
    # Threshold 0.5 voxel x 2e-3/mm x (1 mm)^3 = 1e-3 mm^2.
    stats = model.densify_and_prune(None, torch.zeros(4), 0.5, voxel_size_mm=1.0, max_count=100)
    assert stats == {"cloned": 0, "split": 0, "pruned": 2, "total": 2}
    assert torch.allclose(model.densities, torch.tensor([1e-4, 0.02]), rtol=1e-3)


def _smooth_volume(grid):
    """A smooth ellipsoidal "body" (0.02/mm) with a denser "bone" inside (+0.03/mm)."""
    centres = torch.as_tensor(grid.voxel_centers(), dtype=torch.float32)
    body = torch.sigmoid((1.0 - (((centres - torch.tensor(SUPPORT.center)) / torch.tensor([30.0, 22.0, 15.0])) ** 2)
                          .sum(-1)) * 8.0) * 0.02
    bone = torch.sigmoid((1.0 - (((centres - torch.tensor(SUPPORT.center)) / 8.0) ** 2).sum(-1)) * 8.0) * 0.03
    return body + bone


def test_deterministic_start_reproduces_the_volume():
    grid = SUPPORT.grid(2.0)  # 40 x 30 x 20 voxels
    values = _smooth_volume(grid)
    # One Gaussian per voxel where the budget allows: the fit is near exact (measured 94 dB).
    per_voxel = GaussianModel.from_volume_deterministic(values, grid, 30000, SUPPORT)
    assert len(per_voxel) == values.numel()
    with torch.no_grad():
        assert psnr(voxelize(per_voxel, grid).numpy(), values.numpy()) > 60.0
    # 3000 Gaussians for 24000 voxels: cells of 2 voxels. Measured 37.0 dB; the sampled start 28.2 dB.
    model = GaussianModel.from_volume_deterministic(values, grid, 3000, SUPPORT)
    assert len(model) <= 3000
    with torch.no_grad():
        fitted = psnr(voxelize(model, grid).numpy(), values.numpy())
        sampled = psnr(voxelize(GaussianModel.from_volume(values, grid, len(model), torch.Generator().manual_seed(1)),
                                grid).numpy(), values.numpy())
    assert fitted >= 35.0 and fitted > sampled + 5.0, (fitted, sampled)
    # The mass is the volume's (8 mm^3 voxels), plus the ~1 % of each kernel that voxelize cuts off at 3 sigma.
    assert 1.0 <= model.masses().sum().item() / (values.sum().item() * 8.0) < 1.02
    # Deterministic: the same model twice.
    again = GaussianModel.from_volume_deterministic(values, grid, 3000, SUPPORT)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    with pytest.raises(ValueError, match="positive"):
        GaussianModel.from_volume_deterministic(torch.zeros(grid.shape), grid, 100, SUPPORT)


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
        model.densify_and_prune(None, torch.zeros(3), 0.1, 1.0, 100)
    with pytest.raises(ValueError, match="voxel_size_mm"):
        model.densify_and_prune(None, torch.zeros(10), 0.1, 0.0, 100)
    with pytest.raises(ValueError, match="means"):
        GaussianModel(torch.zeros(4, 2), torch.ones(4, 3), torch.ones(4, 4), torch.ones(4), SUPPORT)
    with torch.no_grad():
        assert math.isfinite(float(render(model, small_view()).sum()))
