"""Benchmark: does ``--refine-poses`` recover perturbed C-arm poses, and what does it cost or gain in 3D?

A simulated scan is reconstructed three times with the Gaussians: with the true poses, with every
view's pose perturbed by a rigid motion of ``--degrees`` about a random axis through the ROI centre
and ``--mm`` along a random direction (the perturbations' mean is removed: a motion shared by all
views is a motion of the patient and cannot be seen), and with the perturbed poses refined. It records
the 3D PSNR of each, how well it re-projects the views, and the pose error before and after
refinement as the mean distance (pixels) between where the true and the estimated matrices project
the ROI's corners, edge midpoints and centre (what matters for the reconstruction), plus the
rotation error (degrees). Results go to ``bench/results/pose-refinement.json`` and ``.md``.

    python bench/pose_refinement.py                       # knee, 16 views of 96 px, 600 iterations
    python bench/pose_refinement.py --phantom spine --detector 64 --views 12 --iterations 300
    python bench/pose_refinement.py --views 12 --registration  # where the error comes from (see below)

``--registration`` asks instead what limits any refinement: each perturbed view is registered on its
own (Levenberg-Marquardt on its 6 DoF, high-passed residual) to (a) the exact attenuation the scan was
simulated from, an upper bound no method reaches, and (b) a SART volume of the *other* views (leave
one out, so the view cannot bend the volume to its wrong pose), started both at the perturbed and at
the true pose: how far (b) moves away from the truth is the bias of a volume reconstructed from the
sparse views themselves. Results go to ``pose-registration{tag}.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ixgs.geometry import Grid, normalize_projection_matrix, view_rays
from ixgs.metrics import evaluate
from ixgs.phantom import default_roi, hu_to_attenuation, make_phantom
from ixgs.poses import PoseCorrections, projection_displacement_px, transform_rays
from ixgs.projector import forward_project
from ixgs.reconstruct import ReconstructionSettings, _sart_grid, reconstruct, reconstruction_grid
from ixgs.sart import sart_reconstruct
from ixgs.scan import Scan, read_scan
from ixgs.simulate import simulate_scan
from ixgs.volume import Volume

RESULTS = Path(__file__).resolve().parent / "results"


def perturbation(n_views: int, center, degrees: float, mm: float, seed: int) -> PoseCorrections:
    """Zero-mean rigid motions: each ``degrees`` about a random axis and ``mm`` along a random direction."""
    rng = np.random.default_rng(seed)
    poses = PoseCorrections(n_views, center, lever_mm=1.0)
    axes = rng.normal(size=(n_views, 3))
    shifts = rng.normal(size=(n_views, 3))
    with torch.no_grad():
        for values, axis, shift in zip(poses.per_view, axes, shifts):
            values.copy_(torch.tensor([*(axis / np.linalg.norm(axis) * math.radians(degrees)),
                                       *(shift / np.linalg.norm(shift) * mm)], dtype=torch.float32))
    poses.remove_common_motion()
    return poses


def perturbed_scan(scan: Scan, truth: PoseCorrections) -> Scan:
    """The scan as a C-arm with these pose errors reports it: ``P T^-1``, so that ``T`` corrects it."""
    views = [dataclasses.replace(view, projection_matrix=view.projection_matrix @ np.linalg.inv(
        truth.matrix(index).detach().double().numpy())) for index, view in enumerate(scan.views)]
    return dataclasses.replace(scan, views=views)


def roi_points(scan: Scan) -> np.ndarray:
    """The ROI's corners, edge and face midpoints and centre (27 points)."""
    offsets = np.stack(np.meshgrid([-1, 0, 1], [-1, 0, 1], [-1, 0, 1], indexing="ij"), -1).reshape(-1, 3)
    return np.asarray(scan.roi.center) + 0.5 * np.asarray(scan.roi.size) * offsets


def pose_errors(scan: Scan, matrices: list[np.ndarray]) -> dict:
    """Mean projection displacement (px) of the ROI points and mean rotation error (degrees)."""
    points = roi_points(scan)
    displacement = [projection_displacement_px(view.projection_matrix, matrix, points)
                    for view, matrix in zip(scan.views, matrices)]
    angles = []
    for view, matrix in zip(scan.views, matrices):
        # Both are P_reported T for rigid T, so M_true^-1 M is the rotation between them.
        relative = np.linalg.solve(view.projection_matrix[:, :3], matrix[:, :3])
        angles.append(math.degrees(math.acos(np.clip((np.trace(relative) - 1) / 2, -1.0, 1.0))))
    return {"projection_displacement_px": round(float(np.mean(displacement)), 3),
            "rotation_deg": round(float(np.mean(angles)), 3)}


def high_pass(image: torch.Tensor, sigma_px: float = 3.0) -> torch.Tensor:
    """``image`` minus its Gaussian blur, the outer eighth of each side dropped: edges, not the
    low-frequency offsets a truncated or sparse-view volume gets wrong."""
    radius = int(3 * sigma_px)
    kernel = torch.exp(-0.5 * (torch.arange(-radius, radius + 1.0) / sigma_px) ** 2)
    kernel = kernel / kernel.sum()
    padded = torch.nn.functional.pad(image[None, None], (radius,) * 4, mode="replicate")
    blurred = torch.nn.functional.conv2d(torch.nn.functional.conv2d(padded, kernel[None, None, None]),
                                         kernel[None, None, :, None])[0, 0]
    margin = image.shape[0] // 8
    return (image - blurred)[margin:-margin, margin:-margin]


def register_view(volume: torch.Tensor, grid: Grid, image: np.ndarray, projection_matrix: np.ndarray,
                  center, lever_mm: float, steps: int = 8, step_mm: float = 0.05) -> np.ndarray:
    """``projection_matrix`` corrected by the rigid motion (about ``center``) that best fits ``image``
    to the volume's projection: Levenberg-Marquardt with a finite-difference Jacobian."""
    image = torch.as_tensor(image, dtype=torch.float32)
    rays = view_rays(normalize_projection_matrix(projection_matrix, np.asarray(center)), image.shape)
    pose = PoseCorrections(1, center, lever_mm)

    def residual(values: torch.Tensor) -> torch.Tensor:
        pose.per_view[0].copy_(values)
        return high_pass(forward_project(volume, grid, transform_rays(rays, pose.matrix(0))) - image).reshape(-1).double()

    with torch.no_grad():
        current = torch.zeros(6)
        r = residual(current)
        cost, damping = float(r @ r), 1e-3
        for _ in range(steps):
            jacobian = torch.stack([(residual(current + step_mm * torch.eye(6)[k]) - r) / step_mm for k in range(6)], 1)
            normal, gradient = jacobian.T @ jacobian, jacobian.T @ r
            while damping < 1e6:
                candidate = current - torch.linalg.solve(normal + damping * torch.diag(normal.diagonal()), gradient).float()
                r_new = residual(candidate)
                if float(r_new @ r_new) < cost:
                    current, r, cost, damping = candidate, r_new, float(r_new @ r_new), damping * 0.3
                    break
                damping *= 10.0
            else:
                break
        pose.per_view[0].copy_(current)
    return pose.corrected_matrix(0, projection_matrix)


def registration_bounds(args, phantom, scan: Scan, perturbed: Scan) -> None:
    """The ``--registration`` diagnostic (see the module docstring)."""
    center, lever = scan.roi.center, max(scan.roi.size) / 2
    exact = hu_to_attenuation(torch.as_tensor(np.asarray(phantom.array, dtype=np.float32)))
    settings = ReconstructionSettings(voxel_size_mm=args.voxel_size)
    sart_grid = _sart_grid(scan, reconstruction_grid(scan, settings), settings.sart_factor)  # the engine's SART grid
    rows, estimates = {}, {"exact volume": [], "leave-one-out SART, from perturbed": [],
                           "leave-one-out SART, from true": []}
    started = time.perf_counter()
    for index, view in enumerate(perturbed.views):
        estimates["exact volume"].append(register_view(exact, phantom.grid, view.image, view.projection_matrix,
                                                       center, lever))
        others = [(other.image, other.projection_matrix) for j, other in enumerate(perturbed.views) if j != index]
        volume = sart_reconstruct(others, sart_grid, args.sart_iterations)
        estimates["leave-one-out SART, from perturbed"].append(
            register_view(volume, sart_grid, view.image, view.projection_matrix, center, lever))
        estimates["leave-one-out SART, from true"].append(
            register_view(volume, sart_grid, view.image, scan.views[index].projection_matrix, center, lever))
        print(f"view {index}: {time.perf_counter() - started:.0f} s", flush=True)
    rows["perturbed (start)"] = pose_errors(scan, [view.projection_matrix for view in perturbed.views])
    rows.update({name: pose_errors(scan, matrices) for name, matrices in estimates.items()})
    record = {"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "settings": vars(args),
              "sart_grid": list(sart_grid.shape), "runs": rows, "seconds": round(time.perf_counter() - started, 1)}
    stem = RESULTS / f"pose-registration{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1))
    lines = [f"# Single-view registration bounds ({record['date']}, {record['threads']} CPU threads)", "",
             f"{args.phantom}, {args.views} views of {args.detector} px (detector {args.field_of_view} x the ROI); "
             f"each view perturbed by {args.degrees} deg and {args.mm} mm (zero mean) and registered on its own; "
             f"SART: {args.sart_iterations} iterations of the other views on {sart_grid.shape} voxels of "
             f"{max(sart_grid.spacing):.2f} mm.", "",
             "| reference volume | pose error px | rotation error deg |", "|---|---|---|"]
    lines += [f"| {name} | {row['projection_displacement_px']} | {row['rotation_deg']} |" for name, row in rows.items()]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phantom", default="knee", choices=("knee", "spine"))
    parser.add_argument("--views", type=int, default=16)
    parser.add_argument("--detector", type=int, default=96)
    parser.add_argument("--field-of-view", type=float, default=1.2, help="detector side / ROI side")
    parser.add_argument("--voxel-size", type=float, default=2.5)
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--gaussians", type=int, default=6000)
    parser.add_argument("--degrees", type=float, default=2.0)
    parser.add_argument("--mm", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--tag", default="", help="suffix for the result files")
    parser.add_argument("--registration", action="store_true", help="run the registration diagnostic instead")
    parser.add_argument("--sart-iterations", type=int, default=5, help="for --registration")
    args = parser.parse_args()
    phantom = make_phantom(args.phantom, seed=args.seed, voxel_size_mm=2.0)
    with tempfile.TemporaryDirectory() as work:
        path = simulate_scan(phantom, Path(work) / "scan",
                             n_views=args.views, detector_px=args.detector, seed=args.seed,
                             roi=default_roi(args.phantom), field_of_view_factor=args.field_of_view)
        scan = read_scan(path)
        reference = Volume.read(scan.reference_volume)
    truth = perturbation(len(scan.views), scan.roi.center, args.degrees, args.mm, args.seed)
    perturbed = perturbed_scan(scan, truth)
    RESULTS.mkdir(exist_ok=True)
    if args.registration:
        registration_bounds(args, phantom, scan, perturbed)
        return
    rows = {}
    for name, data, refine in (("true poses", scan, False), ("perturbed", perturbed, False),
                               ("perturbed, refined", perturbed, True)):
        settings = ReconstructionSettings(preset="fast", iterations=args.iterations, gaussians=args.gaussians,
                                          voxel_size_mm=args.voxel_size, device="cpu", seed=0, refine_poses=refine,
                                          stop_on_plateau=False)
        started = time.perf_counter()
        result = reconstruct(data, settings)
        matrices = ([np.array(row["projection_matrix"]) for row in result.pose_corrections] if refine
                    else [view.projection_matrix for view in data.views])
        rows[name] = {"psnr": round(evaluate(result.volume, reference)["psnr"], 2),
                      "reprojection_psnr": round(result.reprojection_psnr, 2),
                      "seconds": round(time.perf_counter() - started, 1), **pose_errors(scan, matrices)}
        print(name, rows[name], flush=True)
    before = rows["perturbed"]["projection_displacement_px"]
    after = rows["perturbed, refined"]["projection_displacement_px"]
    record = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "settings": vars(args), "runs": rows,
              "pose_error_reduction": round(1.0 - after / before, 3) if before > 0 else None}
    stem = RESULTS / f"pose-refinement{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1))
    lines = [f"# Pose refinement ({record['date']}, {record['threads']} CPU threads)", "",
             f"{args.phantom}, {args.views} views of {args.detector} px (detector {args.field_of_view} x the ROI), "
             f"{args.voxel_size} mm voxels, {args.iterations} iterations, {args.gaussians} initial Gaussians; "
             f"each view perturbed by {args.degrees} deg and {args.mm} mm (zero mean).", "",
             "| run | 3D PSNR dB | re-projection PSNR dB | pose error px | rotation error deg | time s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {row['psnr']} | {row['reprojection_psnr']} | {row['projection_displacement_px']} | "
              f"{row['rotation_deg']} | {row['seconds']} |" for name, row in rows.items()]
    lines += ["", f"Pose error reduction: {100 * record['pose_error_reduction']:.0f} % (target: 70 %)."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
