"""The fast kernels (numba on a CPU, Triton) against the plain torch reference of renderer and voxelizer.

Every available kernel is compared on forward values and the gradients of every parameter
(position, scale, rotation, density) and of a view pose, on odd image sizes, Gaussians with empty
footprints (behind the source, beside the detector), partly off the detector, and huge and tiny
scales. Triton runs here with its interpreter (``TRITON_INTERPRET=1``, set before the kernels are
defined; without CUDA that is the only way they run), so its cases are small.
Tolerances: float64, only summation order differs: 1e-10 of the largest value; float32: 2e-5 of
the peak forward, 2e-4 of the largest gradient (a few ulps per pair over ~100 pairs per pixel).
"""
import json
import os
import warnings

import numpy as np
import pytest
import torch
from conftest import ring_of_matrices

if not torch.cuda.is_available():  # decided when the Triton kernels are defined, i.e. at their import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ixgs.cli import _settings_from, build_parser, main, settings_arguments  # noqa: E402
from ixgs.gaussians import GaussianModel  # noqa: E402
from ixgs.geometry import Roi, view_rays  # noqa: E402
from ixgs.kernels import choice  # noqa: E402
from ixgs.projector import back_project, forward_project  # noqa: E402
from ixgs.reconstruct import ReconstructionSettings  # noqa: E402
from ixgs.scan import write_scan  # noqa: E402
from ixgs.simulate import c_arm_projection_matrix  # noqa: E402
from ixgs.splat import render  # noqa: E402
from ixgs.voxelize import voxelize  # noqa: E402

torch.set_num_threads(1)
ROI = Roi((2.0, -1.0, 3.0), (60.0, 60.0, 60.0))
AVAILABLE = [name for name in ("numba", "triton")
             if not isinstance(choice.kernel_module(name), ImportError)
             and not isinstance(choice.kernel_module(name, "voxelize"), ImportError)]
TOLERANCE = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-4)}


def hard_scene(n: int, dtype, shape=(23, 17), seed=0):
    """Random anisotropic Gaussians, some huge (30 mm) and some tiny (0.05 mm), spilling past the
    detector's field of view, plus one behind the source and one far beside the detector."""
    g = torch.Generator().manual_seed(seed)
    means = torch.as_tensor(ROI.lower, dtype=dtype) - 20.0 + torch.rand(n, 3, generator=g, dtype=dtype) * 100.0
    scales = 1.0 + 3.0 * torch.rand(n, 3, generator=g, dtype=dtype)
    scales[: n // 8] = 30.0 * torch.rand(n // 8, 3, generator=g, dtype=dtype) + 5.0
    scales[n // 8: n // 4] = 0.05 + 0.05 * torch.rand(n // 4 - n // 8, 3, generator=g, dtype=dtype)
    spacing = 100.0 / shape[1]  # mm at the detector: it sees ~64 mm at the isocentre, less than the Gaussians span
    P = c_arm_projection_matrix(35.0, -12.0, 1100.0, 700.0, shape, (spacing, 1.1 * spacing), isocenter=ROI.center)
    rays = view_rays(P, shape, dtype=dtype)
    means[-1] = rays.source.to(dtype) - 0.3 * (torch.as_tensor(ROI.center, dtype=dtype) - rays.source.to(dtype))
    means[-2] = torch.as_tensor(ROI.center, dtype=dtype) + torch.tensor([0.0, 0.0, 400.0], dtype=dtype)
    rotations = torch.randn(n, 4, generator=g, dtype=dtype)
    densities = 0.005 + 0.02 * torch.rand(n, generator=g, dtype=dtype)
    return GaussianModel(means, scales, rotations, densities, ROI.expanded(3.0)), rays


def pose_of(twist: torch.Tensor) -> torch.Tensor:
    """A rigid motion (4, 4) from a rotation vector (rad) and a shift (mm), about the ROI centre."""
    centre = torch.as_tensor(ROI.center, dtype=twist.dtype)
    zero = twist[0] * 0
    skew = torch.stack([torch.stack([zero, -twist[2], twist[1]]), torch.stack([twist[2], zero, -twist[0]]),
                        torch.stack([-twist[1], twist[0], zero])])
    rotation = torch.linalg.matrix_exp(skew)
    top = torch.cat([rotation, (centre - rotation @ centre + twist[3:])[:, None]], dim=1)
    return torch.cat([top, torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=twist.dtype)])


def render_and_grads(model, rays, weights, kernel, posed=True):
    """Image, radii and gradients; ``posed``: through a view pose (whose gradient comes last), else
    without one (the numba kernels then also build the Gaussians' table themselves)."""
    model.zero_grad(set_to_none=True)
    twist = torch.tensor([0.01, -0.02, 0.015, 0.5, -0.3, 0.2], dtype=weights.dtype, requires_grad=True)
    image, radii = render(model, rays, return_radii=True, pose=pose_of(twist) if posed else None, kernel=kernel)
    (image * weights).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    return image.detach(), radii, grads + [twist.grad.clone()] if posed else grads


def assert_close(fast, reference, dtype, what):
    forward_tol, grad_tol = TOLERANCE[dtype]
    image, radii, grads = fast
    ref_image, ref_radii, ref_grads = reference
    peak = ref_image.abs().max().item()
    assert peak > 0.05, what
    # The same footprints (numba forms them in float64: radii agree to rounding, culling exactly).
    assert torch.equal(radii > 0, ref_radii > 0), what
    assert torch.allclose(radii, ref_radii, rtol=1e-5, atol=0.0), what
    assert (image - ref_image).abs().max().item() <= forward_tol * peak, what
    names = ("position", "scale", "rotation", "density", "pose")
    for name, grad, ref in zip(names, grads, ref_grads):
        scale = ref.abs().max().item()
        assert scale > 0, f"{what}: {name}"
        assert (grad - ref).abs().max().item() <= grad_tol * scale, f"{what}: {name}"


@pytest.mark.parametrize("kernel", AVAILABLE)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("posed", [True, False])
def test_render_kernels_match_torch(kernel, dtype, posed):
    n, shape = (400, (23, 17)) if kernel == "numba" else (40, (11, 9))
    model, rays = hard_scene(n, dtype, shape)
    weights = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    reference = render_and_grads(model, rays, weights, "torch", posed)
    radii = reference[1]
    assert (radii == 0).sum() >= 2 and (radii > 0).sum() > n // 4  # empty footprints and visible ones
    assert_close(render_and_grads(model, rays, weights, kernel, posed), reference, dtype, f"{kernel} {dtype} {posed}")


@pytest.mark.parametrize("kernel", AVAILABLE)
@pytest.mark.parametrize("voxel_average", [True, False])
def test_voxelize_kernels_match_torch(kernel, voxel_average):
    dtype = torch.float64
    model, _ = hard_scene(300 if kernel == "numba" else 30, dtype)
    grid = ROI.grid(60.0 / 13)  # 13^3 voxels of 4.6 mm: tiny Gaussians fall between centres
    region = (slice(2, 11), slice(0, 7), slice(5, 13))  # a TV patch: odd, at the grid's edge
    weights = torch.randn(9, 7, 8, generator=torch.Generator().manual_seed(2), dtype=dtype)
    results = {}
    for name in ("torch", kernel):
        model.zero_grad(set_to_none=True)
        block = voxelize(model, grid, region=region, voxel_average=voxel_average, kernel=name)
        (block * weights).sum().backward()
        with torch.no_grad():
            full = voxelize(model, grid, voxel_average=voxel_average, kernel=name)
        results[name] = (block.detach(), full, [p.grad.clone() for p in model.parameters()])
    (block, full, grads), (ref_block, ref_full, ref_grads) = results[kernel], results["torch"]
    assert ref_block.max().item() > 0.005
    assert (block - ref_block).abs().max().item() <= 1e-10 * ref_block.abs().max().item()
    assert (full - ref_full).abs().max().item() <= 1e-10 * ref_full.abs().max().item()
    for grad, ref in zip(grads, ref_grads):
        assert ref.abs().max().item() > 0
        assert (grad - ref).abs().max().item() <= 1e-10 * ref.abs().max().item()


@pytest.mark.skipif("numba" not in AVAILABLE, reason="numba is not installed")
def test_numba_ray_marcher_matches_torch():
    """Forward projection, its autograd gradient and the adjoint of an odd grid that the view only
    partly sees (rays that miss it, rays that graze it); float32 as the trainer uses it."""
    model, rays = hard_scene(8, torch.float32, shape=(23, 17))
    grid = Roi(ROI.center, (30.0, 20.0, 40.0)).grid(30.0 / 11)
    volume = torch.rand(grid.shape, generator=torch.Generator().manual_seed(3), requires_grad=True)
    weights = torch.randn(rays.shape, generator=torch.Generator().manual_seed(4))
    results = {}
    for kernel in ("torch", "numba"):
        volume.grad = None
        image = forward_project(volume, grid, rays, kernel=kernel)
        (image * weights).sum().backward()
        results[kernel] = (image.detach(), volume.grad.clone(), back_project(weights, grid, rays, kernel=kernel))
    reference = results["torch"]
    assert (reference[0] == 0).any() and (reference[0] > 0).sum() > 100  # rays that miss and rays that cross
    for fast, ref in zip(results["numba"], reference):
        assert (fast - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_kernel_choice_and_fallback(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choice.resolve_kernel("torch", cuda) == "torch"
    with pytest.raises(ValueError, match="setting 'kernel': must be one of"):
        choice.resolve_kernel("fast", cpu)
    if "numba" in AVAILABLE:
        assert choice.resolve_kernel("auto", cpu) == "numba"
        with pytest.raises(ValueError, match="numba kernels run on a CPU"):
            choice.resolve_kernel("numba", cuda)
    # Neither package importable: auto falls back to torch with one warning, explicit choices fail.
    monkeypatch.setattr(choice, "_IMPORTED", {(name, part): ImportError(f"no module named {name}")
                                              for name in ("numba", "triton") for part in ("splat", "voxelize")})
    monkeypatch.setattr(choice, "_WARNED", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert choice.resolve_kernel("auto", cpu) == "torch"
        assert choice.resolve_kernel("auto", cpu) == "torch"
    assert len(caught) == 1 and "pip install 'ixgs[fast]'" in str(caught[0].message)
    with pytest.raises(ValueError, match="triton is not installed"):
        choice.resolve_kernel("triton", cpu)


def test_numba_cache_goes_to_the_user_folder_when_the_package_is_read_only(monkeypatch, tmp_path):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(choice.os, "access", lambda path, mode: False)
    choice._set_numba_cache_dir()
    assert os.environ["NUMBA_CACHE_DIR"] == str(tmp_path / ".cache" / "ixgs" / "numba")
    monkeypatch.setattr(choice.os, "access", lambda path, mode: True)
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    choice._set_numba_cache_dir()
    assert "NUMBA_CACHE_DIR" not in os.environ


def test_reconstruct_records_the_kernel_and_the_iteration_time(tmp_path):
    images = [np.full((24, 30), 0.5, np.float32) for _ in range(4)]
    for image in images:
        image[8:16, 10:20] = 2.0
    scan = write_scan(tmp_path / "scan", images, ring_of_matrices(4, shape=(24, 30), focal_px=90.0),
                      roi=Roi((0.0, 0.0, 0.0), (40.0, 40.0, 40.0)))
    kernel = "numba" if "numba" in AVAILABLE else "torch"
    status = main(["reconstruct", str(scan), "-o", str(tmp_path / "out"), "--iterations", "4", "--gaussians", "300",
                   "--voxel-size", "4", "--progress", "none", "--device", "cpu", "--kernel", kernel])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert status == 0
    assert report["kernel"] == report["settings"]["kernel"] == kernel
    assert report["ms_per_iteration"] > 0
    assert 0.0 < report["tv_clip_per_mm"] < 0.1  # the SART start's TV clip, an attenuation in 1/mm
    chosen = ReconstructionSettings(kernel="torch", device="cpu")
    parsed = build_parser().parse_args(["reconstruct", "scan", "-o", "out", *settings_arguments(chosen)])
    assert _settings_from(parsed) == chosen
    with pytest.raises(ValueError, match="setting 'kernel'"):
        ReconstructionSettings(kernel="cuda").validate()
