"""Quality diagnosis: what costs the Gaussians' 3D PSNR, factor by factor, against SART and SART+TV.

Every case is simulated without inverse crime (``ixgs simulate --model analytic``: exact line
integrals of an ellipsoid/cylinder phantom, 3x3 sub-rays a pixel; the reference is each voxel's
exact mean attenuation on the output grid) and reconstructed three ways at equal compute: the
Gaussians' default run (``ixgs reconstruct``) under ``--budget`` wall seconds or for
``--iterations``, then SART (the engine's ``--method sart``: its grid and sampling) and SART+TV
(``ixgs.sart.sart_reconstruct(tv_weight=...)``) for as much CPU time as the Gaussian process used
(on a machine shared past its cores, wall time would measure the other work).
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
    """One ``ixgs reconstruct`` process: its scores (the report's, against the scan's reference), wall
    time and CPU time (user + system, what the equal-compute baselines are given)."""
    command = ["ixgs", "reconstruct", str(scan), "-o", str(out), "--progress", "none", *extra]
    load_before, started = load(), time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "ixgs", *command[1:]], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise subprocess.CalledProcessError(process.returncode, command)
    wall = time.perf_counter() - started
    report = json.loads((out / "report.json").read_text())
    return {"command": shlex.join(command), "wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "engine_s": round(report["elapsed_s"], 1), **scores(report["metrics"]),
            "reprojection_psnr": round(report["reprojection_psnr"], 2), "stop_reason": report["stop_reason"],
            "iterations": report["loss_curve"][-1][0] if report["loss_curve"] else 0,
            "gaussians": report["gaussians"], "load_before": load_before, "load_after": load()}


def scores(metrics: dict) -> dict:
    return {"psnr": round(metrics["psnr"], 2), "ssim": round(metrics["ssim"], 3), "dice": round(metrics["dice"], 3)}


def run_sart(scan_path: Path, cpu_budget_s: float, seed: int, tv_weight: float = 0.0) -> dict:
    """The engine's SART (its grid, 2.5x the ROI; sampled onto the output grid as ``--method sart``
    does), with TV steps when ``tv_weight`` > 0, for ``cpu_budget_s`` seconds of this process's CPU
    time (a wall-time budget would measure the other work on a shared machine)."""
    from ixgs.metrics import evaluate
    from ixgs.projector import sample_volume
    from ixgs.reconstruct import ReconstructionSettings, _sart_grid, reconstruction_grid
    from ixgs.training.schedule import binned_views
    from ixgs.sart import sart_reconstruct
    from ixgs.scan import read_scan
    from ixgs.volume import Volume

    load_before, started, cpu_started = load(), time.perf_counter(), time.process_time()
    scan = read_scan(scan_path)
    settings = ReconstructionSettings(method="sart", seed=seed)
    grid = reconstruction_grid(scan, settings)
    sart_grid = _sart_grid(scan, grid, settings.sart_factor)
    passes = []
    values = sart_reconstruct(binned_views(scan, 1), sart_grid, 1000, seed=seed, tv_weight=tv_weight,
                              tv_steps=SART_TV_STEPS, progress=lambda i, n, residual: passes.append(i),
                              cancel=lambda: time.process_time() - cpu_started > cpu_budget_s, kernel="auto")
    centers = torch.as_tensor(grid.voxel_centers(), dtype=values.dtype)
    with torch.no_grad():
        volume = Volume.on_grid(sample_volume(values, sart_grid, centers).numpy(), grid)
    cpu = time.process_time() - cpu_started
    call = f"sart_reconstruct(views, _sart_grid(...), 1000, tv_weight={tv_weight}" + (
        f", tv_steps={SART_TV_STEPS}" if tv_weight > 0 else "") + f") for {cpu_budget_s:.0f} CPU s"
    return {"call": call, "wall_s": round(time.perf_counter() - started, 1), "cpu_s": round(cpu, 1),
            "passes": len(passes), **scores(evaluate(volume, Volume.read(scan.reference_volume))),
            "load_before": load_before, "load_after": load()}


def rtk_geometry(rtk, matrices: list[np.ndarray], shape: tuple[int, int], center):
    """RTK's geometry for projection matrices (zero skew, square pixels), as in
    /work/shared/DESIGN_NOTES.md ("RTK"): a detector plane at depth D = s x focal length, row/column
    vectors from M^-1, the stack's physical origin at the image centre. RTK integrates only from the
    source to the detector, so the pixel spacing s puts every detector at twice the source-centre
    distance or more. Returns the geometry, s (mm) and which views need their rows flipped."""
    from ixgs.geometry import normalize_projection_matrix, source_position

    rows, cols = shape
    matrices = [normalize_projection_matrix(P, center) for P in matrices]
    # |M^-1 e1| = 1 / fx: a column step at depth D moves D / fx mm.
    spacing_mm = max(2.0 * np.linalg.norm(source_position(P) - center) * np.linalg.norm(np.linalg.inv(P[:, :3])[:, 0])
                     for P in matrices)
    geometry = rtk.ThreeDCircularProjectionGeometry.New()
    flips = []
    for P in matrices:
        inverse = np.linalg.inv(P[:, :3])
        source = source_position(P)
        row_vector, column_vector = inverse[:, 0], inverse[:, 1]
        depth = spacing_mm / np.linalg.norm(row_vector)
        row_vector, column_vector = row_vector / np.linalg.norm(row_vector), column_vector / np.linalg.norm(column_vector)
        middle = source + depth * inverse @ [0.5 * (cols - 1), 0.5 * (rows - 1), 1.0]
        flip = float(np.cross(row_vector, column_vector) @ (source - middle)) < 0
        if flip:
            column_vector = -column_vector
        flips.append(flip)
        if not geometry.AddProjection([float(v) for v in source], [float(v) for v in middle],
                                      [float(v) for v in row_vector], [float(v) for v in column_vector]):
            raise ValueError("RTK refused a view's geometry")
    return geometry, spacing_mm, flips


# "cg-stopped": RTK's conjugate gradient at its best iteration count (1, 2, 4, ... up to what fits the
# Gaussians' wall time), chosen on the reference: it semi-converges, so "as many as fit" is not its best.
RTK_METHODS = ("sart", "cg", "admm-tv", "cg-stopped")
# ADMM-TV's TV weight and augmented-Lagrangian penalty (RTK's alpha and beta; line integrals, 1/mm):
# chosen on spine-20-120-truncated-clean against the reference, 3 iterations, among (alpha, beta) =
# (0.01..1e6, 1), (1, 1e3), (5, 1e3), (10, 1e4), (100, 1e5), (0.1, 100), (1, 100), (0.01, 10): the best
# PSNR (18.50 dB; beta 1 leaves TV without effect, 18.48 for every alpha). Tuned on the answer, so it
# flatters RTK.
RTK_TV_ALPHA = 0.1
RTK_TV_BETA = 100.0


def run_rtk(scan_path: Path, method: str, iterations: int, tv_alpha: float = RTK_TV_ALPHA,
            tv_beta: float = RTK_TV_BETA) -> dict:
    """RTK's SART, conjugate gradient ("cg") or ADMM total variation ("admm-tv", ``iterations`` of its
    augmented Lagrangian, 3 conjugate-gradient steps each) on the engine's SART grid (the same 2.5x
    box), with the same views; scored on the output grid. Needs ``pip install "ixgs[bench]"``."""
    import itk
    from itk import RTK as rtk

    from ixgs.metrics import evaluate
    from ixgs.reconstruct import ReconstructionSettings, _sart_grid, reconstruction_grid
    from ixgs.scan import read_scan
    from ixgs.volume import Volume

    load_before, started = load(), time.perf_counter()
    scan = read_scan(scan_path)
    settings = ReconstructionSettings(method="sart")
    grid = reconstruction_grid(scan, settings)
    box = _sart_grid(scan, grid, settings.sart_factor)
    rows, cols = scan.views[0].image.shape
    geometry, pixel_mm, flips = rtk_geometry(rtk, scan.projection_matrices, (rows, cols), grid.roi.center)
    stack = np.stack([view.image[::-1] if flip else view.image for view, flip in zip(scan.views, flips)])
    image_type = itk.Image[itk.F, 3]
    projections = itk.image_from_array(np.ascontiguousarray(stack, dtype=np.float32))
    projections.SetSpacing([pixel_mm, pixel_mm, 1.0])
    projections.SetOrigin([-0.5 * (cols - 1) * pixel_mm, -0.5 * (rows - 1) * pixel_mm, 0.0])
    cast = itk.CastImageFilter[image_type, image_type].New(Input=projections)
    cast.Update()
    pad = 2  # RTK's Joseph rays stop at the outermost voxel centres
    padded = box.padded((pad, pad, pad))
    volume = itk.image_from_array(np.zeros(padded.shape, np.float32))
    volume.SetSpacing([float(v) for v in padded.spacing])
    volume.SetOrigin([float(v) for v in padded.origin])
    if method == "cg":
        recon = rtk.ConjugateGradientConeBeamReconstructionFilter[image_type].New()
        recon.SetDisableDisplacedDetectorFilter(True)
        recon.SetNumberOfIterations(iterations)
    elif method == "admm-tv":
        recon = rtk.ADMMTotalVariationConeBeamReconstructionFilter[image_type].New()
        recon.SetDisableDisplacedDetectorFilter(True)
        recon.SetAlpha(tv_alpha)
        recon.SetBeta(tv_beta)
        recon.SetAL_iterations(iterations)
        recon.SetCG_iterations(3)
    else:
        recon = rtk.SARTConeBeamReconstructionFilter[image_type, image_type].New()
        recon.SetEnforcePositivity(True)
        recon.SetNumberOfIterations(iterations)
    recon.SetInput(0, volume)
    recon.SetInput(1, cast.GetOutput())
    recon.SetGeometry(geometry)
    recon.Update()
    values = itk.array_from_image(recon.GetOutput())[padded.inner((pad, pad, pad))]
    result = Volume.on_grid(np.ascontiguousarray(values, dtype=np.float32), box)
    wall = time.perf_counter() - started
    return {"method": f"rtk-{method}", "iterations": iterations, "wall_s": round(wall, 1),
            **({"tv_alpha": tv_alpha, "tv_beta": tv_beta} if method == "admm-tv" else {}),
            **scores(evaluate(result, Volume.read(scan.reference_volume))),
            "load_before": load_before, "load_after": load()}


def run_rtk_for(scan_path: Path, method: str, wall_budget_s: float) -> dict:
    """RTK ``method`` with as many iterations as a one-iteration run says fit in ``wall_budget_s`` (the
    Gaussians' wall time). That run's time includes RTK's set-up, so the count is rough (measured 22 %
    to 115 % of the budget used): the wall time is recorded beside the budget. ``"cg-stopped"``: the
    conjugate gradient at the best of 1, 2, 4, ... iterations up to that count, by PSNR against the
    reference (a stopping point no user could choose so well: it flatters RTK); the ladder is recorded."""
    rtk_method = "cg" if method == "cg-stopped" else method
    first = run_rtk(scan_path, rtk_method, 1)
    iterations = max(1, int(wall_budget_s // max(first["wall_s"], 0.1)))
    if method != "cg-stopped":
        result = first if iterations == 1 else run_rtk(scan_path, method, iterations)
        return {**result, "wall_budget_s": round(wall_budget_s, 1)}
    counts = sorted({2**k for k in range(1, iterations.bit_length())} | ({iterations} - {1}))
    ladder = [first] + [run_rtk(scan_path, rtk_method, n) for n in counts]
    best = max(ladder, key=lambda run: run["psnr"])
    return {**best, "method": "rtk-cg, best stop (on the reference)", "wall_budget_s": round(wall_budget_s, 1),
            "ladder": [[run["iterations"], run["psnr"]] for run in ladder]}


def simulate(name: str, args, work: Path) -> tuple[Path, dict]:
    case = parse_case(name)
    scan = work / name
    command = simulate_command(case, scan, args.detector, args.seed)
    print(f"[{name}] {shlex.join(command)}", flush=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ixgs", *command[1:], "--progress", "none"], check=True,
                   stdout=subprocess.DEVNULL)
    return scan, {**case, "simulate": shlex.join(command), "simulate_s": round(time.perf_counter() - started, 1)}


def gaussian_run(args) -> list[str]:
    """The Gaussian run's ``ixgs reconstruct`` options but the seed: the budget, then ``--gaussian-options``."""
    budget = ["--iterations", str(args.iterations)] if args.iterations else ["--time-budget", str(args.budget)]
    return budget + shlex.split(args.gaussian_options)


def run_case(name: str, args, work: Path) -> dict:
    scan, row = simulate(name, args, work)
    row["gaussian"] = run_reconstruct(scan, work / f"{name}-gaussian", gaussian_run(args) + ["--seed", str(args.seed)])
    cpu = row["gaussian"]["cpu_s"]
    row["sart"] = run_sart(scan, cpu, args.seed)
    row["sart_tv"] = run_sart(scan, cpu, args.seed, tv_weight=SART_TV_WEIGHT)
    row["gain_over_sart_db"] = round(row["gaussian"]["psnr"] - row["sart"]["psnr"], 2)
    row["gain_over_sart_tv_db"] = round(row["gaussian"]["psnr"] - row["sart_tv"]["psnr"], 2)
    return row


def fit_ceiling(phantom_name: str, n: int, cpu_seconds: float, seed: int) -> dict:
    """N Gaussians fitted to the exact reference in 3D for ``cpu_seconds`` of CPU time: the engine's
    warm start (:meth:`GaussianModel.from_volume_deterministic`, the lattice fitted by least squares)
    from the reference itself, then Adam (the trainer's learning rates) on MSE(voxelize(model),
    reference) over random 48^3 blocks; scored on the whole volume."""
    from ixgs.analytic import make_analytic_phantom
    from ixgs.gaussians import GaussianModel
    from ixgs.metrics import evaluate
    from ixgs.phantom import default_roi
    from ixgs.training.config import TrainingConfig
    from ixgs.volume import Volume
    from ixgs.voxelize import voxelize

    load_before, started = load(), time.perf_counter()
    roi = default_roi(phantom_name)
    grid = roi.grid(max(roi.size) / 128)
    reference = make_analytic_phantom(phantom_name, seed=seed).reference(grid)
    target = torch.as_tensor(reference.array)
    generator = torch.Generator().manual_seed(seed)
    model = GaussianModel.from_volume_deterministic(target, grid, n, roi)
    with torch.no_grad():
        start_scores = evaluate(Volume.on_grid(voxelize(model, grid, kernel="auto").numpy(), grid), reference)
    optimizer = torch.optim.Adam(model.parameter_groups(TrainingConfig().learning_rates), eps=1e-15)
    block, steps, curve = 48, 0, []
    fitting = time.process_time()
    while time.process_time() - fitting < cpu_seconds:
        corner = [int(torch.randint(0, s - block + 1, (1,), generator=generator)) for s in grid.shape]
        region = tuple(slice(c, c + block) for c in corner)
        loss = (voxelize(model, grid, region=region, kernel="auto") - target[region]).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
        if steps % 20 == 0:
            curve.append((steps, round(float(loss.detach()), 9)))
    with torch.no_grad():
        fitted = Volume.on_grid(voxelize(model, grid, kernel="auto").numpy(), grid)
    return {"phantom": phantom_name, "gaussians": n, "steps": steps, "fit_cpu_s": round(cpu_seconds, 1),
            "wall_s": round(time.perf_counter() - started, 1),
            "start": scores(start_scores), **scores(evaluate(fitted, reference)), "loss_curve": curve,
            "load_before": load_before, "load_after": load()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=None, help=f"case names (default: {' '.join(DEFAULT_CASES)})")
    parser.add_argument("--budget", type=float, default=90.0, help="Gaussian wall-time budget, s")
    parser.add_argument("--iterations", type=int, help="Gaussian iterations instead of a wall-time budget (a fixed "
                        "amount of work: on a shared machine a wall-time budget measures the other work)")
    parser.add_argument("--gaussian-options", default="", metavar="OPTIONS", help="more `ixgs reconstruct` options "
                        "for the Gaussian run, e.g. \"--preset high --no-plateau-stop\" for a long converged run")
    parser.add_argument("--detector", type=int, default=128)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--ceiling", nargs="*", type=int, default=[], metavar="N", help="Gaussians to fit in 3D")
    parser.add_argument("--ceiling-phantom", default="spine", choices=("spine", "knee"))
    parser.add_argument("--ceiling-seconds", type=float, default=240.0, help="CPU seconds of each fit")
    parser.add_argument("--tag", default="baseline", help="result files: quality-<tag>.json / .md")
    parser.add_argument("--rtk", nargs="+", choices=RTK_METHODS, metavar="METHOD", help="also RTK's reconstructors "
                        f"({', '.join(RTK_METHODS)}) for the Gaussians' wall time of each case (pip install "
                        "'ixgs[bench]'; added to cases already recorded)")
    parser.add_argument("--threads", type=int, help="torch threads of every run (default: torch's); on a "
                        "machine loaded past its cores, 1 avoids oversubscribed OpenMP threads")
    args = parser.parse_args()
    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the ixgs processes
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)  # RTK
        torch.set_num_threads(args.threads)

    path = RESULTS / f"quality-{args.tag}.json"
    record = read_record(path) if path.exists() else {
        "device": f"{platform.processor() or 'cpu'} ({os.cpu_count()} cores), {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "detector_px": args.detector, "grid": "128^3 over the 110 mm ROI", "seed": args.seed,
        "gaussian_run": shlex.join(gaussian_run(args)),
        "sart_tv": {"tv_weight": SART_TV_WEIGHT, "tv_steps": SART_TV_STEPS}, "cases": {}, "ceiling": {}}

    changed: set[tuple[str, str]] = set()  # (section, key) this run wrote: only those override the file

    def save() -> None:
        """Write the record, merging what other runs of this script with the same tag added meanwhile."""
        RESULTS.mkdir(exist_ok=True)
        if path.exists():
            on_disk = read_record(path)
            for section in ("cases", "ceiling"):
                mine = {key: value for key, value in record[section].items() if (section, key) in changed}
                record[section] = {**record[section], **on_disk[section], **mine}
            record["notes"] = on_disk.get("notes", record.get("notes"))
        path.write_text(json.dumps(record, indent=1))
        path.with_suffix(".md").write_text(markdown(record))

    cases = DEFAULT_CASES if args.cases is None else args.cases
    for name in cases:
        parse_case(name)
    with tempfile.TemporaryDirectory() as work:
        for name in cases:
            scan = None  # simulated only when something is still to run on it
            if name in record["cases"]:
                row = record["cases"][name]
            else:
                row = run_case(name, args, Path(work))
                scan = Path(work) / name
                row["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                record["cases"][name] = row
                changed.add(("cases", name))
                save()
                print(json.dumps({k: row[k] for k in ("gain_over_sart_db", "gain_over_sart_tv_db")}), flush=True)
            missing = [method for method in args.rtk or [] if method not in row.get("rtk", {})]
            if scan is None and not missing:
                print(f"[{name}] already recorded, skipped", flush=True)
            for method in missing:
                scan = scan or simulate(name, args, Path(work))[0]
                row.setdefault("rtk", {})[method] = run_rtk_for(scan, method, row["gaussian"]["wall_s"])
                print(json.dumps({name: row["rtk"][method]}), flush=True)
                changed.add(("cases", name))
                save()
    for n in args.ceiling:
        key = f"{args.ceiling_phantom}-{n}"
        if key in record["ceiling"]:
            print(f"[ceiling {key}] already recorded, skipped", flush=True)
            continue
        print(f"[ceiling {key}] fitting for {args.ceiling_seconds} s", flush=True)
        record["ceiling"][key] = {**fit_ceiling(args.ceiling_phantom, n, args.ceiling_seconds, args.seed),
                                  "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        changed.add(("ceiling", key))
        save()
    save()
    print(markdown(record))


def read_record(path: Path) -> dict:
    """A results file; RTK rows of earlier records (``rtk_cg``, a fixed iteration count) under ``rtk``."""
    record = json.loads(path.read_text())
    for row in record["cases"].values():
        if "rtk_cg" in row:
            row.setdefault("rtk", {})["cg"] = row.pop("rtk_cg")
    return record


def markdown(record: dict) -> str:
    lines = [f"Quality diagnosis, {record['device']}, torch {record['torch']}, {record['detector_px']} px views to "
             f"{record['grid']}, analytic phantoms (no inverse crime), seed {record['seed']}. Gaussians: default "
             f"run with {record['gaussian_run']}; SART and SART+TV (alpha {record['sart_tv']['tv_weight']}, "
             f"{record['sart_tv']['tv_steps']} TV steps a pass) given the Gaussian process's CPU time (equal compute; "
             "on an idle machine with one thread, equal wall time). Load: 1-minute load average before/after the "
             "Gaussian run (2 cores shared with other work).", "",
             "| case | Gaussian PSNR / SSIM / Dice | iterations | CPU s | wall s | SART PSNR / SSIM / Dice (passes) "
             "| SART+TV PSNR / SSIM / Dice (passes) | G - SART dB | G - SART+TV dB | load |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in record["cases"].items():
        g, s, t = row["gaussian"], row["sart"], row["sart_tv"]
        lines.append(f"| {name} | {g['psnr']} / {g['ssim']} / {g['dice']} | {g['iterations']} | {g['cpu_s']} | "
                     f"{g['wall_s']} | {s['psnr']} / {s['ssim']} / {s['dice']} ({s['passes']}) | {t['psnr']} / "
                     f"{t['ssim']} / {t['dice']} ({t['passes']}) | {row['gain_over_sart_db']} | "
                     f"{row['gain_over_sart_tv_db']} | {g['load_before'][0]}/{g['load_after'][0]} |")
    rtk_rows = [(name, r) for name, row in record["cases"].items() for r in row.get("rtk", {}).values()]
    if rtk_rows:
        lines += ["", "RTK (`--rtk`, same views, SART's 2.5x box; iterations to fit the Gaussians' wall time where "
                  "a budget is shown):", "",
                  "| case | RTK method | iterations | wall s (budget) | PSNR / SSIM / Dice | G - RTK dB |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, r in rtk_rows:
            method = r["method"] + (f" (alpha {r['tv_alpha']}, beta {r['tv_beta']})" if "tv_alpha" in r else "")
            lines.append(f"| {name} | {method} | {r['iterations']} | {r['wall_s']} ({r.get('wall_budget_s', '-')}) | "
                         f"{r['psnr']} / {r['ssim']} / {r['dice']} | "
                         f"{round(record['cases'][name]['gaussian']['psnr'] - r['psnr'], 2)} |")
    if record["ceiling"]:
        lines += ["", "Representational ceiling: N Gaussians fitted to the reference in 3D (the engine's warm start "
                  "from the reference itself, then Adam on random 48^3 blocks for a fixed CPU time).", "",
                  "| phantom | Gaussians | steps | CPU s | start PSNR / SSIM / Dice | fitted PSNR / SSIM / Dice |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for row in record["ceiling"].values():
            st = row["start"]
            lines.append(f"| {row['phantom']} | {row['gaussians']} | {row['steps']} | {row['fit_cpu_s']} | {st['psnr']} / "
                         f"{st['ssim']} / {st['dice']} | {row['psnr']} / {row['ssim']} / {row['dice']} |")
    lines += ["", "Commands (each case's scan, then its Gaussian run; SART: `ixgs reconstruct SCAN -o OUT --method sart "
              "--iterations 1000 --time-budget <the Gaussian CPU s>` on an idle machine):", ""]
    for row in record["cases"].values():
        lines += [f"    {row['simulate']}", f"    {row['gaussian']['command']}"]
    if record.get("notes"):  # the diagnosis, written into the record by whoever ran it
        lines += ["", "## Diagnosis", "", *record["notes"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
