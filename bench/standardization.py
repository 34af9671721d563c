"""Ablation: does standardization help the reconstruction of realistic C-arm scans?

For held-out phantoms (seeds below the training range: spine and knee), 20 views from one random
realistic C-arm each (:mod:`ixgs.standardize.realism`), in two flavours: raw transmission (flat
field + -log by the scan reader) and C-arm display images. Each scan is reconstructed (SART, and
optionally the Gaussian method with a short budget) from its raw, classical and pix2pix views, and,
as bounds, from the exact bone-enhanced targets and from the clean monochromatic line integrals.

Reported: 2D SSIM/PSNR of every view to its target (as is, and after the best affine intensity fit
per view, which credits structure without scale), and 3D PSNR/SSIM/Dice of each reconstruction
against both the plain attenuation (the CT at 60 keV) and the bone-enhanced attenuation that the
target defines (what standardized views reconstruct to).

    python bench/standardization.py [--quick] [--gaussian-budget 60] [--weights FILE]

Writes ``bench/results/standardization.json`` and ``standardization.md``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ixgs.geometry import binning_matrix
from ixgs.metrics import evaluate, psnr, ssim
from ixgs.phantom import MU_WATER_PER_MM, default_roi, hu_to_attenuation, make_phantom
from ixgs.reconstruct import ReconstructionSettings, _binned, reconstruct
from ixgs.scan import Scan, View, read_scan, write_scan
from ixgs.simulate import reference_volume
from ixgs.standardize.classical import standardize_scan
from ixgs.standardize.pix2pix import standardize_scan_pix2pix
from ixgs.standardize.realism import random_realism, scan_geometry, write_realistic_scan
from ixgs.standardize.target import MU_BONE_PER_MM, target_attenuation, target_from_path_lengths
from ixgs.volume import Volume

RESULTS = Path(__file__).resolve().parent / "results"
PHANTOM_SEED = 7  # below the training seeds (>= 1000)


def affine_fit(image: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``a * image + b`` closest to the target in least squares (scale-free comparison)."""
    design = np.stack([image.ravel(), np.ones(image.size)], axis=1).astype(np.float64)
    coefficients, *_ = np.linalg.lstsq(design, target.ravel().astype(np.float64), rcond=None)
    return (design @ coefficients).reshape(image.shape)


def view_metrics(images: list[np.ndarray], targets: list[np.ndarray]) -> dict:
    rows = [(ssim(i, t), psnr(i, t), ssim(affine_fit(i, t), t), psnr(affine_fit(i, t), t))
            for i, t in zip(images, targets)]
    means = np.mean(rows, axis=0)
    return {"ssim": means[0], "psnr": means[1], "ssim_fit": means[2], "psnr_fit": means[3]}


def volume_metrics(volume: Volume, plain: Volume, enhanced: Volume) -> dict:
    a, b = evaluate(volume, plain), evaluate(volume, enhanced)
    return {"psnr_plain": a["psnr"], "ssim_plain": a["ssim"], "dice_plain": a["dice"],
            "psnr_enhanced": b["psnr"], "ssim_enhanced": b["ssim"], "dice_enhanced": b["dice"]}


def binned_scan(scan: Scan, factor: int) -> Scan:
    """The scan at 1/factor resolution (mean of pixel blocks, exact pixel-centre geometry): the
    reconstruction is the same for every method, so it runs on cheaper views."""
    views = [View(_binned(v.image, factor).astype(np.float32), binning_matrix(factor) @ v.projection_matrix, v.name)
             for v in scan.views]
    return Scan(views=views, roi=scan.roi, reference_volume=scan.reference_volume, path=scan.path)


def reconstruct_all(scan_path: Path, targets, plain, enhanced, methods, bin_factor: int) -> dict:
    scan = read_scan(scan_path)
    entry = {"views_2d": view_metrics([v.image for v in scan.views], targets)}
    for method, extra in methods:
        t0 = time.perf_counter()
        result = reconstruct(binned_scan(scan, bin_factor), ReconstructionSettings(method=method, device="cpu", **extra))
        entry[method] = {**volume_metrics(result.volume, plain, enhanced), "seconds": round(time.perf_counter() - t0, 1)}
    return entry


def run_phantom(name: str, flavours: list[str], work: Path, weights, methods, bin_factor: int) -> list[dict]:
    """One held-out phantom: the exact-target and clean bounds once, then raw / classical / pix2pix per flavour."""
    ct = make_phantom(name, seed=PHANTOM_SEED, voxel_size_mm=1.5)
    started = time.perf_counter()
    geometry = scan_geometry(ct, n_views=20, detector_px=128, seed=PHANTOM_SEED, roi=default_roi(name))
    simulate_s = round(time.perf_counter() - started, 1)
    targets = [target_from_path_lengths(w, b) for w, b in zip(geometry.water_mm, geometry.bone_mm)]
    clean = [MU_WATER_PER_MM * w + MU_BONE_PER_MM * b for w, b in zip(geometry.water_mm, geometry.bone_mm)]
    plain = reference_volume(hu_to_attenuation(torch.as_tensor(ct.array)), ct.grid, geometry.roi, 1.5)
    enhanced = reference_volume(torch.as_tensor(target_attenuation(ct.array)), ct.grid, geometry.roi, 1.5)
    matrices, roi = geometry.projection_matrices, geometry.roi
    bounds = {"oracle_target": write_scan(work / f"{name}-target", targets, matrices, roi=roi),
              "clean_monochromatic": write_scan(work / f"{name}-clean", clean, matrices, roi=roi)}
    case = {"phantom": name, "phantom_seed": PHANTOM_SEED, "flavour": "exact", "geometry_s": simulate_s, "methods": {}}
    for label, path in bounds.items():
        case["methods"][label] = reconstruct_all(path, targets, plain, enhanced, methods, bin_factor)
        print(name, label, json.dumps(case["methods"][label], default=float), flush=True)
    cases = [case]
    rng = np.random.default_rng(PHANTOM_SEED + (0 if name == "spine" else 1))
    for flavour in flavours:
        realism = random_realism(rng, display_probability=1.0 if flavour == "display" else 0.0)
        raw = write_realistic_scan(work / f"{name}-{flavour}-raw", geometry, realism, seed=PHANTOM_SEED)
        scans = {"raw": raw,
                 "classical": standardize_scan(raw, work / f"{name}-{flavour}-classical"),
                 "pix2pix": standardize_scan_pix2pix(raw, work / f"{name}-{flavour}-pix2pix", weights)}
        case = {"phantom": name, "phantom_seed": PHANTOM_SEED, "flavour": flavour, "realism": realism.to_dict(),
                "methods": {}}
        for label, path in scans.items():
            case["methods"][label] = reconstruct_all(path, targets, plain, enhanced, methods, bin_factor)
            print(name, flavour, label, json.dumps(case["methods"][label], default=float), flush=True)
        cases.append(case)
    return cases


def finite_or_none(value):
    """Standard JSON: numpy numbers as floats, inf/NaN (PSNR of exact targets) as null."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value


def markdown(results: dict) -> str:
    lines = [f"# Standardization ablation ({results['date']})", "",
             f"Phantoms seed {PHANTOM_SEED} (not in training), 20 views of 128 x 128, one random realistic C-arm per scan; "
             f"reconstruction settings: {json.dumps(results['reconstruction'])}. Weights: `{results['weights']}`.", "",
             "2D: mean over views against the bone-enhanced target (`fit` = after the best affine intensity map per view). "
             "3D: against the plain 60 keV attenuation (`plain`) and the bone-enhanced attenuation (`enh.`).", ""]
    for method in results["reconstruction"]:
        lines += [f"## {method}", "",
                  "| case | views | 2D SSIM | 2D SSIM fit | 2D PSNR | 3D PSNR plain | 3D PSNR enh. | 3D SSIM plain | "
                  "3D SSIM enh. | Dice plain | Dice enh. | s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for case in results["cases"]:
            for label, entry in case["methods"].items():
                v, r = entry["views_2d"], entry[method]
                lines.append(f"| {case['phantom']} {case['flavour']} | {label} | {v['ssim']:.3f} | {v['ssim_fit']:.3f} | "
                             f"{v['psnr']:.1f} | {r['psnr_plain']:.2f} | {r['psnr_enhanced']:.2f} | {r['ssim_plain']:.3f} | "
                             f"{r['ssim_enhanced']:.3f} | {r['dice_plain']:.3f} | {r['dice_enhanced']:.3f} | {r['seconds']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="pix2pix weights (default: the shipped ones)")
    parser.add_argument("--sart-iterations", type=int, default=5)
    parser.add_argument("--voxel-size", type=float, default=110.0 / 48, help="mm (default: 48 voxels over the ROI)")
    parser.add_argument("--bin", type=int, default=2, help="bin views by this factor before reconstructing")
    parser.add_argument("--gaussian-budget", type=float, help="also run the Gaussian method with this many seconds")
    parser.add_argument("--quick", action="store_true", help="spine, transmission only")
    parser.add_argument("--suffix", default="", help="results file name suffix")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    methods = [("sart", {"iterations": args.sart_iterations, "voxel_size_mm": args.voxel_size})]
    if args.gaussian_budget:
        methods.append(("gaussian", {"preset": "fast", "time_budget_s": args.gaussian_budget,
                                     "voxel_size_mm": args.voxel_size}))
    phantoms = ["spine"] if args.quick else ["spine", "knee"]
    flavours = ["transmission"] if args.quick else ["transmission", "display"]
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
               "threads": 1, "weights": args.weights or "Resources/Weights/pix2pix_standardizer.pt",
               "views": "20 x 128 px, standardized at 128 px, reconstructed from 2x2-binned views",
               "reconstruction": {m: extra for m, extra in methods}, "cases": []}
    with tempfile.TemporaryDirectory() as work:
        for name in phantoms:
            results["cases"] += run_phantom(name, flavours, Path(work), args.weights, methods, args.bin)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"standardization{args.suffix}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(finite_or_none(results), indent=1))
    (RESULTS / f"{stem}.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
