"""Where the Gaussians and the outer volume start: from a coarse SART (default) or random and uniform."""
from __future__ import annotations

import numpy as np
import torch

from ..gaussians import GaussianModel
from ..geometry import Grid, Roi
from ..projector import sample_volume
from ..sart import sart_reconstruct
from ..scan import Scan
from .clock import Clock
from .config import TrainingConfig
from .schedule import binned_views


def run_sart(views: list[tuple[np.ndarray, np.ndarray]], grid: Grid, iterations: int, device: torch.device,
             clock: Clock, seed: int, budget_fraction: float = 1.0) -> torch.Tensor:
    """SART on ``grid`` within ``budget_fraction`` of the clock's budget, reporting progress as stage "sart"."""
    budget = None if clock.budget_s is None else max(clock.budget_s * budget_fraction - clock.elapsed(), 1e-3)
    values = sart_reconstruct(
        views, grid, iterations, device=device,
        progress=lambda i, n, residual: clock.report("sart", i, n, residual),
        cancel=clock.cancel, time_budget_s=budget, seed=seed)
    clock.check_cancel()  # SART returns early on a cancel; the reconstruction must not go on
    return values


def sart_start(scan: Scan, support: Roi, outer_grid: Grid, n: int, generator: torch.Generator, device: torch.device,
               clock: Clock, seed: int, config: TrainingConfig, bin_views: bool) -> tuple[GaussianModel, torch.Tensor]:
    """Gaussians drawn from a coarse SART of the whole outer box, and the outer volume sampled from it.

    ``bin_views``: use views binned 2 x 2 (where that leaves a level's worth of pixels): on this coarse
    grid they lose little, and the warm start costs a quarter."""
    sart_grid = outer_grid.roi.grid(max(outer_grid.roi.size) / config.warm_start_cells)  # a warm start, not the answer
    values = run_sart(binned_views(scan, 2 if bin_views else 1), sart_grid, config.warm_start_iterations, device,
                      clock, seed, budget_fraction=config.warm_start_budget_fraction)
    inner_grid = support.grid(max(sart_grid.spacing))
    inner = sample_volume(values, sart_grid, torch.as_tensor(inner_grid.voxel_centers(), dtype=values.dtype,
                                                            device=values.device))
    model = GaussianModel.from_volume(inner, inner_grid, n, generator, support=support)
    outer = sample_volume(values, sart_grid, torch.as_tensor(outer_grid.voxel_centers(), dtype=values.dtype,
                                                             device=values.device))
    return model.to(device), outer


def random_start(scan: Scan, support: Roi, outer_grid: Grid, n: int, generator: torch.Generator,
                 device: torch.device) -> tuple[GaussianModel, torch.Tensor]:
    """The paper's start: Gaussians uniformly in the support, at the mean attenuation the views imply
    (line integral / path length), and a uniform outer volume."""
    mean_path_mm = float(np.mean(outer_grid.roi.size))
    mean_attenuation = float(np.mean([view.image.mean() for view in scan.views])) / mean_path_mm
    mean_attenuation = max(mean_attenuation, 1e-3)
    model = GaussianModel.random(support, n, generator, density=0.5 * mean_attenuation, device=device)
    return model, torch.full(outer_grid.shape, mean_attenuation, device=device)
