"""Benchmark: Gaussian reconstruction against SART on simulated C-arm scans of the phantoms.

For each phantom (spine, knee) and view count (10, 20, 30): simulate a 128 x 128 px scan (truncated,
as intraoperative views are), reconstruct the 110 mm ROI on a 128^3 grid with the Gaussians under a
wall-time budget, then with SART given the same wall time, and record 3D PSNR, SSIM, bone Dice,
wall time and peak memory (each run is a separate ``ixgs reconstruct`` process, so the peak memory
its report gives is its own). Results go to ``bench/results/reconstruction-<device>.json`` and ``.md``.

    python bench/reconstruction.py                      # everything (about 40 minutes on 2 cores)
    python bench/reconstruction.py --phantoms knee --views 20 --budget 120
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def run_reconstruction(scan: Path, out: Path, extra: list[str]) -> dict:
    """One ``ixgs reconstruct`` in its own process: its report, wall time and peak memory (MiB)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ixgs", "reconstruct", str(scan), "-o", str(out), "--progress", "none",
                    *extra], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    report = json.loads((out / "report.json").read_text())
    return {
        "wall_s": round(wall, 1),
        "engine_s": round(report["elapsed_s"], 1),
        "peak_memory_mib": max(report["peak_memory_mib"].values()),
        "psnr": round(report["metrics"]["psnr"], 2),
        "ssim": round(report["metrics"]["ssim"], 3),
        "dice": round(report["metrics"]["dice"], 3),
        "reprojection_psnr": round(report["reprojection_psnr"], 2),
        "stop_reason": report["stop_reason"],
        "gaussians": report["gaussians"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phantoms", nargs="+", default=["spine", "knee"])
    parser.add_argument("--views", nargs="+", type=int, default=[10, 20, 30])
    parser.add_argument("--detector", type=int, default=128)
    parser.add_argument("--budget", type=float, default=170.0, help="wall-time budget of the Gaussian runs, s")
    parser.add_argument("--init", default="random", choices=("random", "sart"))
    parser.add_argument("--preset", default="standard", choices=("fast", "standard", "high"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--tag", default="", help="suffix for the result files")
    args = parser.parse_args()

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'cpu'} " \
        f"x{torch.get_num_threads()} threads"
    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for phantom in args.phantoms:
            for views in args.views:
                scan = work / f"{phantom}-{views}"
                subprocess.run([sys.executable, "-m", "ixgs", "simulate", "--phantom", phantom, "--views", str(views),
                                "--detector", str(args.detector), "--seed", str(args.seed), "--progress", "none",
                                "-o", str(scan)], check=True, stdout=subprocess.DEVNULL)
                common = ["--device", args.device, "--seed", str(args.seed)]
                gaussian = run_reconstruction(scan, work / f"{scan.name}-gaussian", common + [
                    "--method", "gaussian", "--init", args.init, "--preset", args.preset,
                    "--time-budget", str(args.budget)])
                sart = run_reconstruction(scan, work / f"{scan.name}-sart", common + [
                    "--method", "sart", "--iterations", "1000", "--time-budget", str(gaussian["engine_s"])])
                row = {"phantom": phantom, "views": views, "gaussian": gaussian, "sart": sart,
                       "psnr_gain_db": round(gaussian["psnr"] - sart["psnr"], 2)}
                rows.append(row)
                print(json.dumps(row), flush=True)

    record = {"date": time.strftime("%Y-%m-%d"), "device": device_name, "torch": torch.__version__,
              "detector_px": args.detector, "grid": "128^3 over a 110 mm ROI", "budget_s": args.budget,
              "init": args.init, "preset": args.preset, "seed": args.seed, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    stem = f"reconstruction-{args.device}{args.tag}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(record, indent=1))
    (RESULTS / f"{stem}.md").write_text(markdown_table(record))
    print(markdown_table(record))


def markdown_table(record: dict) -> str:
    lines = [f"Reconstruction benchmark, {record['date']}, {record['device']}, torch {record['torch']}, "
             f"{record['detector_px']} px views to {record['grid']}, Gaussian budget {record['budget_s']} s "
             f"(preset {record['preset']}, init {record['init']}), SART given the Gaussians' time.", "",
             "| phantom | views | Gaussian PSNR / SSIM / Dice | time s | peak MiB | SART PSNR / SSIM / Dice | "
             "time s | peak MiB | PSNR gain dB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in record["rows"]:
        g, s = row["gaussian"], row["sart"]
        lines.append(f"| {row['phantom']} | {row['views']} | {g['psnr']} / {g['ssim']} / {g['dice']} | {g['wall_s']} | "
                     f"{g['peak_memory_mib']:.0f} | {s['psnr']} / {s['ssim']} / {s['dice']} | {s['wall_s']} | "
                     f"{s['peak_memory_mib']:.0f} | {row['psnr_gain_db']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
