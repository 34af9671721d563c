"""Reconstruction: radiative Gaussians (the paper's method) or SART, from a :class:`~ixgs.scan.Scan`.

The trainer follows R2-Gaussian (L1 + D-SSIM on projections, 3D TV on voxelized patches, Adam with
per-parameter learning rates, densification and pruning) with three changes for sparse, truncated,
intraoperative data on modest hardware:

* coarse-to-fine: early iterations see binned views (cheap, and large Gaussians fit them), later
  ones the full resolution;
* truncation: Gaussians live in a support box a little larger than the ROI, and a coarse voxel
  volume (about 1 cm voxels) models the attenuation further out, as far as the views reach, so
  tissue outside the ROI is explained in 3D instead of being pushed into it; only the ROI is
  returned;
* a wall-time budget that always returns the current result, a cancel flag, and checkpoints;
* optionally, small per-view rigid pose corrections learned with the Gaussians (:mod:`ixgs.poses`).

This module is the engine's entry point (settings, result, :func:`reconstruct`); the trainer itself
lives in :mod:`ixgs.training`, one concept per module.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .gaussians import GaussianModel
from .geometry import Grid, Roi, view_rays
from .kernels.choice import KERNELS, cpu_threads, resolve_kernel  # noqa: F401 (KERNELS: this module's API)
from .metrics import psnr
from .outputs import estimated_write_s
from .projector import forward_project, sample_volume
from .limits import check_memory, reconstruction_needs
from .scan import Scan, check_roi, check_roi_seen
from .training.checkpoint import check_checkpoint_path, fingerprint
# Progress, ReconstructionCancelled and PRESETS are part of this module's API; _binned is used by the benchmarks.
from .training.clock import (CancelFlag, Clock, Progress, ProgressCallback, ReconstructionCancelled,  # noqa: F401
                             effective_time_budget_s, threads_for_load)
from .training.config import PRESETS, TrainingConfig, default_config
from .training.grids import check_sources_outside, output_grid, support_padding
from .training.grids import sart_grid as _sart_grid
from .training.initialisation import run_sart
from .training.schedule import binned as _binned, binned_views  # noqa: F401
from .training.trainer import GaussianTrainer
from .volume import Volume
from .voxelize import voxelize

METHODS = ("gaussian", "sart")
INITS = ("random", "sart")
DEVICES = ("auto", "cpu", "cuda")
WRITES = ("nothing", "files", "previews")  # reconstruct(then_writes=...)


@dataclass
class ReconstructionSettings:
    """What a user chooses. ``None`` means the preset's or the scan's default."""

    method: str = "gaussian"
    preset: str = "standard"
    iterations: int | None = None
    voxel_size_mm: float | None = None
    # SART warm start: in CPU-sized runs it beat the paper's random start (README, "Benchmarks").
    init: str = "sart"
    device: str = "auto"
    seed: int = 0
    # Wall seconds; None: the device's default (training.clock.DEFAULT_TIME_BUDGET_S) unless
    # ``iterations`` is given, then none.
    time_budget_s: float | None = None
    gaussians: int | None = None
    roi: Roi | None = None
    # Gaussian support side / ROI side: room for anatomy just outside the ROI.
    support_factor: float = 1.2
    # SART's grid side / ROI side: SART has no other model of the tissue outside the ROI.
    sart_factor: float = 2.5
    # Longest side of the default grid, in voxels.
    default_grid_size: int = 128
    # Learn a small rigid correction of each view's pose with the Gaussians (method "gaussian").
    refine_poses: bool = False
    # Views rendered per optimiser step (their losses averaged): more keeps a GPU busy.
    views_per_step: int = 1
    # Views held out of the fit: their re-projection error picks the stopping point and the state
    # returned (ixgs.training.held_out); 0: all views are fitted and the loss plateau stops the run.
    held_out_views: int = 0
    # Stop once the loss stops falling, after densification (see GaussianTrainer.plateaued).
    stop_on_plateau: bool = True
    # Fused per-pair kernels through torch.compile: ~1.5-2x faster per iteration after a one-off
    # compilation of 7-30 s, so worth it for long runs; falls back to plain torch where it cannot work.
    compile: bool = False
    # Who evaluates the Gaussian/pixel and Gaussian/voxel pairs (ixgs.kernels.choice): auto = Triton on
    # CUDA, numba on a CPU (~5x less CPU time than plain torch), plain torch (the reference) where neither imports.
    kernel: str = "auto"
    # MiB the Gaussian/pixel pair work may hold at once (default: a quarter of the free memory, <= 4 GiB).
    memory_budget_mib: float | None = None
    checkpoint: Path | None = None
    checkpoint_every: int = 200
    resume: Path | None = None

    def validate(self) -> None:
        def bad(field_name, message):
            raise ValueError(f"setting '{field_name}': {message}")

        if self.method not in METHODS:
            bad("method", f"must be one of {METHODS}, got {self.method!r}")
        if self.preset not in PRESETS:
            bad("preset", f"must be one of {tuple(PRESETS)}, got {self.preset!r}")
        if self.init not in INITS:
            bad("init", f"must be one of {INITS}, got {self.init!r}")
        if self.device not in DEVICES:
            bad("device", f"must be one of {DEVICES}, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            bad("device", "'cuda' was asked for but no CUDA device is available")
        if self.kernel not in KERNELS:
            bad("kernel", f"must be one of {KERNELS}, got {self.kernel!r}")
        resolve_kernel(self.kernel, resolve_device(self.device))  # an explicit kernel that cannot run here
        for name in ("iterations", "gaussians", "checkpoint_every", "views_per_step"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                bad(name, f"must be a positive integer, got {value!r}")
        if not isinstance(self.held_out_views, int) or self.held_out_views < 0:
            bad("held_out_views", f"must be a non-negative integer, got {self.held_out_views!r}")
        for name in ("voxel_size_mm", "time_budget_s", "memory_budget_mib"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                bad(name, f"must be a positive number, got {value!r}")
        if self.roi is not None:
            check_roi(self.roi, "setting 'roi'")
        if self.refine_poses and self.method != "gaussian":
            bad("refine_poses", "pose refinement is learned with the Gaussians: it needs method 'gaussian'")
        for name in ("support_factor", "sart_factor"):
            if not getattr(self, name) >= 1.0:
                bad(name, f"must be >= 1, got {getattr(self, name)!r}")
        if self.checkpoint is not None:
            problem = check_checkpoint_path(self.checkpoint)
            if problem:
                bad("checkpoint", problem)
        if self.resume is not None and not Path(self.resume).is_file():
            bad("resume", f"{self.resume}: file not found")

    def to_dict(self) -> dict:
        values = asdict(self)
        values["roi"] = self.roi.to_dict() if self.roi is not None else None
        for name in ("checkpoint", "resume"):
            values[name] = str(values[name]) if values[name] is not None else None
        return values


@dataclass
class Reconstruction:
    volume: Volume  # attenuation (1/mm) on the ROI grid, LPS
    settings: dict
    elapsed_s: float
    stop_reason: str  # "completed", "time_budget", "plateau" or "held_out"
    loss_curve: list[tuple[int, float, float]] = field(default_factory=list)  # (iteration, loss, elapsed s)
    gaussians: int = 0
    device: str = "cpu"
    model: GaussianModel | None = None
    # A few views (index -> image) as the result sees them, and their mean PSNR to the measured ones (dB).
    reprojections: dict[int, np.ndarray] = field(default_factory=dict)
    reprojection_psnr: float = float("nan")
    peak_memory: dict = field(default_factory=dict)  # MiB, see peak_memory_mib
    # With refine_poses: per view, the correction (PoseCorrections.report) and the corrected matrix.
    pose_corrections: list[dict] = field(default_factory=list)
    training_config: dict = field(default_factory=dict)  # the trainer's hyperparameters (TrainingConfig)
    # Attenuation (1/mm) where TV stops looking (TrainingConfig.tv_clip_factor x the start's median); None: plain TV.
    tv_clip_per_mm: float | None = None
    # Wall time of each stage: {"name", "start_s", "end_s"}, seconds since the start.
    stages: list[dict] = field(default_factory=list)
    # One row per densification round: {"iteration", "elapsed_s", "cloned", "split", "pruned", "total"}.
    densification: list[dict] = field(default_factory=list)
    # With held-out views: which, their error at each measurement ([iteration, mean L1]) and the best one.
    held_out: dict = field(default_factory=dict)
    kernel: str = "torch"  # the kernel that rendered and voxelized (method "gaussian")
    ms_per_iteration: float = float("nan")  # median wall time of a training iteration



def reprojected_views(n_views: int, count: int = 4) -> list[int]:
    """Evenly spread views that are re-projected for the report and previews (rendering all costs too much)."""
    return sorted(set(np.linspace(0, n_views - 1, min(count, n_views)).round().astype(int).tolist()))


def peak_memory_mib(device: torch.device) -> dict:
    """Peak memory so far: the process's resident set (where the OS reports it) and, on CUDA, the
    largest amount torch allocated on the device."""
    peak = {}
    try:
        import resource  # not on Windows

        scale = 1024 if sys.platform != "darwin" else 1024 * 1024  # ru_maxrss: KiB on Linux, bytes on macOS
        peak["process_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale, 1)
    except ImportError:
        pass
    if device.type == "cuda":
        peak["cuda_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def reconstruction_grid(scan: Scan, settings: ReconstructionSettings) -> Grid:
    """The output grid: the ROI tiled at the chosen voxel size (default: longest side 128 voxels)."""
    return output_grid(scan, settings.roi, settings.voxel_size_mm, settings.default_grid_size)


def reconstruct(scan: Scan, settings: ReconstructionSettings | None = None,
                progress: ProgressCallback | None = None, cancel: CancelFlag | None = None,
                config: TrainingConfig | None = None, then_writes: str = "nothing") -> Reconstruction:
    """Reconstruct the scan's ROI. Raises :class:`ReconstructionCancelled` when ``cancel()`` is true.

    ``config``: the trainer's hyperparameters (default: :func:`~ixgs.training.config.default_config` of
    the settings' start). ``then_writes``: what the caller writes after this returns, within the same
    time budget: "nothing", "files" or "previews" (:func:`~ixgs.outputs.write_outputs` without or with
    its figures); the budget keeps back what writing it will cost."""
    if then_writes not in WRITES:
        raise ValueError(f"then_writes: must be one of {WRITES}, got {then_writes!r}")
    settings = settings or ReconstructionSettings()
    settings.validate()
    config = config or default_config(settings.init)
    device = resolve_device(settings.device)
    check_memory(reconstruction_needs(scan, settings), device)  # before any grid is built
    if settings.roi is not None:
        scan.warnings.extend(check_roi_seen(scan.views, settings.roi, "setting 'roi'"))
    start = time.perf_counter()
    grid = reconstruction_grid(scan, settings)
    check_sources_outside(scan, grid.padded(support_padding(grid, settings.support_factor)).roi)
    budget_s = effective_time_budget_s(settings.time_budget_s, settings.iterations, device.type)
    threads = None  # iteration-limited runs keep the threads they are given: repeatable
    if budget_s is not None and device.type == "cpu":
        threads = threads_for_load(torch.get_num_threads())
    with cpu_threads(threads, resolve_kernel(settings.kernel, device)):
        outputs_s = 0.0
        if budget_s is not None and then_writes != "nothing":
            outputs_s = estimated_write_s(grid, scan.reference_volume is not None, then_writes == "previews")
        return _reconstruct(scan, settings, device, grid, budget_s, config, start, progress, cancel, outputs_s)


def _reconstruct(scan: Scan, settings: ReconstructionSettings, device: torch.device, grid: Grid,
                 budget_s: float | None, config: TrainingConfig, start: float, progress: ProgressCallback | None,
                 cancel: CancelFlag | None, outputs_s: float) -> Reconstruction:
    clock = Clock(start, budget_s, progress, cancel)
    if settings.method == "sart":
        centers = torch.as_tensor(grid.voxel_centers(), dtype=torch.float32, device=device)
        sart_grid = _sart_grid(scan, grid, settings.sart_factor)
        with clock.stage("sart"):
            values = run_sart(binned_views(scan, 1), sart_grid, settings.iterations or 2, device, clock, settings.seed,
                              kernel=settings.kernel)
        with torch.no_grad(), clock.stage("resample"):
            volume = sample_volume(values, sart_grid, centers)
        with torch.no_grad(), clock.stage("reprojections"):
            reprojections = {index: forward_project(values, sart_grid, view_rays(
                scan.views[index].projection_matrix, scan.views[index].shape, device=device), kernel=settings.kernel)
                for index in reprojected_views(len(scan.views))}
        trainer = None
    else:
        trainer = GaussianTrainer(scan, settings, grid, device, clock, config,
                                  fingerprint(scan, grid, settings.to_dict(), config.to_dict()), outputs_s)
        trainer.run()
        clock.report("voxelize", 0, 1, trainer.last_loss)
        with torch.no_grad(), clock.stage("voxelize"):
            volume = voxelize(trainer.model, grid, memory_budget=trainer.memory_budget,
                              kernel=settings.kernel).clamp(min=0)
        with clock.stage("reprojections"):
            reprojections = trainer.reprojections(reprojected_views(len(scan.views)))
    reprojections = {index: image.detach().cpu().numpy() for index, image in reprojections.items()}
    elapsed = time.perf_counter() - start
    return Reconstruction(
        volume=Volume.on_grid(volume.detach().cpu().numpy().astype(np.float32), grid),
        settings={**settings.to_dict(), "time_budget_s": budget_s,
                  "time_budget_default": budget_s is not None and settings.time_budget_s is None,
                  "cpu_threads": torch.get_num_threads()},
        elapsed_s=elapsed,
        stop_reason=trainer.stop_reason if trainer else ("time_budget" if clock.over_budget() else "completed"),
        loss_curve=trainer.loss_curve if trainer else [],
        gaussians=len(trainer.model) if trainer else 0,
        device=str(device),
        model=trainer.model if trainer else None,
        reprojections=reprojections,
        reprojection_psnr=_mean_psnr(reprojections, scan),
        peak_memory=peak_memory_mib(device),
        pose_corrections=trainer.pose_report() if trainer else [],
        training_config=config.to_dict() if trainer else {},
        tv_clip_per_mm=trainer.tv_clip if trainer else None,
        stages=clock.stages,
        densification=trainer.densification if trainer else [],
        held_out=trainer.held_out.report() if trainer and trainer.held_out else {},
        kernel=resolve_kernel(settings.kernel, device) if trainer else "torch",
        ms_per_iteration=1000 * float(np.median(trainer.iteration_seconds)) if trainer and trainer.iteration_seconds
        else float("nan"),
    )


def _mean_psnr(reprojections: dict[int, np.ndarray], scan: Scan) -> float:
    """Mean 2D PSNR of re-projected views; views with a constant measured image are left out."""
    values = [psnr(image, scan.views[index].image) for index, image in reprojections.items()
              if np.ptp(scan.views[index].image) > 0]
    return float(np.mean(values)) if values else float("nan")


