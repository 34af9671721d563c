"""Benchmark: does ``--refine-poses`` recover perturbed C-arm poses, and what does it cost or gain in 3D?

A simulated scan is reconstructed three times with the Gaussians: with the true poses, with every
view's pose perturbed by a rigid motion of ``--degrees`` about a random axis through the ROI centre
and ``--mm`` along a random direction (the perturbations' mean is removed: a motion shared by all
views is a motion of the patient and cannot be seen), and with the perturbed poses refined. It records
the 3D PSNR of each and the pose error before and after refinement as the mean distance (pixels)
between where the true and the estimated matrices project the ROI's corners, edge midpoints and
centre (what matters for the reconstruction), plus the rotation error (degrees). Results go to
``bench/results/pose-refinement.json`` and ``.md``.

    python bench/pose_refinement.py                       # knee, 16 views of 96 px, 600 iterations
    python bench/pose_refinement.py --phantom spine --detector 64 --views 12 --iterations 300
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

from ixgs.metrics import evaluate
from ixgs.phantom import default_roi, make_phantom
from ixgs.poses import PoseCorrections, projection_displacement_px
from ixgs.reconstruct import ReconstructionSettings, reconstruct
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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        path = simulate_scan(make_phantom(args.phantom, seed=args.seed, voxel_size_mm=2.0), Path(work) / "scan",
                             n_views=args.views, detector_px=args.detector, seed=args.seed,
                             roi=default_roi(args.phantom), field_of_view_factor=args.field_of_view)
        scan = read_scan(path)
        reference = Volume.read(scan.reference_volume)
    truth = perturbation(len(scan.views), scan.roi.center, args.degrees, args.mm, args.seed)
    perturbed = perturbed_scan(scan, truth)
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
                      "seconds": round(time.perf_counter() - started, 1), **pose_errors(scan, matrices)}
        print(name, rows[name], flush=True)
    before = rows["perturbed"]["projection_displacement_px"]
    after = rows["perturbed, refined"]["projection_displacement_px"]
    record = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "settings": vars(args), "runs": rows,
              "pose_error_reduction": round(1.0 - after / before, 3) if before > 0 else None}
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"pose-refinement{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1))
    lines = [f"# Pose refinement ({record['date']}, {record['threads']} CPU threads)", "",
             f"{args.phantom}, {args.views} views of {args.detector} px (detector {args.field_of_view} x the ROI), "
             f"{args.voxel_size} mm voxels, {args.iterations} iterations, {args.gaussians} initial Gaussians; "
             f"each view perturbed by {args.degrees} deg and {args.mm} mm (zero mean).", "",
             "| run | 3D PSNR dB | pose error px | rotation error deg | time s |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {row['psnr']} | {row['projection_displacement_px']} | {row['rotation_deg']} | "
              f"{row['seconds']} |" for name, row in rows.items()]
    lines += ["", f"Pose error reduction: {100 * record['pose_error_reduction']:.0f} % (target: 70 %)."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
