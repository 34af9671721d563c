"""The training loop: Gaussians (and the outer volume, and optionally the poses) fitted to the views.

Per step: the schedule gives the resolution level and the learning rates; the next views of a seeded
stream are rendered; loss = L1 + D-SSIM on the projections + TV on a random patch (of the attenuation
clipped above the soft-tissue level); Adam steps; every few steps the Gaussians with the largest
positional gradients are densified and faint ones pruned. The run ends at its iteration count, its
time budget (keeping time back for the final stage) or when the loss plateaus after densification.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from ..gaussians import GaussianModel
from ..geometry import Grid
from ..losses import projection_loss, total_variation_3d
from ..poses import PoseCorrections
from ..scan import Scan
from ..splat import render
from ..voxelize import voxelize
from .checkpoint import load_checkpoint, save_checkpoint
from .clock import Clock
from .config import PRESETS, TrainingConfig, default_config
from .grids import OUTER_FACTOR, support_padding, surrounding_box
from .held_out import HeldOutViews, held_out_indices
from .initialisation import random_start, sart_start
from .outer_volume import OuterVolume
from .schedule import Level, Schedule, resolution_levels


class GaussianTrainer:
    """Optimises Gaussians (and the coarse outer volume) against the views; see the module docstring."""

    def __init__(self, scan: Scan, settings, grid: Grid, device: torch.device, clock: Clock,
                 config: TrainingConfig | None = None, fingerprint: dict | None = None, outputs_s: float = 0.0):
        """``grid``: the output grid; ``outputs_s``: the measured estimate of writing the outputs, kept
        back from a time budget with the final voxelization and re-projections."""
        self.scan, self.settings, self.device, self.clock = scan, settings, device, clock
        self.config = config = config or default_config(settings.init)
        self.fingerprint = fingerprint or {}
        self.grid, self.outputs_s = grid, outputs_s
        self.support_grid = support_grid = grid.padded(support_padding(grid, settings.support_factor))
        support = support_grid.roi
        self.tv_grid = support.grid(config.tv_coarsening * max(support_grid.spacing))
        outer_box = surrounding_box(scan, support, OUTER_FACTOR / settings.support_factor)
        self.outer_grid = outer_box.grid(max(outer_box.size) / config.outer_cells)
        preset = PRESETS[settings.preset]
        self.iterations = settings.iterations or preset["iterations"]
        self.max_gaussians = max(preset["max_gaussians"], settings.gaussians or 0)
        self.generator = torch.Generator().manual_seed(settings.seed)
        with clock.stage("views"):
            self.levels = resolution_levels(scan, config, device)
        self.schedule = Schedule(config, self.iterations, clock)
        self.loss_curve: list[tuple[int, float, float]] = []  # (iteration, loss, elapsed s)
        self.densification: list[dict] = []  # one row per round: iteration, elapsed s, counts
        self.last_loss = float("nan")
        self.iteration = 0
        self.fraction = 0.0  # how far the run was at its last step (Schedule.fraction)
        self.stop_reason = "completed"
        self.iteration_seconds: list[float] = []
        self.training_s = 0.0  # the schedule's clock: training steps only, compilation excluded
        # Measured costs, seconds per voxel voxelized and per pixel rendered (forward): the final stage's estimate.
        self.voxel_seconds: list[float] = []
        self.pixel_seconds: list[float] = []
        self.queue: list[int] = []  # views still to come in this pass
        self.held_out = HeldOutViews(held_out_indices(len(scan.views), settings.held_out_views),
                                     config.held_out_patience)
        self.fit_views = [i for i in range(len(scan.views)) if i not in self.held_out.indices]
        self.memory_budget = None if settings.memory_budget_mib is None else int(settings.memory_budget_mib * 2**20)
        self.densified_until: int | None = None  # the step densification ended at
        self._level_stage: dict | None = None  # the clock's record of the level in progress
        self._densified_since_measure = False
        state = load_checkpoint(settings.resume, device, self.fingerprint) if settings.resume is not None else None
        if state is not None:  # the warm start is not recomputed: the checkpoint holds its result
            model, outer_values = GaussianModel.from_state_dict(state["model"]).to(device), state["outer"]["values"]
        else:
            with clock.stage("warm_start"):
                model, outer_values = self._initial_state(preset)
        self.model = model
        # Attenuation (1/mm) above which TV stops looking: fixed at the start, kept by a checkpoint.
        self.tv_clip = state.get("tv_clip") if state is not None else self._tv_clip()
        self.outer = OuterVolume(self.outer_grid, support, outer_values.to(device))
        self.poses = (PoseCorrections(len(scan.views), support.center, lever_mm=max(support.size) / 2).to(device)
                      if settings.refine_poses else None)
        with clock.stage("optimiser"):  # the first Adam of a process imports torch._dynamo: seconds
            self.optimizer = self._optimizer()
        self.grad_accum = torch.zeros(len(self.model), device=device)
        self.seen = torch.zeros(len(self.model), device=device)
        if state is not None:
            self._restore(state)

    # ----- set-up ---------------------------------------------------------------------------------
    def _initial_state(self, preset: dict) -> tuple[GaussianModel, torch.Tensor]:
        n = self.settings.gaussians or preset["gaussians"]
        support = self.support_grid.roi
        if self.settings.init == "sart":
            # SART's box relative to the ROI, as method "sart" has it, from the support grid.
            return sart_start(self.scan, self.support_grid, self.outer_grid, n, self.device, self.clock,
                              self.settings.seed, self.config, self.settings.sart_factor / self.settings.support_factor,
                              self.settings.kernel)
        return random_start(self.scan, support, self.outer_grid, n, self.generator, self.device)

    def _optimizer(self) -> torch.optim.Adam:
        config = self.config
        groups = self.model.parameter_groups(config.learning_rates)
        groups.append({"params": [self.outer.values], "lr": config.outer_lr, "name": "outer"})
        if self.poses is not None:
            # One parameter per view: Adam skips the views without a gradient, so each view's
            # correction moves only when that view is rendered.
            groups.append({"params": list(self.poses.parameters()), "lr": config.pose_lr, "name": "poses"})
        for group in groups:
            group["initial_lr"] = group["lr"]
        # fused: one kernel per group (the per-tensor loop took a few ms a step at 150k Gaussians on a CPU).
        return torch.optim.Adam(groups, eps=1e-15, fused=True)

    # ----- the loop -------------------------------------------------------------------------------
    def run(self) -> None:
        config = self.config
        level_index = None
        while self.iteration < self.iterations:
            if self.clock.over_budget(reserve_s=self.final_stage_reserve_s()):
                self.stop_reason = "time_budget"
                break
            if self.settings.stop_on_plateau and not self.held_out and self.plateaued():
                self.stop_reason = "plateau"
                break
            it = self.iteration
            if self.clock.budget_s is not None and (it % 50 == 0 or self._densified_since_measure):
                self._measure_voxelization()
                self._densified_since_measure = False
            started = time.perf_counter()
            fraction = self.schedule.fraction(it, self.training_s, self.final_stage_reserve_s())
            index = self.schedule.level_index(fraction, len(self.levels))
            first_at_level = index != level_index
            if first_at_level:
                self._enter_level(index)
                level_index = index
            level = self.levels[index]
            self.schedule.set_learning_rates(self.optimizer, fraction)
            self.optimizer.zero_grad(set_to_none=True)
            views = self._next_views()
            visible = torch.zeros(len(self.model), dtype=torch.bool, device=self.device)
            loss = config.tv_weight * self._tv_loss()
            if config.outer_tv_weight:
                loss = loss + config.outer_tv_weight * total_variation_3d(self.outer.values * self.model.half_extent)
            rendering = time.perf_counter()
            for view in views:
                pose = self._pose(view) if fraction >= config.pose_from else None
                rendered, radii = self._project(level, view, pose)
                loss = loss + projection_loss(rendered, level.images[view], config.dssim_weight) / len(views)
                visible |= radii > 0
            self._measure(self.pixel_seconds, time.perf_counter() - rendering,
                          sum(level.images[view].numel() for view in views))
            loss.backward()
            with torch.no_grad():
                self.grad_accum[visible] += self.model._position.grad[visible].norm(dim=1)
                self.seen[visible] += 1
            self.optimizer.step()
            self.outer.clamp_()
            if self.poses is not None:
                self.poses.remove_common_motion()
            self.last_loss = loss.item()
            self._count_step(time.perf_counter() - started, first_at_level)
            self.loss_curve.append((it, self.last_loss, round(self.clock.elapsed(), 3)))
            self.iteration, self.fraction = it + 1, fraction
            if fraction > config.densify_until and self.densified_until is None:
                self.densified_until = self.iteration
            if self.schedule.densifies(fraction, self.iteration,
                                       self.densification[-1]["iteration"] if self.densification else 0):
                self._densify()
            if self.held_out and self.iteration % self._pass_steps() == 0:
                self._measure_held_out(keep_best=index == len(self.levels) - 1)
                if fraction > config.densify_until and self.held_out.stopped_improving():
                    self.stop_reason = "held_out"
                    self.clock.report("gaussian", self.iteration, self.iterations, self.last_loss)
                    break
            if self.settings.checkpoint is not None and self.iteration % self.settings.checkpoint_every == 0:
                self.save(self.settings.checkpoint)
            self.clock.report("gaussian", self.iteration, self.iterations, self.last_loss)
        self._end_level()
        self._return_best_held_out_state()

    def _pass_steps(self) -> int:
        """Steps in one pass over the fitted views."""
        return math.ceil(len(self.fit_views) / self.settings.views_per_step)

    @torch.no_grad()
    def _measure_held_out(self, keep_best: bool) -> None:
        """Mean L1 of the held-out views at full resolution (their poses are not learned: none)."""
        level = self.levels[-1]
        errors = [(self._project(level, i, None)[0] - level.images[i]).abs().mean() for i in self.held_out.indices]
        self.held_out.record(self.iteration, float(torch.stack(errors).mean()), self.model, self.outer, keep_best)

    def _return_best_held_out_state(self) -> None:
        """End on the state the held-out views liked best, when the last measured one is worse."""
        best = self.held_out.best
        if best is None or self.held_out.evaluations[-1][1] <= best["error"]:
            return
        self.model = GaussianModel.from_state_dict(best["model"]).to(self.device)
        self.outer.load_state_dict(best["outer"])

    def _count_step(self, seconds: float, first_at_level: bool) -> None:
        """Add a step to the schedule's clock; compilation (the first step at a level with compiled
        kernels, or a step far slower than the recent ones) counts only as a typical step."""
        recent = self.iteration_seconds[-10:]
        typical = float(np.median(recent)) if recent else seconds
        if self.settings.compile and first_at_level:
            counted = typical if recent else 0.0
        else:
            counted = min(seconds, 3.0 * typical) if len(recent) >= 5 else seconds
        self.iteration_seconds.append(seconds)
        self.training_s += counted

    @staticmethod
    def _measure(rates: list[float], seconds: float, units: int) -> None:
        """Keep the last few measured seconds per unit (voxel or pixel)."""
        rates.append(seconds / max(units, 1))
        del rates[:-10]

    def _enter_level(self, index: int) -> None:
        """Close the previous level's stage record and open this one's."""
        self._end_level()
        self._level_stage = self.clock.begin_stage(f"level_{self.levels[index].factor}x")

    def _end_level(self) -> None:
        if self._level_stage is not None:
            self.clock.end_stage(self._level_stage)
            self._level_stage = None

    def _densify(self) -> None:
        """One round of adaptive control on the mean positional gradients since the last round."""
        config = self.config
        mean_gradient = self.grad_accum / self.seen.clamp(min=1)
        threshold = float(torch.quantile(mean_gradient, 1.0 - config.densify_fraction))
        counts = self.model.densify_and_prune(
            self.optimizer, mean_gradient, max(threshold, 1e-12), max(self.support_grid.spacing), self.max_gaussians,
            split_voxels=config.split_voxels, min_attenuation=config.min_attenuation,
            min_mass_voxels=config.min_mass_voxels)
        self.densification.append({"iteration": self.iteration, "elapsed_s": round(self.clock.elapsed(), 3),
                                   **{key: int(counts[key]) for key in ("cloned", "split", "pruned", "total")}})
        self.grad_accum = torch.zeros(len(self.model), device=self.device)
        self.seen = torch.zeros(len(self.model), device=self.device)
        self._densified_since_measure = True

    def _next_views(self) -> list[int]:
        """The next ``views_per_step`` views from a stream of seeded permutations: every view once
        per pass, in a fresh random order each pass."""
        views = []
        while len(views) < self.settings.views_per_step:
            if not self.queue:
                order = torch.randperm(len(self.fit_views), generator=self.generator).tolist()
                self.queue = [self.fit_views[i] for i in order]
            views.append(self.queue.pop(0))
        return views

    def plateaued(self) -> bool:
        """Whether the loss has stopped falling: since densification ended and from ``plateau_from`` of
        the run on, at the end of a pass over the views, the mean loss over the last window
        (:meth:`plateau_window_steps`) is within ``plateau_tolerance`` of the window before. Single
        steps are too noisy (one view each), and so is a window that holds some views more often
        than others (the views' losses differ by far more than the tolerance): the windows are whole
        passes, each view equally often."""
        if self.densified_until is None or self.fraction < self.config.plateau_from:
            return False
        if self.iteration % self._pass_steps():
            return False
        window = self.plateau_window_steps()
        losses = [row[1] for row in self.loss_curve[self.densified_until:]]
        if len(losses) < 2 * window:
            return False
        recent, before = np.mean(losses[-window:]), np.mean(losses[-2 * window:-window])
        return bool(before - recent < self.config.plateau_tolerance * before)

    def plateau_window_steps(self) -> int:
        """Steps in a window of the plateau rule: whole passes, at least two and ``plateau_window`` steps."""
        passes = max(2, math.ceil(self.config.plateau_window / self._pass_steps()))
        return passes * self._pass_steps()

    def _project(self, level: Level, view: int, pose: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """View ``view`` at ``level`` as the model sees it (Gaussians plus the outer volume) and the
        Gaussians' footprint radii."""
        image, radii = render(self.model, level.rays[view], return_radii=True, pose=pose,
                              memory_budget=self.memory_budget, compile=self.settings.compile,
                              kernel=self.settings.kernel, pixel_footprint=self.config.pixel_footprint)
        outer = self.outer.project(level.outer_rays[view], pose, kernel=self.settings.kernel,
                                   upsample=level.outer_binning, shape=tuple(image.shape))
        return image + outer, radii

    def _pose(self, index: int) -> torch.Tensor | None:
        """View ``index``'s learned rigid correction (4, 4), or None without pose refinement."""
        return self.poses.matrix(index) if self.poses is not None else None

    @torch.no_grad()
    def reprojections(self, indices: list[int]) -> dict[int, torch.Tensor]:
        """Views ``indices`` at full resolution as the model (with the outer volume) sees them."""
        return {index: self._project(self.levels[-1], index, self._pose(index))[0] for index in indices}

    def pose_report(self) -> list[dict]:
        """Per view: name, correction and corrected projection matrix; empty without refinement."""
        if self.poses is None:
            return []
        return [{"view": view.name, **row, "projection_matrix": self.poses.corrected_matrix(
                    index, view.projection_matrix).round(9).tolist()}
                for index, (view, row) in enumerate(zip(self.scan.views, self.poses.report()))]

    @torch.no_grad()
    def _tv_clip(self) -> float | None:
        """``tv_clip_factor`` x the median of the start voxelized on a coarse (48 per side) grid of the
        support: the soft-tissue level, which most of the support is."""
        if self.config.tv_clip_factor is None:
            return None
        support = self.support_grid.roi
        start = voxelize(self.model, support.grid(max(support.size) / 48), memory_budget=self.memory_budget,
                         kernel=self.settings.kernel)
        return self.config.tv_clip_factor * float(start.median())

    def _tv_loss(self) -> torch.Tensor:
        """3D TV of a random patch of the support, in units of attenuation x half the support side
        (R2-Gaussian's normalised scene), so the weight means what it means there."""
        shape = self.tv_grid.shape
        size = [min(self.config.tv_patch, n) for n in shape]
        corner = [int(torch.randint(0, n - s + 1, (1,), generator=self.generator)) for n, s in zip(shape, size)]
        region = tuple(slice(c, c + s) for c, s in zip(corner, size))
        patch = voxelize(self.model, self.tv_grid, region=region, memory_budget=self.memory_budget,
                         kernel=self.settings.kernel)
        if self.tv_clip is not None:
            patch = patch.clamp(max=self.tv_clip)
        return total_variation_3d(patch * self.model.half_extent)

    @torch.no_grad()
    def _measure_voxelization(self) -> None:
        """Time the final voxelization on a central block of the output grid (where the Gaussians are
        densest): its cost per voxel, under the machine's current load, sizes the final stage."""
        region = tuple(slice(max(n // 2 - 16, 0), max(n // 2 - 16, 0) + min(32, n)) for n in self.grid.shape)
        started = time.perf_counter()
        block = voxelize(self.model, self.grid, region=region, memory_budget=self.memory_budget,
                         kernel=self.settings.kernel)
        self._measure(self.voxel_seconds, time.perf_counter() - started, block.numel())

    def final_stage_reserve_s(self, reprojected: int = 4) -> float:
        """Time kept back from the budget for the final voxelization, ``reprojected`` full-resolution
        re-projections and the outputs, estimated from this run's own measured costs (so it grows when
        the machine is loaded), with a 25 % margin and two steps' worth for the step in flight.
        Before anything is measured: ``final_stage_fraction`` of the budget."""
        if self.clock.budget_s is None:
            return 0.0
        if not (self.voxel_seconds and self.pixel_seconds and self.iteration_seconds):
            return self.config.final_stage_fraction * self.clock.budget_s
        voxelize_s = self.voxel_seconds[-1] * int(np.prod(self.grid.shape))
        pixels = sum(self.levels[-1].images[i].numel() for i in range(min(reprojected, len(self.scan.views))))
        reproject_s = max(self.pixel_seconds) * pixels
        step_s = float(np.mean(self.iteration_seconds[-10:]))
        return 1.25 * (voxelize_s + reproject_s + self.outputs_s) + 2.0 * step_s

    # ----- checkpoints ----------------------------------------------------------------------------
    def save(self, path) -> None:
        """Everything an exact resume needs: model, outer volume, poses, optimiser, random stream, view
        queue, densification statistics and the schedule's clock."""
        save_checkpoint(path, {
            "fingerprint": self.fingerprint,
            "iteration": self.iteration,
            "model": self.model.state_dict(),
            "outer": self.outer.state_dict(),
            "poses": self.poses.state_dict() if self.poses is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "queue": list(self.queue),
            "grad_accum": self.grad_accum.cpu(),
            "seen": self.seen.cpu(),
            "densified_until": self.densified_until,
            "densification": self.densification,
            "loss_curve": [list(row) for row in self.loss_curve],
            "iteration_seconds": self.iteration_seconds[-20:],
            "training_s": self.training_s,
            "held_out": self.held_out.state_dict(),
            "tv_clip": self.tv_clip,
        })

    def _restore(self, state: dict) -> None:
        if self.poses is not None:
            self.poses.load_state_dict(state["poses"])
        self.outer.load_state_dict(state["outer"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"].cpu())
        self.iteration = int(state["iteration"])
        self.queue = [int(v) for v in state["queue"]]
        self.grad_accum = state["grad_accum"].to(self.device)
        self.seen = state["seen"].to(self.device)
        self.densified_until = state["densified_until"]
        self.densification = [dict(row) for row in state["densification"]]
        self.loss_curve = [tuple(row) for row in state["loss_curve"]]
        self.iteration_seconds = list(state["iteration_seconds"])
        self.training_s = float(state["training_s"])
        self.held_out.load_state_dict(state["held_out"])
