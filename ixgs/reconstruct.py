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
"""
from __future__ import annotations

import math
import pickle
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .gaussians import GaussianModel
from .geometry import Grid, Roi, binning_matrix, view_rays
from .losses import projection_loss, total_variation_3d
from .metrics import psnr
from .poses import PoseCorrections, transform_rays
from .projector import forward_project, sample_volume
from .sart import sart_reconstruct
from .scan import Scan
from .splat import render
from .volume import Volume, atomic_path
from .voxelize import voxelize

METHODS = ("gaussian", "sart")
INITS = ("random", "sart")
DEVICES = ("auto", "cpu", "cuda")

# Per preset: iterations, initial Gaussians, cap on Gaussians.
PRESETS = {
    "fast": {"iterations": 400, "gaussians": 15_000, "max_gaussians": 60_000},
    "standard": {"iterations": 1000, "gaussians": 30_000, "max_gaussians": 120_000},
    "high": {"iterations": 3000, "gaussians": 50_000, "max_gaussians": 300_000},
}


class ReconstructionCancelled(RuntimeError):
    """Raised when the cancel flag is set; nothing is returned or written."""


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
    # Stop once the loss stops falling, after densification (see _GaussianTrainer.plateaued).
    stop_on_plateau: bool = True
    # Fused per-pair kernels through torch.compile: ~1.5-2x faster per iteration after a one-off
    # compilation of 7-30 s, so worth it for long runs; falls back to plain torch where it cannot work.
    compile: bool = False
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
        for name in ("iterations", "gaussians", "checkpoint_every", "views_per_step"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                bad(name, f"must be a positive integer, got {value!r}")
        for name in ("voxel_size_mm", "time_budget_s", "memory_budget_mib"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                bad(name, f"must be a positive number, got {value!r}")
        if self.refine_poses and self.method != "gaussian":
            bad("refine_poses", "pose refinement is learned with the Gaussians: it needs method 'gaussian'")
        for name in ("support_factor", "sart_factor"):
            if not getattr(self, name) >= 1.0:
                bad(name, f"must be >= 1, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        values = asdict(self)
        values["roi"] = self.roi.to_dict() if self.roi is not None else None
        for name in ("checkpoint", "resume"):
            values[name] = str(values[name]) if values[name] is not None else None
        return values


@dataclass
class Progress:
    """One progress report: ``stage`` is "sart", "gaussian" or "voxelize"."""

    stage: str
    iteration: int
    total: int
    loss: float
    elapsed_s: float
    eta_s: float


@dataclass
class Reconstruction:
    volume: Volume  # attenuation (1/mm) on the ROI grid, LPS
    settings: dict
    elapsed_s: float
    stop_reason: str  # "completed", "time_budget" or "plateau"
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    gaussians: int = 0
    device: str = "cpu"
    model: GaussianModel | None = None
    # A few views (index -> image) as the result sees them, and their mean PSNR to the measured ones (dB).
    reprojections: dict[int, np.ndarray] = field(default_factory=dict)
    reprojection_psnr: float = float("nan")
    peak_memory: dict = field(default_factory=dict)  # MiB, see peak_memory_mib
    # With refine_poses: per view, the correction (PoseCorrections.report) and the corrected matrix.
    pose_corrections: list[dict] = field(default_factory=list)


ProgressCallback = Callable[[Progress], None]
CancelFlag = Callable[[], bool]


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
    roi = settings.roi or scan.roi
    voxel = settings.voxel_size_mm or max(roi.size) / settings.default_grid_size
    return roi.grid(voxel)


def support_padding(grid: Grid, factor: float) -> tuple[int, int, int]:
    """Voxels (x, y, z) to add on each side so the support is ``factor`` times the ROI."""
    nx, ny, nz = grid.shape[::-1]
    return tuple(int(round(n * (factor - 1.0) / 2.0)) for n in (nx, ny, nz))


# The box modelled around the ROI (tissue outside it still attenuates every ray): OUTER_FACTOR times
# the ROI's longest side, kept well clear of the X-ray sources.
OUTER_FACTOR = 4.0
SOURCE_CLEARANCE = 0.45  # of the distance from the ROI centre to the nearest source, per half side
# SART reconstructs at SART_VOXEL_FACTOR times the output voxel, on its wider grid.
SART_VOXEL_FACTOR = 1.5


def surrounding_box(scan: Scan, roi: Roi, factor: float) -> Roi:
    """A cube around ``roi`` (``factor`` x its longest side) that no X-ray source comes near."""
    center = np.asarray(roi.center, float)
    nearest = min(float(np.linalg.norm(view.source - center)) for view in scan.views)
    side = min(factor * max(roi.size), 2 * SOURCE_CLEARANCE * nearest)
    return Roi(roi.center, (max(side, *roi.size),) * 3)


def reconstruct(scan: Scan, settings: ReconstructionSettings | None = None,
                progress: ProgressCallback | None = None, cancel: CancelFlag | None = None) -> Reconstruction:
    """Reconstruct the scan's ROI. Raises :class:`ReconstructionCancelled` when ``cancel()`` is true."""
    settings = settings or ReconstructionSettings()
    settings.validate()
    device = resolve_device(settings.device)
    start = time.perf_counter()
    grid = reconstruction_grid(scan, settings)
    support_grid = grid.padded(support_padding(grid, settings.support_factor))
    _check_sources_outside(scan, support_grid.roi)
    clock = _Clock(start, settings.time_budget_s, progress, cancel)
    centers = torch.as_tensor(grid.voxel_centers(), dtype=torch.float32, device=device)
    if settings.method == "sart":
        sart_grid = _sart_grid(scan, grid, settings.sart_factor)
        values = _sart(_binned_views(scan, 1), sart_grid, settings.iterations or 2, device, clock, settings.seed)
        with torch.no_grad():
            volume = sample_volume(values, sart_grid, centers)
            reprojections = {index: forward_project(values, sart_grid, view_rays(
                scan.views[index].projection_matrix, scan.views[index].shape, device=device))
                for index in reprojected_views(len(scan.views))}
        trainer = None
        loss_curve: list = []
    else:
        trainer = _GaussianTrainer(scan, settings, support_grid, device, clock)
        trainer.run()
        clock.report("voxelize", 0, 1, trainer.last_loss)
        with torch.no_grad():
            volume = voxelize(trainer.model, grid, memory_budget=trainer.memory_budget).clamp(min=0)
        reprojections = trainer.reprojections(reprojected_views(len(scan.views)))
        loss_curve = trainer.loss_curve
    reprojections = {index: image.detach().cpu().numpy() for index, image in reprojections.items()}
    elapsed = time.perf_counter() - start
    return Reconstruction(
        volume=Volume.on_grid(volume.detach().cpu().numpy().astype(np.float32), grid),
        settings=settings.to_dict(),
        elapsed_s=elapsed,
        stop_reason=trainer.stop_reason if trainer else ("time_budget" if clock.over_budget() else "completed"),
        loss_curve=loss_curve,
        gaussians=len(trainer.model) if trainer else 0,
        device=str(device),
        model=trainer.model if trainer else None,
        reprojections=reprojections,
        reprojection_psnr=_mean_psnr(reprojections, scan),
        peak_memory=peak_memory_mib(device),
        pose_corrections=trainer.pose_report() if trainer else [],
    )


def _mean_psnr(reprojections: dict[int, np.ndarray], scan: Scan) -> float:
    """Mean 2D PSNR of re-projected views; views with a constant measured image are left out."""
    values = [psnr(image, scan.views[index].image) for index, image in reprojections.items()
              if np.ptp(scan.views[index].image) > 0]
    return float(np.mean(values)) if values else float("nan")


def _sart_grid(scan: Scan, grid: Grid, factor: float) -> Grid:
    """SART's grid: wide enough for most tissue the views cross, coarse enough to stay affordable."""
    return surrounding_box(scan, grid.roi, factor).grid(SART_VOXEL_FACTOR * max(grid.spacing))


def _check_sources_outside(scan: Scan, support: Roi) -> None:
    for index, view in enumerate(scan.views):
        if support.contains(view.source):
            raise ValueError(f"view {index} ({view.name}): the X-ray source lies inside the reconstruction "
                             "support; use a smaller ROI or support factor")


class _Clock:
    """Elapsed time, the budget, progress reports and the cancel flag, in one place."""

    def __init__(self, start: float, budget_s: float | None, progress: ProgressCallback | None,
                 cancel: CancelFlag | None):
        self.start, self.budget_s, self.progress, self.cancel = start, budget_s, progress, cancel

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over_budget(self, reserve_s: float = 0.0) -> bool:
        return self.budget_s is not None and self.elapsed() + reserve_s >= self.budget_s

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel():
            raise ReconstructionCancelled("reconstruction cancelled")

    def report(self, stage: str, iteration: int, total: int, loss: float) -> None:
        self.check_cancel()
        if self.progress is None:
            return
        elapsed = self.elapsed()
        eta = elapsed / max(iteration, 1) * (total - iteration) if iteration else float("nan")
        if self.budget_s is not None:
            eta = min(eta, max(self.budget_s - elapsed, 0.0)) if math.isfinite(eta) else self.budget_s - elapsed
        self.progress(Progress(stage, iteration, total, float(loss), elapsed, eta))


def _sart(views: list[tuple[np.ndarray, np.ndarray]], grid: Grid, iterations: int, device: torch.device,
          clock: _Clock, seed: int, budget_fraction: float = 1.0) -> torch.Tensor:
    budget = None if clock.budget_s is None else max(clock.budget_s * budget_fraction - clock.elapsed(), 1e-3)
    values = sart_reconstruct(
        views, grid, iterations, device=device,
        progress=lambda i, n, residual: clock.report("sart", i, n, residual),
        cancel=clock.cancel, time_budget_s=budget, seed=seed)
    clock.check_cancel()  # SART returns early on a cancel; the reconstruction must not go on
    return values


@dataclass
class _Level:
    """The views at one resolution: binned images and their rays."""

    factor: int
    images: list[torch.Tensor]
    rays: list


def _binned(image: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor`` x ``factor`` blocks (a trailing partial block is dropped)."""
    rows, cols = (s // factor * factor for s in image.shape)
    blocks = image[:rows, :cols].reshape(rows // factor, factor, cols // factor, factor)
    return blocks.mean(axis=(1, 3))


def _binned_views(scan: Scan, factor: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, projection matrix) of every view, binned ``factor`` x ``factor``."""
    return [(_binned(view.image, factor), binning_matrix(factor) @ view.projection_matrix) for view in scan.views]


class _GaussianTrainer:
    """Optimises Gaussians (and the coarse outer volume) against the views; see the module docstring."""

    LEARNING_RATES = {"position": 2e-3, "scale": 5e-3, "rotation": 1e-3, "density": 2e-2}
    FINAL_LR_FRACTION = 0.1
    OUTER_LR = 5e-4  # 1/mm per step
    OUTER_CELLS = 40  # voxels along each side of the outer volume
    DSSIM_WEIGHT = 0.25
    TV_WEIGHT = 0.05
    TV_PATCH = 16  # voxels per side, on a grid twice as coarse as the output (cost grows with voxels per Gaussian)
    TV_COARSENING = 2
    DENSIFY_EVERY = 50
    DENSIFY_FROM, DENSIFY_UNTIL = 0.1, 0.6  # fractions of the run
    # Densify the Gaussians with the largest mean positional gradient: the top DENSIFY_FRACTION each
    # round (gradients of all Gaussians are of one order here, so a fixed threshold clones all or none).
    DENSIFY_FRACTION = 0.1
    MIN_LEVEL_PIXELS = 32
    FINAL_STAGE_FRACTION = 0.15  # of a time budget, kept for the final voxelization and re-projections
    POSE_LR = 0.1  # mm (and mm of arc at the ROI's half side) per step of the view's own Adam state
    POSE_FROM = 0.1  # fraction of the run: poses move once the coarse shape has formed
    PLATEAU_WINDOW = 50  # steps, at least
    PLATEAU_TOLERANCE = 0.002  # relative fall of the windowed mean loss below which the run stops

    def __init__(self, scan: Scan, settings: ReconstructionSettings, support_grid: Grid, device: torch.device,
                 clock: _Clock):
        self.scan, self.settings, self.device, self.clock = scan, settings, device, clock
        self.support_grid = support_grid
        support = support_grid.roi
        self.tv_grid = support.grid(self.TV_COARSENING * max(support_grid.spacing))
        outer = surrounding_box(scan, support, OUTER_FACTOR / settings.support_factor)
        self.outer_grid = outer.grid(max(outer.size) / self.OUTER_CELLS)
        # The outer volume stops where the Gaussians' support begins: one owner per region.
        self.outer_mask = torch.as_tensor(~support.contains(self.outer_grid.voxel_centers()), dtype=torch.float32,
                                          device=device)
        preset = PRESETS[settings.preset]
        self.iterations = settings.iterations or preset["iterations"]
        self.max_gaussians = max(preset["max_gaussians"], settings.gaussians or 0)
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.levels = self._levels()
        self.loss_curve: list[tuple[int, float]] = []
        self.last_loss = float("nan")
        self.iteration = 0
        self.stop_reason = "completed"
        self.iteration_seconds: list[float] = []
        self.queue: list[int] = []  # views still to come in this pass
        self.memory_budget = None if settings.memory_budget_mib is None else int(settings.memory_budget_mib * 2**20)
        self.densified_until: int | None = None  # the step densification ended at
        self.model, outer_values = self._initial_state(preset)
        self.outer = outer_values.to(device).requires_grad_(True)
        self.poses = (PoseCorrections(len(scan.views), support.center, lever_mm=max(support.size) / 2).to(device)
                      if settings.refine_poses else None)
        self.optimizer = self._optimizer()
        if settings.resume is not None:
            self._load(settings.resume)

    # ----- set-up ---------------------------------------------------------------------------------
    def _levels(self) -> list[_Level]:
        """Resolution levels, coarsest first: halving until the smaller image side nears 32 px."""
        smallest = min(min(view.image.shape) for view in self.scan.views)
        factors = [1]
        while smallest // (factors[-1] * 2) >= self.MIN_LEVEL_PIXELS and len(factors) < 3:
            factors.append(factors[-1] * 2)
        levels = []
        for factor in reversed(factors):
            views = _binned_views(self.scan, factor)
            levels.append(_Level(factor, [torch.as_tensor(image, dtype=torch.float32, device=self.device)
                                          for image, _ in views],
                                 [view_rays(matrix, image.shape, device=self.device) for image, matrix in views]))
        return levels

    def _initial_state(self, preset: dict) -> tuple[GaussianModel, torch.Tensor]:
        """Gaussians in the support and the outer volume: from SART, or random and uniform."""
        n = self.settings.gaussians or preset["gaussians"]
        support = self.support_grid.roi
        if self.settings.init == "sart":
            # The SART of method "sart" (its box and voxel): the Gaussians fit it on the output grid,
            # deterministically, so the run starts no worse than SART (up to what n Gaussians hold).
            sart_grid = _sart_grid(self.scan, self.support_grid, self.settings.sart_factor / self.settings.support_factor)
            values = _sart(_binned_views(self.scan, 1), sart_grid, 2, self.device, self.clock, self.settings.seed,
                           budget_fraction=0.25)
            inner = sample_volume(values, sart_grid, torch.as_tensor(self.support_grid.voxel_centers(),
                                                                    dtype=values.dtype, device=values.device))
            model = GaussianModel.from_volume_deterministic(inner, self.support_grid, n, support)
            # Zero beyond SART's box, as SART has it: the outer volume learns the rest.
            outer = sample_volume(values, sart_grid, torch.as_tensor(self.outer_grid.voxel_centers(),
                                                                     dtype=values.dtype, device=values.device))
            return model.to(self.device), outer
        # Uniform start at the mean attenuation the views imply: line integral / path length.
        mean_path_mm = float(np.mean(self.outer_grid.roi.size))
        mean_attenuation = float(np.mean([view.image.mean() for view in self.scan.views])) / mean_path_mm
        mean_attenuation = max(mean_attenuation, 1e-3)
        model = GaussianModel.random(support, n, self.generator, density=0.5 * mean_attenuation, device=self.device)
        return model, torch.full(self.outer_grid.shape, mean_attenuation)

    def _optimizer(self) -> torch.optim.Adam:
        groups = self.model.parameter_groups(self.LEARNING_RATES)
        groups.append({"params": [self.outer], "lr": self.OUTER_LR, "name": "outer"})
        if self.poses is not None:
            # One parameter per view: Adam skips the views without a gradient, so each view's
            # correction moves only when that view is rendered.
            groups.append({"params": list(self.poses.parameters()), "lr": self.POSE_LR, "name": "poses"})
        for group in groups:
            group["initial_lr"] = group["lr"]
        return torch.optim.Adam(groups, eps=1e-15)

    # ----- schedule -------------------------------------------------------------------------------
    def _progress_fraction(self) -> float:
        """How far the run is, 0..1: by iterations, or by the time budget when that ends it sooner.

        The schedules (resolution levels, learning-rate decay, densification window) follow this, so
        a run cut short by its budget still goes through all of them."""
        fraction = self.iteration / self.iterations
        if self.clock.budget_s is not None:
            training_s = (1.0 - self.FINAL_STAGE_FRACTION) * self.clock.budget_s
            fraction = max(fraction, self.clock.elapsed() / training_s)
        return min(fraction, 1.0)

    def _level_at(self, fraction: float) -> _Level:
        """Coarse levels take the first 40 % of the run, equally; the finest the rest."""
        coarse = self.levels[:-1]
        index = int(fraction / 0.4 * len(coarse)) if coarse else 0
        return self.levels[min(index, len(self.levels) - 1)]

    def _set_learning_rates(self, fraction: float) -> None:
        decay = self.FINAL_LR_FRACTION ** fraction
        for group in self.optimizer.param_groups:
            if group["name"] in ("position", "outer", "poses"):
                group["lr"] = group["initial_lr"] * decay

    # ----- the loop -------------------------------------------------------------------------------
    def run(self) -> None:
        grad_accum = torch.zeros(len(self.model), device=self.device)
        seen = torch.zeros(len(self.model), device=self.device)
        while self.iteration < self.iterations:
            if self.clock.over_budget(reserve_s=self._voxelize_reserve_s()):
                self.stop_reason = "time_budget"
                break
            if self.settings.stop_on_plateau and self.plateaued():
                self.stop_reason = "plateau"
                break
            it = self.iteration
            started = time.perf_counter()
            fraction = self._progress_fraction()
            level = self._level_at(fraction)
            self._set_learning_rates(fraction)
            self.optimizer.zero_grad(set_to_none=True)
            views = self._next_views()
            visible = torch.zeros(len(self.model), dtype=torch.bool, device=self.device)
            loss = self.TV_WEIGHT * self._tv_loss()
            for index in views:
                pose = self._pose(index) if fraction >= self.POSE_FROM else None
                rendered, radii = self._project(level.rays[index], pose)
                loss = loss + projection_loss(rendered, level.images[index], self.DSSIM_WEIGHT) / len(views)
                visible |= radii > 0
            loss.backward()
            with torch.no_grad():
                grad_accum[visible] += self.model._position.grad[visible].norm(dim=1)
                seen[visible] += 1
            self.optimizer.step()
            with torch.no_grad():
                self.outer.clamp_(min=0.0)
            if self.poses is not None:
                self.poses.remove_common_motion()
            self.last_loss = loss.item()
            self.iteration_seconds.append(time.perf_counter() - started)
            self.loss_curve.append((it, self.last_loss))
            self.iteration = it + 1
            if fraction > self.DENSIFY_UNTIL and self.densified_until is None:
                self.densified_until = self.iteration
            if self.DENSIFY_FROM <= fraction <= self.DENSIFY_UNTIL and self.iteration % self.DENSIFY_EVERY == 0:
                mean_gradient = grad_accum / seen.clamp(min=1)
                threshold = float(torch.quantile(mean_gradient, 1.0 - self.DENSIFY_FRACTION))
                self.model.densify_and_prune(self.optimizer, mean_gradient, max(threshold, 1e-12),
                                             max(self.support_grid.spacing), self.max_gaussians)
                grad_accum = torch.zeros(len(self.model), device=self.device)
                seen = torch.zeros(len(self.model), device=self.device)
            if self.settings.checkpoint is not None and self.iteration % self.settings.checkpoint_every == 0:
                self._save(self.settings.checkpoint)
            self.clock.report("gaussian", self.iteration, self.iterations, self.last_loss)

    def _next_views(self) -> list[int]:
        """The next ``views_per_step`` views from a stream of seeded permutations: every view once
        per pass, in a fresh random order each pass."""
        views = []
        while len(views) < self.settings.views_per_step:
            if not self.queue:
                self.queue = torch.randperm(len(self.scan.views), generator=self.generator).tolist()
            views.append(self.queue.pop(0))
        return views

    def plateaued(self) -> bool:
        """Whether the loss has stopped falling: since densification ended, the mean loss over the
        last window (two passes over the views, at least PLATEAU_WINDOW steps) is within
        PLATEAU_TOLERANCE of the window before. Single steps are too noisy (one view each)."""
        if self.densified_until is None:
            return False
        passes = 2 * math.ceil(len(self.scan.views) / self.settings.views_per_step)
        window = max(passes, self.PLATEAU_WINDOW)
        losses = [loss for _, loss in self.loss_curve[self.densified_until:]]
        if len(losses) < 2 * window:
            return False
        recent, before = np.mean(losses[-window:]), np.mean(losses[-2 * window:-window])
        return bool(before - recent < self.PLATEAU_TOLERANCE * before)

    def _project(self, rays, pose: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The view as the model sees it (Gaussians plus the outer volume) and the Gaussians' footprint radii."""
        image, radii = render(self.model, rays, return_radii=True, pose=pose, memory_budget=self.memory_budget,
                              compile=self.settings.compile)
        return image + self._outer_projection(rays, pose), radii

    def _pose(self, index: int) -> torch.Tensor | None:
        """View ``index``'s learned rigid correction (4, 4), or None without pose refinement."""
        return self.poses.matrix(index) if self.poses is not None else None

    def _outer_projection(self, rays, pose: torch.Tensor | None = None) -> torch.Tensor:
        """Line integrals through the outer volume (attenuation beyond the Gaussians' support)."""
        if pose is not None:
            rays = transform_rays(rays, pose)
        return forward_project(self.outer * self.outer_mask, self.outer_grid, rays)

    @torch.no_grad()
    def reprojections(self, indices: list[int]) -> dict[int, torch.Tensor]:
        """Views ``indices`` at full resolution as the model (with the outer volume) sees them."""
        rays = self.levels[-1].rays
        return {index: self._project(rays[index], self._pose(index))[0] for index in indices}

    def pose_report(self) -> list[dict]:
        """Per view: name, correction and corrected projection matrix; empty without refinement."""
        if self.poses is None:
            return []
        return [{"view": view.name, **row, "projection_matrix": self.poses.corrected_matrix(
                    index, view.projection_matrix).round(9).tolist()}
                for index, (view, row) in enumerate(zip(self.scan.views, self.poses.report()))]

    def _tv_loss(self) -> torch.Tensor:
        """3D TV of a random patch of the support, in units of attenuation x half the support side
        (R2-Gaussian's normalised scene), so the weight means what it means there."""
        shape = self.tv_grid.shape
        size = [min(self.TV_PATCH, n) for n in shape]
        corner = [int(torch.randint(0, n - s + 1, (1,), generator=self.generator)) for n, s in zip(shape, size)]
        region = tuple(slice(c, c + s) for c, s in zip(corner, size))
        patch = voxelize(self.model, self.tv_grid, region=region, memory_budget=self.memory_budget)
        return total_variation_3d(patch * self.model.half_extent)

    def _voxelize_reserve_s(self) -> float:
        """Time kept back from the budget for the final voxelization and re-projections: measured,
        they take about 10-25 % of a 3-minute CPU budget at 128^3, plus a few iterations' worth."""
        if self.clock.budget_s is None:
            return 0.0
        recent = self.iteration_seconds[-10:]
        return self.FINAL_STAGE_FRACTION * self.clock.budget_s + 4.0 * (sum(recent) / len(recent) if recent else 0.0)

    # ----- checkpoints ----------------------------------------------------------------------------
    def _save(self, path: Path) -> None:
        state = {
            "iteration": self.iteration,
            "model": self.model.state_dict(),
            "outer": self.outer.detach().cpu(),
            "poses": self.poses.state_dict() if self.poses is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "loss_curve": self.loss_curve,
            "settings": self.settings.to_dict(),
        }
        with atomic_path(path) as temporary:
            torch.save(state, temporary)

    def _load(self, path: Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"resume checkpoint {path}: file not found")
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
            self.model = GaussianModel.from_state_dict(state["model"]).to(self.device)
            with torch.no_grad():
                self.outer.copy_(state["outer"])
            if (state.get("poses") is not None) != (self.poses is not None):
                raise ValueError("it was made with a different refine_poses setting")
            if self.poses is not None:
                self.poses.load_state_dict(state["poses"])
            self.optimizer = self._optimizer()
            self.optimizer.load_state_dict(state["optimizer"])
            self.generator.set_state(state["generator"])
            self.iteration = int(state["iteration"])
            self.loss_curve = [tuple(item) for item in state["loss_curve"]]
        except (KeyError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as error:
            raise ValueError(f"resume checkpoint {path}: not a usable IXGS checkpoint ({error})") from None
