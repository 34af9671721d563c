"""Resolution levels (binned views, coarse to fine) and the schedules that follow the run's progress."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..geometry import binning_matrix, view_rays
from ..scan import Scan
from .clock import Clock
from .config import TrainingConfig


@dataclass
class Level:
    """The views at one resolution: binned images and their rays, and the rays the outer volume is
    projected along (binned ``outer_binning`` x further, the image then upsampled: its cells span
    several pixels)."""

    factor: int
    images: list[torch.Tensor]
    rays: list
    outer_rays: list
    outer_binning: int = 1


def binned(image: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor`` x ``factor`` blocks (a trailing partial block is dropped)."""
    rows, cols = (s // factor * factor for s in image.shape)
    blocks = image[:rows, :cols].reshape(rows // factor, factor, cols // factor, factor)
    return blocks.mean(axis=(1, 3))


def binned_views(scan: Scan, factor: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, projection matrix) of every view, binned ``factor`` x ``factor``."""
    return [(binned(view.image, factor), binning_matrix(factor) @ view.projection_matrix) for view in scan.views]


def resolution_levels(scan: Scan, config: TrainingConfig, device: torch.device) -> list[Level]:
    """Resolution levels, coarsest first: halving until the smaller image side nears ``min_level_pixels``."""
    smallest = min(min(view.image.shape) for view in scan.views)
    factors = [1]
    while smallest // (factors[-1] * 2) >= config.min_level_pixels and len(factors) < config.max_levels:
        factors.append(factors[-1] * 2)
    levels = []
    for factor in reversed(factors):
        views = binned_views(scan, factor)
        rays = [view_rays(matrix, image.shape, device=device) for image, matrix in views]
        # Binned further only while the outer image keeps min_level_pixels (coarse levels stay as they are).
        outer = config.outer_binning if smallest // (factor * config.outer_binning) >= config.min_level_pixels else 1
        outer_rays = rays if outer == 1 else [
            view_rays(binning_matrix(outer) @ matrix, tuple(math.ceil(n / outer) for n in image.shape), device=device)
            for image, matrix in views]
        levels.append(Level(factor, [torch.as_tensor(image, dtype=torch.float32, device=device) for image, _ in views],
                            rays, outer_rays, outer))
    return levels


class Schedule:
    """How far the run is (0..1) and what follows from it: the level, the learning rates, densification."""

    def __init__(self, config: TrainingConfig, iterations: int, clock: Clock):
        self.config, self.iterations, self.clock = config, iterations, clock

    def fraction(self, iteration: int, training_s: float, reserve_s: float) -> float:
        """How far the run is, 0..1: by iterations, or by the time budget when that ends it sooner.

        By time, the clock counts only the training steps (``training_s``, compilation excluded) against
        the time they can still have (the budget left after ``reserve_s`` for the final stage): the warm
        start and compilation do not eat the coarse levels or the densification window, and a run cut
        short by its budget still goes through every schedule."""
        fraction = iteration / self.iterations
        if self.clock.budget_s is not None:
            left = max(self.clock.remaining() - reserve_s, 0.0)
            fraction = max(fraction, training_s / max(training_s + left, 1e-9))
        return min(fraction, 1.0)

    def level_index(self, fraction: float, n_levels: int) -> int:
        """Coarse levels take the first ``coarse_fraction`` of the run, equally; the finest the rest."""
        coarse = n_levels - 1
        index = int(fraction / self.config.coarse_fraction * coarse) if coarse else 0
        return min(index, n_levels - 1)

    def set_learning_rates(self, optimizer: torch.optim.Optimizer, fraction: float) -> None:
        """Exponential decay from each group's initial rate to ``final_lr_fraction`` of it."""
        decay = self.config.final_lr_fraction ** fraction
        for group in optimizer.param_groups:
            if group["name"] in self.config.decayed_groups:
                group["lr"] = group["initial_lr"] * decay

    def densifies(self, fraction: float, iteration: int, last_round: int) -> bool:
        """Whether step ``iteration`` (counted from 1) ends with a densification round, the last one
        having ended step ``last_round`` (0: none yet): every ``densify_every`` steps, or
        ``densify_rounds`` rounds spread over the window of the run's expected length, at least
        ``densify_every`` steps apart."""
        config = self.config
        if not config.densify or not config.densify_from <= fraction <= config.densify_until:
            return False
        if config.densify_rounds is None:
            return iteration % config.densify_every == 0
        expected = self.iterations
        if self.clock.budget_s is not None and fraction > 0:
            expected = min(expected, iteration / fraction)
        window = (config.densify_until - config.densify_from) * expected
        return iteration - last_round >= max(config.densify_every, round(window / config.densify_rounds))
