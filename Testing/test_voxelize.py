"""Voxelization of the Gaussians: mass, regions, gradients, and agreement with the renderer."""
import math

import numpy as np
import pytest
import torch

from ixgs.gaussians import GaussianModel
from ixgs.geometry import Roi, compose_projection_matrix, normalize_projection_matrix, view_rays
from ixgs.projector import forward_project
from ixgs.splat import render
from ixgs.voxelize import voxelize



def rotated_gaussian(mean, scales, quaternion, density, support=Roi((0.0, 0.0, 0.0), (40.0, 40.0, 40.0))):
    f64 = dict(dtype=torch.float64)
    return GaussianModel(torch.tensor([mean], **f64), torch.tensor([scales], **f64),
                         torch.tensor([quaternion], **f64), torch.tensor([density], **f64), support)


def test_single_gaussian_mass():
    model = rotated_gaussian([1.3, -0.7, 2.1], [2.0, 3.5, 1.2], [0.9, 0.3, -0.2, 0.4], 0.05)
    grid = Roi((0.0, 0.0, 0.0), (40.0, 40.0, 40.0)).grid(0.5)
    with torch.no_grad():
        volume = voxelize(model, grid)
        det = torch.linalg.det(model.covariances()[0]).item()
    voxel_volume = float(np.prod(grid.spacing))
    expected = 0.05 * (2 * math.pi) ** 1.5 * math.sqrt(det) / voxel_volume
    assert abs(volume.sum().item() - expected) < 0.01 * expected
    assert volume.max().item() <= 0.05 + 1e-12


def test_region_equals_block_of_full_volume_and_is_differentiable():
    g = torch.Generator().manual_seed(0)
    support = Roi((5.0, -3.0, 2.0), (48.0, 40.0, 32.0))
    model = GaussianModel.random(support, 300, g, density=0.01, scale_mm=2.0, dtype=torch.float64)
    grid = support.grid(1.0)
    region = (slice(4, 20), slice(10, 26), slice(30, 46))
    with torch.no_grad():
        full = voxelize(model, grid, pair_budget=5000)
    block = voxelize(model, grid, region=region)
    assert block.shape == (16, 16, 16)
    assert torch.allclose(block, full[region], rtol=0, atol=1e-14)
    # The field is linear in each density: rho d(sum)/d(rho) is that Gaussian's own voxel sum.
    block.sum().backward()
    grad_density = model._density.grad / torch.sigmoid(model._density.detach())  # softplus' = sigmoid
    with torch.no_grad():
        touching = torch.nonzero(grad_density).squeeze(1)[:4]
        singles = torch.stack([voxelize(model_subset(model, int(i)), grid, region=region).sum() for i in touching])
    assert len(touching) == 4 and singles.min() > 0
    assert torch.allclose(grad_density[touching] * model.densities[touching].detach(), singles, rtol=1e-10)
    with pytest.raises(ValueError, match="region"):
        voxelize(model, grid, region=(slice(0, 4), slice(0, 4)))


def model_subset(model: GaussianModel, index: int) -> GaussianModel:
    with torch.no_grad():
        return GaussianModel(model.means[index:index + 1], model.scales[index:index + 1],
                             model._rotation[index:index + 1], model.densities[index:index + 1], model.support)


def test_render_agrees_with_projection_of_voxelized_gaussians():
    """Two independent routes to the same DRR: exact line integrals vs ray marching a fine voxelization."""
    g = torch.Generator().manual_seed(1)
    support = Roi((0.0, 0.0, 0.0), (40.0, 40.0, 40.0))
    model = GaussianModel.random(support.expanded(0.7), 60, g, density=0.03, scale_mm=2.5, dtype=torch.float64)
    shape = (32, 32)
    intrinsics = np.array([[700.0 / 1.6, 0.0, 16.0], [0.0, 700.0 / 1.6, 15.5], [0.0, 0.0, 1.0]])
    world_to_camera = np.eye(4)
    angle = 0.6
    world_to_camera[:3, :3] = [[math.cos(angle), 0.0, math.sin(angle)], [0.0, 1.0, 0.0],
                               [-math.sin(angle), 0.0, math.cos(angle)]]
    world_to_camera[:3, 3] = [0.0, 0.0, 700.0]
    P = normalize_projection_matrix(compose_projection_matrix(intrinsics, world_to_camera), np.zeros(3))
    rays = view_rays(P, shape, dtype=torch.float64)
    grid = support.grid(0.5)
    with torch.no_grad():
        rendered = render(model, rays)
        projected = forward_project(voxelize(model, grid), grid, rays, step_mm=0.25)
    peak = rendered.max().item()
    assert peak > 0.05
    assert (rendered - projected).abs().max().item() < 0.03 * peak
