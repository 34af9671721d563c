"""Speed benchmark: how soon the Gaussians come within 0.5 dB 3D PSNR of a long reference run.

One simulated spine scan per case, reconstructed with the Gaussians under a sweep of wall-time
budgets; each run's 3D PSNR is compared with that of a long reference run of the same method
(R2-Gaussian-like: 30,000 iterations, capped by a time budget), and with SART given the same wall
time on the same device and data. 3D PSNR is against the phantom on the ROI at 1 mm (the scan's
reference volume). Also reported: iterations per second (the loss curve's length over the engine's
time, initialisation and voxelization included), peak memory and stop reason. Every Gaussian run
asks for 30,000 iterations, so its time budget ends it and its schedule follows the budget. Each
reconstruction is its own ``ixgs reconstruct`` process (``bench/reconstruction.py``), so the peak
memory in its report is its own.

Cases (the default follows the device):

* ``cpu``: 20 views of 128 x 128 px to a 128^3 grid over the 110 mm ROI; targets: within 0.5 dB of
  the reference in under 3 minutes, peak memory under 4 GB. On 2 cores 30,000 iterations would take
  about 10 hours, so the reference is a 1200 s run (``--reference-budget``) and says so.
* ``gpu``: 30 views of 512 x 512 px (phantom at 0.5 mm) to 256^3; target: under 60 s. The reference
  is capped at 150 s: the reconstructions take about 6 minutes, but each run also writes its outputs
  (coverage map, metrics), tens of seconds at 256^3, so on a lent machine with a 10-minute limit per
  command run the reference first (``--reference-only``), then the sweep with ``--reference``.

Both: at equal wall time, 3D PSNR at least 2 dB above SART. Results go to
``bench/results/speed-<device>.json`` and ``.md`` (or ``--results``), the device named.

    python bench/speed.py --device cpu                              # about 40 minutes on 2 cores
    python bench/speed.py --device cpu --reference bench/results/speed-cpu.json   # reuse its reference
    python bench/speed.py --device cuda --reference-only --results "$OUT"   # GPU step 1: bring its JSON back
    python bench/speed.py --device cuda --reference speed-cuda-reference.json --results "$OUT"   # GPU step 2
    python bench/speed.py --quick                                   # smoke check, a few minutes, temp folder
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ixgs.kernels.choice import KERNELS
from ixgs.phantom import default_roi, make_phantom
from ixgs.reconstruct import INITS, PRESETS, ReconstructionSettings, resolve_device
from ixgs.simulate import simulate_scan
from reconstruction import RESULTS, run_reconstruction  # bench/reconstruction.py, beside this script

R2GAUSSIAN_ITERATIONS = 30_000
WITHIN_DB = 0.5  # "reached the reference": 3D PSNR at most this far below it
SART_GAIN_TARGET_DB = 2.0
SART_PASSES = 1000  # SART's iteration cap; its time budget (the Gaussians' time) ends it first


@dataclass(frozen=True)
class Case:
    """A benchmark configuration: the data, the grid, the budgets and the targets."""

    name: str
    phantom: str
    views: int
    detector_px: int
    grid_size: int  # voxels along the ROI's longest side
    # The phantom's voxel: fine enough for the views' pixels (the 3D PSNR is scored on simulate_scan's
    # reference volume, the ROI at 1 mm however fine the phantom).
    phantom_voxel_mm: float
    preset: str
    budgets_s: tuple[float, ...]
    reference_budget_s: float
    time_target_s: float
    memory_target_mib: float | None  # peak process memory (the CPU target)


CASES = {
    "cpu": Case("cpu", "spine", 20, 128, 128, 1.0, "standard", (30.0, 60.0, 120.0, 180.0), 1200.0, 180.0, 4096.0),
    "gpu": Case("gpu", "spine", 30, 512, 256, 0.5, "high", (15.0, 30.0, 60.0), 150.0, 60.0, None),
    # Smoke check of the script itself; its numbers mean nothing.
    "quick": Case("quick", "spine", 8, 48, 48, 1.0, "fast", (10.0, 20.0), 40.0, 180.0, 4096.0),
}


def device_description(device: torch.device) -> dict:
    """What the runs ran on: GPU name, or CPU model, cores and torch threads."""
    described = {"device": device.type, "torch": torch.__version__, "cpu": cpu_model(),
                 "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        described["gpu"] = properties.name
        described["gpu_memory_gib"] = round(properties.total_memory / 2**30, 1)
    return described


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_label(described: dict) -> str:
    if "gpu" in described:
        return f"{described['gpu']} ({described['gpu_memory_gib']} GiB)"
    return f"{described['cpu']}, {described['cpu_cores']} cores, {described['torch_threads']} torch threads"


def simulate(case: Case, seed: int, device: torch.device, out: Path) -> Path:
    """The case's scan (attenuation line integrals), the phantom's ROI as reference volume."""
    phantom = make_phantom(case.phantom, seed=seed, voxel_size_mm=case.phantom_voxel_mm)
    return simulate_scan(phantom, out, n_views=case.views, detector_px=case.detector_px, seed=seed,
                         roi=default_roi(case.phantom), device=device)


def gaussian_run(scan: Path, out: Path, common: list[str], iterations: int, budget_s: float | None,
                 compile_kernels: bool = False) -> dict:
    """A Gaussian reconstruction with its iterations, iterations per second and memory split by kind."""
    extra = common + ["--method", "gaussian", "--iterations", str(iterations)] + (["--compile"] if compile_kernels else [])
    if budget_s is not None:
        extra += ["--time-budget", str(budget_s)]
    return with_report_details(run_reconstruction(scan, out, extra), out)


def sart_run(scan: Path, out: Path, common: list[str], budget_s: float) -> dict:
    extra = common + ["--method", "sart", "--iterations", str(SART_PASSES), "--time-budget", f"{budget_s:.2f}"]
    return with_report_details(run_reconstruction(scan, out, extra), out)


def with_report_details(row: dict, out: Path) -> dict:
    """Add what ``run_reconstruction`` leaves out: iterations, their rate, peak memory by kind."""
    report = json.loads((out / "report.json").read_text())
    iterations = len(report["loss_curve"])
    row["iterations"] = iterations
    row["iterations_per_s"] = round(iterations / report["elapsed_s"], 2) if iterations else None
    row["process_mib"] = report["peak_memory_mib"].get("process_mib")
    row["cuda_mib"] = report["peak_memory_mib"].get("cuda_mib")
    return row


def case_key(case: Case, seed: int, preset: str, init: str) -> dict:
    """What a reference run must share with the sweep for its PSNR to be the bar."""
    return {"phantom": case.phantom, "views": case.views, "detector_px": case.detector_px,
            "grid_size": case.grid_size, "phantom_voxel_mm": case.phantom_voxel_mm, "seed": seed,
            "preset": preset, "init": init}


def load_reference(path: Path, key: dict) -> dict:
    """A reference record from an earlier run (its ``reference.json`` or its results JSON)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"--reference {path}: not readable JSON ({error})") from None
    record = record.get("reference", record)
    differing = {name: (record.get("case", {}).get(name), value) for name, value in key.items()
                 if record.get("case", {}).get(name) != value}
    if differing:
        raise ValueError(f"--reference {path}: made for other data or settings (theirs, ours): {differing}")
    return {**record, "source": str(path)}


def run_reference(scan: Path, out: Path, common: list[str], iterations: int, budget_s: float | None,
                  key: dict, described: dict, compile_kernels: bool) -> dict:
    run = gaussian_run(scan, out, common, iterations, budget_s, compile_kernels)
    return {"case": key, "device": device_label(described), "iterations_asked": iterations,
            "time_budget_s": budget_s, "source": "this run", **run}


def time_to_reach(rows: list[dict], reference_psnr: float) -> dict:
    """The quickest sweep run within WITHIN_DB of the reference, or how far the best one stays."""
    reached = [row for row in rows if row["gaussian"]["psnr"] >= reference_psnr - WITHIN_DB]
    if reached:
        best = min(reached, key=lambda row: row["gaussian"]["engine_s"])
        return {"reached": True, "budget_s": best["budget_s"], "engine_s": best["gaussian"]["engine_s"],
                "wall_s": best["gaussian"]["wall_s"]}
    best = max(rows, key=lambda row: row["gaussian"]["psnr"])
    return {"reached": False, "largest_budget_s": max(row["budget_s"] for row in rows),
            "best_gap_db": round(reference_psnr - best["gaussian"]["psnr"], 2)}


def assess_targets(case: Case, rows: list[dict], reach: dict) -> list[dict]:
    """Each target: met or missed, and by how much (times are the engine's, without process start)."""
    def target(name: str, met: bool, detail: str) -> dict:
        return {"target": name, "met": bool(met), "detail": detail}

    time_name = f"within {WITHIN_DB} dB of the reference in under {case.time_target_s:.0f} s"
    if reach["reached"]:
        over = reach["engine_s"] - case.time_target_s
        detail = f"{reach['engine_s']} s" + (f", {over:.1f} s over" if over > 0 else "")
        targets = [target(time_name, over <= 0, detail)]
    else:
        targets = [target(time_name, False, f"not reached within {reach['largest_budget_s']:.0f} s: the best run "
                          f"stays {reach['best_gap_db']} dB below the reference")]
    in_time = [row for row in rows if row["budget_s"] <= case.time_target_s] or rows[:1]
    if case.memory_target_mib is not None:
        peak = max(row["gaussian"]["process_mib"] or 0.0 for row in in_time)
        targets.append(target(f"peak memory under {case.memory_target_mib:.0f} MiB", peak < case.memory_target_mib,
                              f"{peak:.0f} MiB, the largest process peak of the Gaussian runs up to "
                              f"{in_time[-1]['budget_s']:.0f} s"))
    judged = in_time[-1]
    gain = judged["psnr_gain_db"]
    met = gain >= SART_GAIN_TARGET_DB
    targets.append(target(f"at equal wall time, {SART_GAIN_TARGET_DB} dB 3D PSNR above SART", met,
                          f"{gain:+.2f} dB at the {judged['budget_s']:.0f} s budget"
                          + ("" if met else f", missed by {SART_GAIN_TARGET_DB - gain:.2f} dB")))
    return targets


def markdown_report(record: dict) -> str:
    case, reference, settings = record["case"], record["reference"], record["settings"]
    budget = reference["time_budget_s"]
    lines = [
        f"# Speed benchmark, case {case['name']}",
        "",
        f"{record['date']}, {record['device_label']}, torch {record['device']['torch']}. "
        f"{case['phantom']} phantom (seed {settings['seed']}, {case['phantom_voxel_mm']} mm), {case['views']} views of "
        f"{case['detector_px']} x {case['detector_px']} px to a {case['grid_size']}^3 grid over the 110 mm ROI. "
        f"Gaussians: preset {settings['preset']}, init {settings['init']}, "
        f"kernel {settings.get('kernel', 'torch')}"
        f"{' (torch: fused by torch.compile)' if settings.get('compile') else ''}, "
        f"{settings['iterations']} iterations asked "
        f"(each run's time budget ends it and its schedule follows the budget). SART is given the Gaussian run's "
        f"time. Times are the engine's (`elapsed_s`); wall times add process start, reading and writing.",
        "",
        f"Reference ({reference['source']}, on {reference['device']}): {reference['iterations']} iterations in "
        f"{reference['engine_s']} s ({reference['iterations_per_s']} it/s; asked {reference['iterations_asked']} "
        f"iterations" + (f" within {budget:.0f} s" if budget else "") + f", stopped by {reference['stop_reason']}), "
        f"3D PSNR {reference['psnr']} dB, SSIM {reference['ssim']}."
        + ("" if reference["iterations"] >= R2GAUSSIAN_ITERATIONS else
           f" This is fewer than R2-Gaussian's {R2GAUSSIAN_ITERATIONS} iterations: the bar is this run, "
           "not a converged one."),
        "",
        "| budget s | Gaussian time s (wall) | iterations | it/s | peak MiB process / device | stop | 3D PSNR dB | "
        "below reference dB | SART PSNR dB | SART time s | Gaussians - SART dB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in record["rows"]:
        g, s = row["gaussian"], row["sart"]
        device_mib = f"{g['cuda_mib']:.0f}" if g["cuda_mib"] is not None else "-"
        lines.append(f"| {row['budget_s']:.0f} | {g['engine_s']} ({g['wall_s']}) | {g['iterations']} | "
                     f"{g['iterations_per_s']} | {g['process_mib']:.0f} / {device_mib} | {g['stop_reason']} | "
                     f"{g['psnr']} | {round(reference['psnr'] - g['psnr'], 2)} | {s['psnr']} | {s['engine_s']} | "
                     f"{row['psnr_gain_db']:+.2f} |")
    reach = record["time_to_reach"]
    lines += ["", "Time to within 0.5 dB of the reference: " + (
        f"{reach['engine_s']} s (budget {reach['budget_s']:.0f} s, wall {reach['wall_s']} s)." if reach["reached"] else
        f"not reached; at {reach['largest_budget_s']:.0f} s the best run is {reach['best_gap_db']} dB below it."), "",
        "Targets:", ""]
    for target in record["targets"]:
        lines.append(f"* {target['target']}: **{'met' if target['met'] else 'missed'}** ({target['detail']})")
    return "\n".join(lines) + "\n"


def parse_arguments() -> argparse.Namespace:
    defaults = ReconstructionSettings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--case", choices=("auto", "cpu", "gpu"), default="auto", help="default: the device's")
    parser.add_argument("--budgets", type=float, nargs="+", help="Gaussian wall-time budgets, s (default: the case's)")
    parser.add_argument("--reference-iterations", type=int, default=R2GAUSSIAN_ITERATIONS,
                        help="iterations asked of every Gaussian run, the reference included")
    parser.add_argument("--reference-budget", type=float,
                        help="s; 0 for none (all iterations) (default: the case's: cpu 1200, gpu 150)")
    parser.add_argument("--reference", type=Path, help="reuse the reference of an earlier run (its JSON)")
    parser.add_argument("--reference-only", action="store_true",
                        help="run the reference alone and write <stem>-reference.json (then --reference it)")
    parser.add_argument("--preset", choices=tuple(PRESETS), help="default: the case's (cpu standard, gpu high)")
    parser.add_argument("--init", choices=INITS, default=defaults.init)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--compile", action="store_true", help="Gaussian runs with fused kernels (ixgs --compile)")
    parser.add_argument("--kernel", choices=KERNELS, default="auto", help="pair kernels (ixgs --kernel)")
    parser.add_argument("--work", type=Path, help="keep scans and reconstructions here (default: a temporary folder)")
    parser.add_argument("--results", type=Path, help="folder for the results (default: bench/results; "
                        "with --quick a new temporary folder)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny smoke check (8 views of 48 px, budgets 10 and 20 s, reference 40 s)")
    args = parser.parse_args()
    if args.reference_iterations < 1:
        parser.error("--reference-iterations must be positive")
    if args.budgets and min(args.budgets) <= 0:
        parser.error("--budgets must be positive")
    if args.reference and args.reference_only:
        parser.error("--reference and --reference-only exclude each other")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return args


def main() -> None:
    args = parse_arguments()
    device = resolve_device(args.device)
    device_case = "gpu" if device.type == "cuda" else "cpu"
    case = CASES["quick" if args.quick else device_case if args.case == "auto" else args.case]
    budgets = sorted(args.budgets or case.budgets_s)
    reference_budget = case.reference_budget_s if args.reference_budget is None else args.reference_budget
    reference_budget = reference_budget or None
    preset = args.preset or case.preset
    key = case_key(case, args.seed, preset, args.init)
    described = device_description(device)
    stem = f"speed-{device.type}" + ("" if case.name == device_case else f"-{case.name}")
    voxel_mm = max(default_roi(case.phantom).size) / case.grid_size
    common = ["--device", device.type, "--seed", str(args.seed), "--voxel-size", repr(voxel_mm),
              "--preset", preset, "--init", args.init, "--kernel", args.kernel]
    print(f"case {case.name} on {device_label(described)}: budgets {budgets} s, reference "
          + (f"from {args.reference}" if args.reference else f"{args.reference_iterations} iterations"
             + (f" capped at {reference_budget:.0f} s" if reference_budget else ""))
          + ("" if args.reference_only else f"; the sweep takes twice {sum(budgets):.0f} s plus process start, "
             "reading and writing"), file=sys.stderr, flush=True)

    try:  # before minutes of work
        reference = load_reference(args.reference, key) if args.reference else None
    except ValueError as error:
        sys.exit(f"speed.py: error: {error}")
    results = args.results or (Path(tempfile.mkdtemp(prefix="ixgs-speed-quick-")) if args.quick else RESULTS)
    with tempfile.TemporaryDirectory(prefix="ixgs-speed-") as temporary:
        work = args.work or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        scan = simulate(case, args.seed, device, work / "scan")
        if reference is None:
            reference = run_reference(scan, work / "reference", common, args.reference_iterations,
                                      reference_budget, key, described, args.compile)
            reference["volume"] = str(work / "reference" / "volume.nrrd") if args.work else None
            (work / "reference.json").write_text(json.dumps(reference, indent=1))
            overhead = reference["wall_s"] - reference["engine_s"]
            print(f"reference done; the sweep should take about "
                  f"{(2 * sum(budgets) + 2 * len(budgets) * overhead) / 60:.1f} minutes", file=sys.stderr, flush=True)
        print(json.dumps({"reference": reference}), flush=True)
        if args.reference_only:
            results.mkdir(parents=True, exist_ok=True)
            (results / f"{stem}-reference.json").write_text(json.dumps(reference, indent=1))
            print(f"written: {results / stem}-reference.json", file=sys.stderr)
            return
        rows = []
        for budget in budgets:
            gaussian = gaussian_run(scan, work / f"gaussian-{budget:g}s", common, args.reference_iterations, budget,
                                    args.compile)
            sart = sart_run(scan, work / f"sart-{budget:g}s", common, gaussian["engine_s"])
            row = {"budget_s": budget, "gaussian": gaussian, "sart": sart,
                   "psnr_gain_db": round(gaussian["psnr"] - sart["psnr"], 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)

    reach = time_to_reach(rows, reference["psnr"])
    record = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": described, "device_label": device_label(described),
              "case": asdict(case), "settings": {"preset": preset, "init": args.init, "seed": args.seed,
                                                 "iterations": args.reference_iterations, "budgets_s": budgets,
                                                 "compile": args.compile, "kernel": args.kernel},
              "reference": reference, "rows": rows, "time_to_reach": reach,
              "targets": assess_targets(case, rows, reach)}
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{stem}.json").write_text(json.dumps(record, indent=1))
    (results / f"{stem}.md").write_text(markdown_report(record))
    print(markdown_report(record))
    print(f"written: {results / stem}.json and .md", file=sys.stderr)


if __name__ == "__main__":
    main()
