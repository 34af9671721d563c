"""Quality diagnosis: what costs the Gaussians' 3D PSNR, factor by factor, against SART and SART+TV.

Every case is simulated without inverse crime (``ixgs simulate --model analytic``: exact line
integrals of an ellipsoid/cylinder phantom, 3x3 sub-rays a pixel; the reference is each voxel's
exact mean attenuation on the output grid) and reconstructed three ways at equal wall time:
the Gaussians' default run under ``--budget`` seconds, SART (``--method sart``, as many passes as
that time allows) and SART+TV (``ixgs.sart.sart_reconstruct(tv_weight=...)`` on SART's grid).
Scores: 3D PSNR / SSIM / bone Dice against the reference (:func:`ixgs.metrics.evaluate`).

The factors (case names ``phantom-views-arc-field-noise``):

* arc ``180`` (primary -90..90 degrees) or ``120`` (-60..60, LAO/RAO);
* field ``truncated`` (the detector sees 1.6x the ROI of a whole body), ``untruncated`` (the phantom
  cropped to the ROI, ``--crop 1 --field-of-view object``) or ``oracle`` (the phantom cropped to
  the Gaussians' support, 1.2x the ROI: the views an exact, fixed model of the outside would leave);
* noise ``clean`` or ``noisy`` (``--transmission``: Poisson counts, i0 = 1e4).

``--ceiling N ...`` fits N Gaussians directly to the reference in 3D (Adam on the voxelized model
against the reference, the engine's warm start from the reference itself): what PSNR can the
model hold at all?

Each case prints its ``ixgs simulate`` command; results go to
``bench/results/quality-<tag>.json`` / ``.md``, and cases already there are skipped (rerun after
a fix with a new ``--tag``, or delete a case to redo it).

    python bench/quality.py --cases spine-20-180-truncated-clean knee-20-120-truncated-clean --budget 90
    python bench/quality.py --ceiling 15000 30000 --ceiling-phantom spine
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
ARCS = {"180": (-90.0, 90.0), "120": (-60.0, 60.0)}
FIELDS = ("truncated", "untruncated", "oracle")
NOISES = ("clean", "noisy")
SART_TV_WEIGHT = 0.2  # Sidky's alpha: TV step length / SART pass change
SART_TV_STEPS = 10
DEFAULT_CASES = [  # the reduced set recorded on a shared 2-core CPU
    "spine-20-180-truncated-clean", "spine-20-120-truncated-clean",
    "knee-20-180-truncated-clean", "knee-20-120-truncated-clean",
    "spine-20-120-untruncated-clean", "spine-20-180-untruncated-clean",
    "spine-20-120-truncated-noisy", "spine-20-120-oracle-clean",
]


def parse_case(name: str) -> dict:
    try:
        phantom, views, arc, field, noise = name.split("-")
        case = {"phantom": phantom, "views": int(views), "arc": arc, "field": field, "noise": noise}
    except ValueError:
        raise SystemExit(f"bad case name {name!r}: want phantom-views-arc-field-noise, e.g. spine-20-120-truncated-clean")
    if phantom not in ("spine", "knee") or arc not in ARCS or field not in FIELDS or noise not in NOISES:
        raise SystemExit(f"bad case name {name!r}: phantom spine|knee, arc {'|'.join(ARCS)}, field "
                         f"{'|'.join(FIELDS)}, noise {'|'.join(NOISES)}")
    return case


def simulate_command(case: dict, out: Path, detector: int, seed: int) -> list[str]:
    """The ``ixgs simulate`` command line of a case."""
    from ixgs.reconstruct import ReconstructionSettings

    args = ["ixgs", "simulate", "--phantom", case["phantom"], "--views", str(case["views"]), "--detector",
            str(detector), "--seed", str(seed), "--primary-range", *map(str, ARCS[case["arc"]])]
    if case["field"] == "untruncated":
        args += ["--crop", "1", "--field-of-view", "object"]
    elif case["field"] == "oracle":
        args += ["--crop", str(ReconstructionSettings().support_factor)]
    if case["noise"] == "noisy":
        args.append("--transmission")
    return args + ["-o", str(out)]


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def run_reconstruct(scan: Path, out: Path, extra: list[str]) -> dict:
    """One ``ixgs reconstruct`` process: its scores (the report's, against the scan's reference)."""
    command = ["ixgs", "reconstruct", str(scan), "-o", str(out), "--progress", "none", *extra]
    load_before, started = load(), time.perf_counter()
    subprocess.run([sys.executable, "-m", "ixgs", *command[1:]], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    report = json.loads((out / "report.json").read_text())
    return {"command": shlex.join(command), "wall_s": round(wall, 1), "engine_s": round(report["elapsed_s"], 1),
            **scores(report["metrics"]), "reprojection_psnr": round(report["reprojection_psnr"], 2),
            "stop_reason": report["stop_reason"], "gaussians": report["gaussians"],
            "load_before": load_before, "load_after": load()}


def scores(metrics: dict) -> dict:
    return {"psnr": round(metrics["psnr"], 2), "ssim": round(metrics["ssim"], 3), "dice": round(metrics["dice"], 3)}


def run_sart_tv(scan_path: Path, budget_s: float, seed: int) -> dict:
    """SART+TV on the engine's SART grid, for ``budget_s`` seconds, sampled onto the output grid."""
    from ixgs.metrics import evaluate
    from ixgs.projector import sample_volume
    from ixgs.reconstruct import ReconstructionSettings, _binned_views, _sart_grid, reconstruction_grid
    from ixgs.sart import sart_reconstruct
    from ixgs.scan import read_scan
    from ixgs.volume import Volume

    load_before, started = load(), time.perf_counter()
    scan = read_scan(scan_path)
    settings = ReconstructionSettings(method="sart", seed=seed)
    grid = reconstruction_grid(scan, settings)
    sart_grid = _sart_grid(scan, grid, settings.sart_factor)
    passes = []
    values = sart_reconstruct(_binned_views(scan, 1), sart_grid, 1000, time_budget_s=budget_s, seed=seed,
                              tv_weight=SART_TV_WEIGHT, tv_steps=SART_TV_STEPS,
                              progress=lambda i, n, residual: passes.append(i))
    centers = torch.as_tensor(grid.voxel_centers(), dtype=values.dtype)
    with torch.no_grad():
        volume = Volume.on_grid(sample_volume(values, sart_grid, centers).numpy(), grid)
    wall = time.perf_counter() - started
    return {"call": f"sart_reconstruct(..., tv_weight={SART_TV_WEIGHT}, tv_steps={SART_TV_STEPS}, "
                    f"time_budget_s={budget_s:.1f})", "wall_s": round(wall, 1),
            "passes": len(passes), **scores(evaluate(volume, scan.reference)),
            "load_before": load_before, "load_after": load()}


def run_case(name: str, args, work: Path) -> dict:
    case = parse_case(name)
    scan = work / name
    command = simulate_command(case, scan, args.detector, args.seed)
    print(f"[{name}] {shlex.join(command)}", flush=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ixgs", *command[1:], "--progress", "none"], check=True,
                   stdout=subprocess.DEVNULL)
    row = {**case, "simulate": shlex.join(command), "simulate_s": round(time.perf_counter() - started, 1)}
    row["gaussian"] = run_reconstruct(scan, work / f"{name}-gaussian", ["--time-budget", str(args.budget),
                                                                         "--seed", str(args.seed)])
    equal = row["gaussian"]["engine_s"]
    row["sart"] = run_reconstruct(scan, work / f"{name}-sart", ["--method", "sart", "--iterations", "1000",
                                                                 "--time-budget", str(equal), "--seed", str(args.seed)])
    row["sart_tv"] = run_sart_tv(scan, equal, args.seed)
    row["gain_over_sart_db"] = round(row["gaussian"]["psnr"] - row["sart"]["psnr"], 2)
    row["gain_over_sart_tv_db"] = round(row["gaussian"]["psnr"] - row["sart_tv"]["psnr"], 2)
    return row


def fit_ceiling(phantom_name: str, n: int, seconds: float, seed: int) -> dict:
    """N Gaussians fitted to the exact reference in 3D: Adam on MSE(voxelize(model), reference) over
    random 32^3 blocks (as the trainer's TV does), scored on the whole volume."""
    from ixgs.analytic import make_analytic_phantom
    from ixgs.gaussians import GaussianModel
    from ixgs.metrics import evaluate
    from ixgs.phantom import default_roi
    from ixgs.reconstruct import _GaussianTrainer
    from ixgs.volume import Volume
    from ixgs.voxelize import voxelize

    load_before, started = load(), time.perf_counter()
    roi = default_roi(phantom_name)
    grid = roi.grid(max(roi.size) / 128)
    reference = make_analytic_phantom(phantom_name, seed=seed).reference(grid)
    target = torch.as_tensor(reference.array)
    generator = torch.Generator().manual_seed(seed)
    model = GaussianModel.from_volume(target, grid, n, generator, support=roi)
    optimizer = torch.optim.Adam(model.parameter_groups(_GaussianTrainer.LEARNING_RATES), eps=1e-15)
    block, steps, curve = 32, 0, []
    while time.perf_counter() - started < seconds:
        corner = [int(torch.randint(0, s - block + 1, (1,), generator=generator)) for s in grid.shape]
        region = tuple(slice(c, c + block) for c in corner)
        loss = (voxelize(model, grid, region=region) - target[region]).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
        if steps % 50 == 0:
            curve.append((steps, round(float(loss), 9)))
    with torch.no_grad():
        fitted = Volume.on_grid(voxelize(model, grid).numpy(), grid)
        start_scores = evaluate(Volume.on_grid(voxelize(GaussianModel.from_volume(
            target, grid, n, torch.Generator().manual_seed(seed), support=roi), grid).numpy(), grid), reference)
    return {"phantom": phantom_name, "gaussians": n, "steps": steps, "wall_s": round(time.perf_counter() - started, 1),
            "start": scores(start_scores), **scores(evaluate(fitted, reference)), "loss_curve": curve,
            "load_before": load_before, "load_after": load()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=None, help=f"case names (default: {' '.join(DEFAULT_CASES)})")
    parser.add_argument("--budget", type=float, default=90.0, help="Gaussian wall-time budget, s (SART gets the same)")
    parser.add_argument("--detector", type=int, default=128)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--ceiling", nargs="*", type=int, default=[], metavar="N", help="Gaussians to fit in 3D")
    parser.add_argument("--ceiling-phantom", default="spine", choices=("spine", "knee"))
    parser.add_argument("--ceiling-seconds", type=float, default=240.0)
    parser.add_argument("--tag", default="baseline", help="result files: quality-<tag>.json / .md")
    args = parser.parse_args()

    path = RESULTS / f"quality-{args.tag}.json"
    record = json.loads(path.read_text()) if path.exists() else {
        "device": f"{platform.processor() or 'cpu'} x{torch.get_num_threads()} threads", "torch": torch.__version__,
        "detector_px": args.detector, "grid": "128^3 over the 110 mm ROI", "seed": args.seed, "budget_s": args.budget,
        "sart_tv": {"tv_weight": SART_TV_WEIGHT, "tv_steps": SART_TV_STEPS}, "cases": {}, "ceiling": {}}

    def save() -> None:
        RESULTS.mkdir(exist_ok=True)
        path.write_text(json.dumps(record, indent=1))
        path.with_suffix(".md").write_text(markdown(record))

    cases = DEFAULT_CASES if args.cases is None else args.cases
    for name in cases:
        parse_case(name)
    with tempfile.TemporaryDirectory() as work:
        for name in cases:
            if name in record["cases"]:
                print(f"[{name}] already recorded, skipped", flush=True)
                continue
            row = run_case(name, args, Path(work))
            row["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            record["cases"][name] = row
            save()
            print(json.dumps({k: row[k] for k in ("gain_over_sart_db", "gain_over_sart_tv_db")}), flush=True)
    for n in args.ceiling:
        key = f"{args.ceiling_phantom}-{n}"
        if key in record["ceiling"]:
            print(f"[ceiling {key}] already recorded, skipped", flush=True)
            continue
        print(f"[ceiling {key}] fitting for {args.ceiling_seconds} s", flush=True)
        record["ceiling"][key] = {**fit_ceiling(args.ceiling_phantom, n, args.ceiling_seconds, args.seed),
                                  "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        save()
    save()
    print(markdown(record))


def markdown(record: dict) -> str:
    lines = [f"Quality diagnosis, {record['device']}, torch {record['torch']}, {record['detector_px']} px views to "
             f"{record['grid']}, analytic phantoms (no inverse crime), seed {record['seed']}. Gaussians: default "
             f"run, --time-budget {record['budget_s']} s; SART and SART+TV (alpha {record['sart_tv']['tv_weight']}, "
             f"{record['sart_tv']['tv_steps']} TV steps a pass) given the Gaussians' wall time. Load: 1-minute load "
             "average before/after the Gaussian run (2 cores shared with other work).", "",
             "| case | Gaussian PSNR / SSIM / Dice | wall s | SART PSNR / SSIM / Dice | SART+TV PSNR / SSIM / Dice "
             "| G - SART dB | G - SART+TV dB | load |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in record["cases"].items():
        g, s, t = row["gaussian"], row["sart"], row["sart_tv"]
        lines.append(f"| {name} | {g['psnr']} / {g['ssim']} / {g['dice']} | {g['wall_s']} | {s['psnr']} / {s['ssim']} / "
                     f"{s['dice']} | {t['psnr']} / {t['ssim']} / {t['dice']} | {row['gain_over_sart_db']} | "
                     f"{row['gain_over_sart_tv_db']} | {g['load_before'][0]}/{g['load_after'][0]} |")
    if record["ceiling"]:
        lines += ["", "Representational ceiling: N Gaussians fitted to the reference in 3D (warm start from the "
                  "reference, then Adam on random 32^3 blocks).", "",
                  "| phantom | Gaussians | steps | wall s | start PSNR / SSIM / Dice | fitted PSNR / SSIM / Dice |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for row in record["ceiling"].values():
            st = row["start"]
            lines.append(f"| {row['phantom']} | {row['gaussians']} | {row['steps']} | {row['wall_s']} | {st['psnr']} / "
                         f"{st['ssim']} / {st['dice']} | {row['psnr']} / {row['ssim']} / {row['dice']} |")
    lines += ["", "Commands (simulate; reconstruct with `--method sart --iterations 1000 --time-budget <Gaussian wall s>`):", ""]
    lines += [f"    {row['simulate']}" for row in record["cases"].values()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
