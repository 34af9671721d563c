"""Where the Gaussians and the outer volume start: fitted to SART (default) or random and uniform."""
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
from .grids import sart_grid
from .schedule import binned_views


def run_sart(views: list[tuple[np.ndarray, np.ndarray]], grid: Grid, iterations: int, device: torch.device,
             clock: Clock, seed: int, budget_fraction: float = 1.0, kernel: str = "torch") -> torch.Tensor:
    """SART on ``grid`` within ``budget_fraction`` of the clock's budget, reporting progress as stage "sart";
    ``kernel``: its ray marcher's (:mod:`ixgs.kernels.choice`)."""
    budget = None if clock.budget_s is None else max(clock.budget_s * budget_fraction - clock.elapsed(), 1e-3)
    values = sart_reconstruct(
        views, grid, iterations, device=device,
        progress=lambda i, n, residual: clock.report("sart", i, n, residual),
        cancel=clock.cancel, time_budget_s=budget, seed=seed, kernel=kernel)
    clock.check_cancel()  # SART returns early on a cancel; the reconstruction must not go on
    return values


def sart_start(scan: Scan, support_grid: Grid, outer_grid: Grid, n: int, device: torch.device, clock: Clock,
               seed: int, config: TrainingConfig, sart_factor: float,
               kernel: str = "torch") -> tuple[GaussianModel, torch.Tensor]:
    """Gaussians fitted to the SART of method "sart" (its box, ``sart_factor`` x the ROI, and its voxel),
    and the outer volume sampled from it (zero beyond SART's box: the outer volume learns the rest).

    The fit is deterministic on the support grid (output resolution): the run starts no worse than
    SART, up to what ``n`` Gaussians hold, with no sampling noise in the null space of the views."""
    sart = sart_grid(scan, support_grid, sart_factor)
    values = run_sart(binned_views(scan, 1), sart, config.warm_start_iterations, device, clock, seed,
                      budget_fraction=config.warm_start_budget_fraction, kernel=kernel)
    inner = sample_volume(values, sart, torch.as_tensor(support_grid.voxel_centers(), dtype=values.dtype,
                                                        device=values.device))
    model = GaussianModel.from_volume_deterministic(inner, support_grid, n, support_grid.roi)
    outer = sample_volume(values, sart, torch.as_tensor(outer_grid.voxel_centers(), dtype=values.dtype,
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
