"""The ``ixgs`` command line: parses arguments and calls the engine, nothing more.

Bad input ends with a one-line ``ixgs: error: ...`` on stderr and exit status 2; an internal error
(a bug) with exit status 1, one line and the traceback in a log file. Nothing is left half-written:
output folders follow :mod:`ixgs.output_folder`, and SIGTERM cleans up like Ctrl-C.
"""
from __future__ import annotations

import _thread
import argparse
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import __version__

EXIT_BUG = 1
EXIT_BAD_INPUT = 2
# Set to "stdin" by a parent (the Slicer module) that keeps our stdin open while it lives.
PARENT_WATCH_ENV = "IXGS_EXIT_WITH_PARENT"
DEMO_KIND = "demo"  # the output-folder kind of `ixgs demo` (ixgs.output_folder)


class _ProgressPrinter:
    """Engine progress as a tqdm bar on stderr, or as JSON lines on stdout (for the Slicer module)."""

    def __init__(self, mode: str):
        self.mode, self.bars = mode, {}

    def __call__(self, progress) -> None:
        if self.mode == "json":
            record = {"stage": progress.stage, "iteration": progress.iteration, "total": progress.total,
                      "loss": _finite_or_none(progress.loss), "elapsed_s": round(progress.elapsed_s, 3),
                      "eta_s": _finite_or_none(progress.eta_s)}
            print(json.dumps(record), flush=True)
            return
        if self.mode == "none":
            return
        bar = self.bars.get(progress.stage)
        if bar is None:
            bar = self.bars[progress.stage] = tqdm(total=progress.total, desc=progress.stage, unit="it",
                                                   file=sys.stderr, dynamic_ncols=True)
        bar.total = progress.total
        bar.n = progress.iteration
        bar.set_postfix(loss=f"{progress.loss:.4g}", refresh=False)
        bar.refresh()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def finite_float(text: str) -> float:
    """argparse type: a finite number (NaN and infinities are refused: they pass every comparison)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number above zero."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _finite_or_none(value: float):
    return round(float(value), 6) if np.isfinite(value) else None


def _roi_argument(values):
    from .geometry import Roi

    if values is None:
        return None
    center, size = values[:3], values[3:]
    if min(size) <= 0:
        raise ValueError(f"--roi: sizes must be positive, got {size}")
    return Roi(tuple(center), tuple(size))


def reconstruct_to_folder(scan_path: Path, out_dir: Path, settings, bone_threshold: float | None,
                          progress_mode: str, previews: bool = True) -> dict:
    """Read a scan, reconstruct it and write the output folder (with figures and report.html unless
    ``previews`` is false); returns the report."""
    from .output_folder import reserve
    from .outputs import KIND

    # Before minutes of work: the output may be written, and no other run writes it meanwhile.
    with reserve(out_dir, KIND, [scan_path, settings.checkpoint, settings.resume]):
        return _reconstruct_to_reserved_folder(scan_path, out_dir, settings, bone_threshold, progress_mode,
                                               previews)


def _reconstruct_to_reserved_folder(scan_path: Path, out_dir: Path, settings, bone_threshold: float | None,
                                    progress_mode: str, previews: bool) -> dict:
    from .outputs import write_outputs
    from .reconstruct import reconstruct
    from .scan import read_scan

    scan = read_scan(scan_path)
    _print_warnings(scan.warnings)
    printer = _ProgressPrinter(progress_mode)
    read_warnings = len(scan.warnings)
    try:
        result = reconstruct(scan, settings, progress=printer, cancel=_cancel_request,
                             then_writes="previews" if previews else "files")
    finally:
        printer.close()
    _print_warnings(scan.warnings[read_warnings:])  # reconstruct's, about a given ROI
    report = {
        "ixgs_version": __version__,
        "scan": str(scan_path),
        "settings": result.settings,
        "device": result.device,
        "elapsed_s": result.elapsed_s,
        "stop_reason": result.stop_reason,
        "gaussians": result.gaussians,
        "grid": {"shape": list(result.volume.array.shape), "spacing_mm": list(result.volume.spacing),
                 "origin_mm": list(result.volume.origin)},
        "reprojection_psnr": result.reprojection_psnr,
        "peak_memory_mib": result.peak_memory,
        "warnings": scan.warnings,
        "stages": result.stages,
        "densification": result.densification,
        "training_config": result.training_config,
        "tv_clip_per_mm": result.tv_clip_per_mm,
        "kernel": result.kernel,
        "ms_per_iteration": _finite_or_none(result.ms_per_iteration),
    }
    if result.held_out:
        report["held_out"] = result.held_out
    if result.pose_corrections:
        report["pose_corrections"] = result.pose_corrections
    return write_outputs(out_dir, scan, result.volume, report, bone_threshold, result.reprojections,
                         result.loss_curve, previews=previews)


def _print_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        print(f"ixgs: warning: {warning}", file=sys.stderr)


def settings_arguments(settings) -> list[str]:
    """The ``ixgs reconstruct`` options that reproduce ``settings`` (the inverse of reading them back):
    how the Slicer module starts the engine in a background process."""
    settings.validate()
    args = ["--method", settings.method, "--preset", settings.preset, "--init", settings.init,
            "--device", settings.device, "--seed", str(int(settings.seed)), "--kernel", settings.kernel]
    for option, value in (("--voxel-size", settings.voxel_size_mm), ("--time-budget", settings.time_budget_s),
                          ("--memory-budget", settings.memory_budget_mib)):
        if value is not None:
            args += [option, repr(float(value))]
    for option, value in (("--iterations", settings.iterations), ("--gaussians", settings.gaussians),
                          ("--views-per-step", settings.views_per_step), ("--held-out-views", settings.held_out_views)):
        if value is not None:
            args += [option, str(int(value))]
    if settings.refine_poses:
        args.append("--refine-poses")
    if not settings.stop_on_plateau:
        args.append("--no-plateau-stop")
    if settings.compile:
        args.append("--compile")
    if settings.roi is not None:
        args += ["--roi", *(repr(float(v)) for v in (*settings.roi.center, *settings.roi.size))]
    return args


def _settings_from(args):
    from .reconstruct import ReconstructionSettings

    settings = ReconstructionSettings(
        method=args.method, preset=args.preset, iterations=args.iterations, voxel_size_mm=args.voxel_size,
        init=args.init, device=args.device, seed=args.seed, time_budget_s=args.time_budget,
        gaussians=args.gaussians, roi=_roi_argument(args.roi), refine_poses=args.refine_poses,
        views_per_step=args.views_per_step, stop_on_plateau=not args.no_plateau_stop, compile=args.compile,
        kernel=args.kernel,
        memory_budget_mib=args.memory_budget, held_out_views=args.held_out_views,
        checkpoint=args.checkpoint, resume=args.resume)
    settings.validate()
    return settings


def _cmd_reconstruct(args) -> int:
    from .volume import json_text
    settings = _settings_from(args)
    report = reconstruct_to_folder(Path(args.scan), Path(args.output), settings, args.bone_threshold, args.progress,
                                   previews=not args.no_previews)
    if args.progress != "json":
        print(json_text(_summary(report, args.output), indent=1))
    return 0


def _summary(report: dict, output) -> dict:
    summary = {"output": str(output), "elapsed_s": round(report["elapsed_s"], 1),
               "stop_reason": report["stop_reason"], "bone_threshold": report["bone_threshold"]}
    if "metrics" in report:
        summary["metrics"] = report["metrics"]
    if "warning" in report["coverage"]:
        summary["coverage_warning"] = report["coverage"]["warning"]
    if report.get("warnings"):
        summary["warnings"] = report["warnings"]
    return summary


def _cmd_simulate(args) -> int:
    from .analytic import make_analytic_phantom
    from .phantom import default_roi, make_phantom
    from .simulate import simulate_scan

    roi = default_roi(args.phantom)
    if args.model == "analytic":
        phantom = make_analytic_phantom(args.phantom, seed=args.seed)
        if args.crop is not None:
            if args.crop < 1:
                raise ValueError(f"--crop must be at least 1 (a box around the ROI), got {args.crop}")
            phantom = phantom.cropped(roi.expanded(args.crop))
    elif args.crop is not None:
        raise ValueError("--crop needs --model analytic")
    else:
        phantom = make_phantom(args.phantom, seed=args.seed)
    with tqdm(total=args.views, desc="simulate", unit="view", file=sys.stderr,
              disable=args.progress == "none") as bar:
        path = simulate_scan(phantom, args.output, n_views=args.views, detector_px=args.detector, seed=args.seed,
                             transmission=args.transmission, i0=args.i0, roi=roi,
                             primary_range=tuple(args.primary_range), secondary_range=tuple(args.secondary_range),
                             field_of_view=args.field_of_view, reference_voxel_mm=args.reference_voxel,
                             progress=lambda done, total: bar.update(done - bar.n))
    print(str(path))
    return 0


def _cmd_evaluate(args) -> int:
    from .volume import json_text
    from .metrics import evaluate
    from .volume import Volume

    result = evaluate(Volume.read(args.reconstruction), Volume.read(args.reference), args.bone_threshold)
    print(json_text(result))
    return 0


def _cmd_demo(args) -> int:
    """Simulate a spine scan, reconstruct it within a few minutes, and write everything to look at."""
    from .volume import json_text
    from .output_folder import output_folder
    from .phantom import default_roi, make_phantom
    from .reconstruct import ReconstructionSettings
    from .simulate import simulate_scan

    out = Path(args.output)
    started = time.perf_counter()
    with output_folder(out, DEMO_KIND) as temporary:
        print(f"simulating a 20-view spine scan (seed {args.seed}) ...", file=sys.stderr)
        scan_dir = simulate_scan(make_phantom("spine", seed=args.seed), temporary / "scan", n_views=20,
                                 detector_px=128, seed=args.seed, roi=default_roi("spine"))
        settings = ReconstructionSettings(seed=args.seed, time_budget_s=args.time_budget, device=args.device)
        report = reconstruct_to_folder(scan_dir, temporary / "reconstruction", settings, None, "bar")
        summary = _summary(report, out / "reconstruction")
        summary["total_s"] = round(time.perf_counter() - started, 1)
        (temporary / "metrics.json").write_text(json_text(summary, indent=1))
    print(json_text(summary, indent=1))
    print(f"previews: {out / 'reconstruction' / 'previews'}", file=sys.stderr)
    print(f"report: {out / 'reconstruction' / 'report.html'}", file=sys.stderr)
    return 0


def _cmd_report(args) -> int:
    from .report_html import rebuild_report

    print(str(rebuild_report(args.output)))
    return 0


def _cmd_import_dicom(args) -> int:
    from .dicom import import_dicom

    print(str(import_dicom(args.folder, args.output, assume_sid_mm=args.assume_sid, assume_sod_mm=args.assume_sod,
                           assume_pixel_spacing_mm=args.assume_pixel_spacing)))
    return 0


def _cmd_calibrate(args) -> int:
    from .volume import json_text
    from .calibration import calibrate_scan

    path, report = calibrate_scan(args.images, args.phantom, args.output, max_rms_px=args.max_error)
    print(json_text({"output": str(path), "views": report["views"]}, indent=1))
    return 0


def _cmd_import_peer(args) -> int:
    from .peers import import_peer

    print(str(import_peer(args.path, args.output, args.format)))
    return 0


def _cmd_export_r2gaussian(args) -> int:
    from .peers import export_r2gaussian

    print(str(export_r2gaussian(args.scan, args.output)))
    return 0


def _cmd_make_standardization_data(args) -> int:
    from .standardize.pairs_data import make_standardization_data, pairs_from_scan

    if (args.scan is None) != (args.ct is None):
        raise ValueError("--scan and --ct go together (a site's own pairs: real views and DRRs of the registered CT)")
    if args.scan is not None:
        path = pairs_from_scan(args.scan, args.ct, args.output)
    else:
        with tqdm(total=args.pairs, desc="pairs", unit="pair", file=sys.stderr,
                  disable=args.progress == "none") as bar:
            path = make_standardization_data(args.output, args.pairs, seed=args.seed, detector_px=args.detector,
                                             progress=lambda done, total: bar.update(done - bar.n))
    print(str(path))
    return 0


def _cmd_train_standardizer(args) -> int:
    from .volume import json_text
    from .standardize.pix2pix import TrainSettings, train_standardizer

    settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, ngf=args.ngf, ndf=args.ngf,
                             seed=args.seed, checkpoint_every=args.checkpoint_every, device=args.device,
                             init_weights=args.init_weights)
    with tqdm(total=args.epochs, desc="train", unit="epoch", file=sys.stderr,
              disable=args.progress == "none") as bar:
        def report(epoch, epochs, row):
            bar.update(epoch - bar.n)
            bar.set_postfix(l1=f"{row['loss_g_l1']:.4f}", d=f"{row['loss_d']:.3f}")

        row = train_standardizer(args.data, args.output, settings, resume=args.resume, progress=report)
    print(json_text({"weights": str(args.output), **row}))
    return 0


def _cmd_standardize(args) -> int:
    from .standardize.pix2pix import standardize_scan_with

    print(str(standardize_scan_with(args.method, args.scan, args.output, args.weights, args.device)))
    return 0


@contextlib.contextmanager
def _reserved_output(args):
    """For a command that writes a folder (``output_kind`` set by the parser): check ``-o`` and hold
    its lock before any work (ixgs.output_folder), so a refusal comes first, not after the work."""
    if getattr(args, "output_kind", None) is None:
        yield
        return
    from .output_folder import reserve

    with reserve(args.output, args.output_kind, args.read_from(args)):
        yield


def _calibration_inputs(args) -> list:
    from .calibration import layout_source

    return [args.images, layout_source(args.phantom)]


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line refusal (no usage block): bad input reads the same everywhere."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"ixgs: error: {self.prog}: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    from .peers import SCENE_KIND
    from .kernels.choice import KERNELS
    from .reconstruct import DEVICES, INITS, METHODS, PRESETS, ReconstructionSettings
    from .scan import KIND as SCAN_KIND
    from .standardize.pairs_data import KIND as PAIRS_KIND
    from .training.clock import DEFAULT_TIME_BUDGET_S

    defaults = ReconstructionSettings()
    parser = _Parser(prog="ixgs", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ixgs {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="simulate a phantom scan, reconstruct it, write previews and metrics")
    demo.add_argument("-o", "--output", default="ixgs-demo", help="output folder (default: ixgs-demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--time-budget", type=finite_float,
                      help="seconds for the reconstruction (default: as ixgs reconstruct, by device)")
    demo.add_argument("--device", choices=DEVICES, default=defaults.device)
    demo.set_defaults(run=_cmd_demo)

    simulate = commands.add_parser("simulate", help="simulate a C-arm scan of a phantom")
    simulate.add_argument("--phantom", choices=("spine", "knee"), required=True)
    simulate.add_argument("--views", type=positive_int, default=20)
    simulate.add_argument("--detector", type=positive_int, default=128, help="detector size in pixels (square)")
    simulate.add_argument("--seed", type=int, default=0)
    simulate.add_argument("--transmission", action="store_true", help="raw detector counts with Poisson noise")
    simulate.add_argument("--i0", type=float, default=1e4, help="unattenuated counts per pixel of --transmission")
    simulate.add_argument("--model", choices=("analytic", "voxel"), default="analytic",
                          help="analytic: exact line integrals of an ellipsoid/cylinder phantom (no inverse crime); "
                               "voxel: the 1 mm CT phantom through the voxel ray marcher SART inverts")
    simulate.add_argument("--primary-range", type=float, nargs=2, metavar=("MIN", "MAX"), default=(-90.0, 90.0),
                          help="primary (LAO/RAO) angles, degrees, DICOM (default -90 90)")
    simulate.add_argument("--secondary-range", type=float, nargs=2, metavar=("MIN", "MAX"), default=(-30.0, 30.0),
                          help="secondary (cranial/caudal) angles, degrees, DICOM (default -30 30)")
    simulate.add_argument("--field-of-view", choices=("roi", "object"), default="roi",
                          help="roi: the detector sees 1.6x the ROI, the body is truncated; object: it sees the "
                               "whole object (coarser pixels)")
    simulate.add_argument("--reference-voxel", type=float, metavar="MM",
                          help="voxel of the reference volume (default: analytic, the ROI's longest side / 128; "
                               "voxel, 1 mm)")
    simulate.add_argument("--crop", type=float, metavar="FACTOR",
                          help="analytic only: keep the phantom inside the ROI grown by FACTOR (1: an object "
                               "wholly inside the ROI; with --field-of-view object, an untruncated scan)")
    simulate.add_argument("--progress", choices=("bar", "none"), default="bar")
    simulate.add_argument("-o", "--output", required=True)
    simulate.set_defaults(run=_cmd_simulate, output_kind=SCAN_KIND, read_from=lambda a: [])

    rec = commands.add_parser("reconstruct", help="reconstruct a scan into volume, bone label and coverage")
    rec.add_argument("scan")
    rec.add_argument("-o", "--output", required=True)
    rec.add_argument("--method", choices=METHODS, default=defaults.method)
    rec.add_argument("--preset", choices=tuple(PRESETS), default=defaults.preset)
    rec.add_argument("--iterations", type=int,
                     help="a fixed count, repeatable (no default time budget then); default: the preset's, "
                          "within the time budget")
    rec.add_argument("--voxel-size", type=finite_float, help="mm (default: ROI's longest side / 128)")
    rec.add_argument("--init", choices=INITS, default=defaults.init)
    rec.add_argument("--device", choices=DEVICES, default=defaults.device)
    rec.add_argument("--seed", type=int, default=defaults.seed)
    rec.add_argument("--time-budget", type=finite_float,
                     help="wall seconds, final stage included; the result so far is returned when spent "
                          "(default without --iterations: " + ", ".join(
                              f"{seconds:g} on {device}" for device, seconds in DEFAULT_TIME_BUDGET_S.items()) + ")")
    rec.add_argument("--gaussians", type=int, help="initial number of Gaussians (default: the preset's)")
    rec.add_argument("--roi", type=finite_float, nargs=6, metavar=("CX", "CY", "CZ", "SX", "SY", "SZ"),
                     help="box to reconstruct, LPS mm (default: the scan's)")
    rec.add_argument("--refine-poses", action="store_true",
                     help="experimental: learn a small rigid correction (6 DoF) of each view's pose, reported in "
                          "report.json; on sparse views it recovers only part of a pose error (see the README)")
    rec.add_argument("--views-per-step", type=int, default=defaults.views_per_step,
                     help="views rendered per optimiser step (more keeps a GPU busy)")
    rec.add_argument("--held-out-views", type=int, default=defaults.held_out_views, metavar="N",
                     help="views left out of the fit whose re-projection error picks when to stop and the "
                          "state returned (default %(default)s)")
    rec.add_argument("--no-plateau-stop", action="store_true",
                     help="run all iterations even when the loss has stopped falling")
    rec.add_argument("--compile", action="store_true",
                     help="with --kernel torch: fused kernels via torch.compile, faster long runs after a one-off compilation")
    rec.add_argument("--kernel", choices=KERNELS, default=defaults.kernel,
                     help="pair kernels: auto (Triton on CUDA, numba on a CPU, else torch), torch (the reference), "
                          "numba or triton")
    rec.add_argument("--memory-budget", type=finite_float, metavar="MIB",
                     help="memory the Gaussian/pixel pair work may hold at once (default: a quarter of free memory)")
    rec.add_argument("--bone-threshold", type=finite_float, help="1/mm (default: Otsu)")
    rec.add_argument("--checkpoint", type=Path, help="file to save the training state to, periodically")
    rec.add_argument("--resume", type=Path, help="checkpoint to continue from")
    rec.add_argument("--progress", choices=("bar", "json", "none"), default="bar")
    rec.add_argument("--no-previews", action="store_true",
                     help="skip the figures (previews/) and report.html (saves a few seconds)")
    rec.set_defaults(run=_cmd_reconstruct)

    rep = commands.add_parser("report", help="redraw the figures and report.html of an output folder")
    rep.add_argument("output", help="an output folder of ixgs reconstruct")
    rep.set_defaults(run=_cmd_report)

    ev = commands.add_parser("evaluate", help="3D PSNR, SSIM and bone Dice of a reconstruction against a reference")
    ev.add_argument("reconstruction")
    ev.add_argument("reference")
    ev.add_argument("--bone-threshold", type=finite_float, help="1/mm (default: Otsu of the reference)")
    ev.set_defaults(run=_cmd_evaluate)
    imp = commands.add_parser("import-dicom", help="import DICOM X-rays (XA, RF, DX, CR) with their C-arm geometry as a scan")
    imp.add_argument("folder")
    imp.add_argument("-o", "--output", required=True)
    imp.add_argument("--assume-sid", type=positive_float, metavar="MM", help="source-detector distance for files without it")
    imp.add_argument("--assume-sod", type=positive_float, metavar="MM", help="source-isocentre distance for files without it")
    imp.add_argument("--assume-pixel-spacing", type=positive_float, metavar="MM", help="detector pixel size for files without it")
    imp.set_defaults(run=_cmd_import_dicom, output_kind=SCAN_KIND, read_from=lambda a: [a.folder])

    cal = commands.add_parser("calibrate", help="calibrate each view's geometry from images of a bead phantom")
    cal.add_argument("images", help="scan folder or DICOM folder of phantom images (their geometry is the starting guess)")
    cal.add_argument("--phantom", default="helix", metavar="LAYOUT", help="'helix' (default phantom) or a bead layout JSON")
    cal.add_argument("--max-error", type=positive_float, default=1.0, metavar="PX", help="largest RMS reprojection error accepted")
    cal.add_argument("-o", "--output", required=True)
    cal.set_defaults(run=_cmd_calibrate, output_kind=SCAN_KIND, read_from=_calibration_inputs)

    peer = commands.add_parser("import-peer", help="import an R2-Gaussian scene, NAF/SAX-NeRF pickle or TIGRE folder")
    peer.add_argument("path")
    peer.add_argument("-o", "--output", required=True)
    peer.add_argument("--format", choices=("r2gaussian", "naf", "tigre"), required=True)
    peer.set_defaults(run=_cmd_import_peer, output_kind=SCAN_KIND, read_from=lambda a: [a.path])

    exp = commands.add_parser("export-r2gaussian", help="write a scan as an R2-Gaussian scene")
    exp.add_argument("scan")
    exp.add_argument("-o", "--output", required=True)
    exp.set_defaults(run=_cmd_export_r2gaussian, output_kind=SCENE_KIND, read_from=lambda a: [a.scan])
    data = commands.add_parser("make-standardization-data",
                               help="paired (realistic X-ray, bone-enhanced DRR) images to train the standardizer")
    data.add_argument("-o", "--output", required=True, help="output folder (manifest.json, inputs/, targets/)")
    data.add_argument("--pairs", type=int, default=320)
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--detector", type=int, default=128, help="image size in pixels (square)")
    data.add_argument("--scan", help="a site's own pairs: the real views of this scan ...")
    data.add_argument("--ct", help="... with DRRs of this registered CT (HU, same LPS frame, axis-aligned)")
    data.add_argument("--progress", choices=("bar", "none"), default="bar")
    data.set_defaults(run=_cmd_make_standardization_data, output_kind=PAIRS_KIND,
                      read_from=lambda a: [a.scan, a.ct])

    train = commands.add_parser("train-standardizer", help="train the pix2pix standardizer on a pairs folder")
    train.add_argument("data", help="folder written by make-standardization-data (or a site's pairs)")
    train.add_argument("-o", "--output", required=True,
                       help="weights file (.pt); <output>.sha256, .ckpt (resume) and .csv (losses) go beside it")
    train.add_argument("--epochs", type=int, default=100)
    train.add_argument("--batch-size", type=int, default=4)
    train.add_argument("--ngf", type=int, default=16, help="filters of the first layer (generator and discriminator)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--checkpoint-every", type=int, default=5, help="epochs")
    train.add_argument("--resume", action="store_true", help="continue from <output>.ckpt")
    train.add_argument("--init-weights", help="start the generator from these weights (fine-tuning on a site's pairs)")
    train.add_argument("--device", choices=DEVICES, default=defaults.device)
    train.add_argument("--progress", choices=("bar", "none"), default="bar")
    train.set_defaults(run=_cmd_train_standardizer)

    std = commands.add_parser("standardize", help="standardize a scan's views: same geometry, attenuation intensity")
    std.add_argument("scan")
    std.add_argument("-o", "--output", required=True)
    std.add_argument("--method", choices=("pix2pix", "classical"), default="pix2pix")
    std.add_argument("--weights", help="pix2pix weights (default: Resources/Weights/pix2pix_standardizer.pt)")
    std.add_argument("--device", choices=DEVICES, default=defaults.device)
    std.set_defaults(run=_cmd_standardize, output_kind=SCAN_KIND, read_from=lambda a: [a.scan, a.weights])
    return parser


class Cancelled(KeyboardInterrupt):
    """SIGINT or SIGTERM: unwinds like Ctrl-C, so every temporary output is removed on the way out."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _CancelRequest:
    """The signal that asked to cancel, kept after its exception: Python ignores a handler's exception
    raised while a finaliser runs, so the reconstruction also polls this flag at every step."""

    def __init__(self):
        self.signum: int | None = None

    def __call__(self) -> bool:
        return self.signum is not None


_cancel_request = _CancelRequest()


@contextlib.contextmanager
def _cancel_on_signals():
    """SIGTERM takes the same path as SIGINT; further signals wait until the cleanup is done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums = [signal.SIGINT, signal.SIGTERM]
    previous = {signum: signal.getsignal(signum) for signum in signums}

    def cancel(signum, frame):
        _cancel_request.signum = signum
        for other in signums:
            signal.signal(other, signal.SIG_IGN)
        raise Cancelled(signum)

    for signum in signums:
        signal.signal(signum, cancel)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _watch_parent() -> None:
    """Started by the Slicer module with stdin a pipe it never writes: its end closes when Slicer
    exits or dies, and the run then cancels itself instead of running on as an orphan."""
    stdin = sys.stdin.fileno()

    def watch():
        while os.read(stdin, 65536):  # unbuffered: no lock that would block the interpreter's exit
            pass
        _cancel_request.signum = signal.SIGTERM  # seen at the next step even if the main thread is in C code
        _thread.interrupt_main(signal.SIGTERM)

    threading.Thread(target=watch, name="ixgs-parent-watch", daemon=True).start()


def _report_bug(error: BaseException, argv: list[str]) -> int:
    """One line on stderr, the traceback in a log file (its path printed)."""
    message = " ".join(str(error).split()) or "no message"
    log = Path(tempfile.gettempdir()) / f"ixgs-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        log.write_text(f"ixgs {__version__}\nixgs {' '.join(argv)}\n\n"
                       + "".join(traceback.format_exception(type(error), error, error.__traceback__)))
        where = f"traceback in {log}"
    except OSError as problem:
        where = f"the traceback could not be written to {log} ({problem.strerror})"
    print(f"ixgs: internal error, a bug in ixgs ({type(error).__name__}: {message}); {where}; please report it",
          file=sys.stderr)
    return EXIT_BUG


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 done, 2 bad input (one line naming the file, field or option), 1 a bug in ixgs
    (one line, the traceback in a log file), 128 + signal number when cancelled (SIGINT, SIGTERM)."""
    from .errors import is_bad_input
    from .training.clock import ReconstructionCancelled

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    _cancel_request.signum = None
    with _cancel_on_signals():
        if os.environ.get(PARENT_WATCH_ENV) == "stdin":
            _watch_parent()
        try:
            with _reserved_output(args):
                return args.run(args)
        except KeyboardInterrupt as interrupt:
            print("ixgs: cancelled", file=sys.stderr)
            return 128 + getattr(interrupt, "signum", signal.SIGINT)
        except ReconstructionCancelled:  # a signal whose exception Python ignored; the flag still held
            print("ixgs: cancelled", file=sys.stderr)
            return 128 + (_cancel_request.signum or signal.SIGTERM)
        except MemoryError:
            print("ixgs: error: out of memory; choose smaller settings (reconstruct: a coarser --voxel-size, fewer "
                  "--gaussians, a smaller --memory-budget)", file=sys.stderr)
            return EXIT_BAD_INPUT
        except Exception as error:
            if not is_bad_input(error):
                return _report_bug(error, argv)
            message = " ".join(str(error).split()) or type(error).__name__
            print(f"ixgs: error: {message}", file=sys.stderr)
            return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
