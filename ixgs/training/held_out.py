"""Views held out of the fit: their re-projection error chooses when to stop and which state to return.

The fitted views can always be matched better (the loss keeps falling while the volume between the
views degrades); views the optimiser never sees say when that begins. They are measured at full
resolution, every pass over the fitted views; the state with the lowest error is kept.
"""
from __future__ import annotations

import numpy as np
import torch


def held_out_indices(n_views: int, count: int) -> list[int]:
    """``count`` views spread evenly through the scan, never the first or last (the arc's ends)."""
    if count <= 0:
        return []
    if n_views - count < 2:
        raise ValueError(f"setting 'held_out_views': {count} of {n_views} views leaves fewer than 2 to fit")
    return sorted(set(np.linspace(0, n_views - 1, count + 2)[1:-1].round().astype(int).tolist()))


class HeldOutViews:
    """The held-out views' error history and the best state seen (model and outer volume)."""

    def __init__(self, indices: list[int], patience: int):
        self.indices, self.patience = indices, patience
        self.evaluations: list[list[float]] = []  # [iteration, mean L1 of the held-out views]
        self.best: dict | None = None  # {"iteration", "error", "model", "outer"}

    def __bool__(self) -> bool:
        return bool(self.indices)

    def record(self, iteration: int, error: float, model: torch.nn.Module, outer: torch.nn.Module,
               keep_best: bool) -> None:
        """Add one measurement; with ``keep_best`` (once the schedule is at full resolution), copy the
        state when it is the best so far."""
        self.evaluations.append([int(iteration), float(error)])
        if keep_best and (self.best is None or error < self.best["error"]):
            self.best = {"iteration": int(iteration), "error": float(error),
                         "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
                         "outer": {k: v.detach().clone() for k, v in outer.state_dict().items()}}

    def stopped_improving(self) -> bool:
        """No better error than the best in the last ``patience`` measurements."""
        if self.best is None:
            return False
        since = [error for iteration, error in self.evaluations if iteration > self.best["iteration"]]
        return len(since) >= self.patience

    def report(self) -> dict:
        return {"views": self.indices, "evaluations": self.evaluations,
                "best_iteration": self.best["iteration"] if self.best else None,
                "best_error": self.best["error"] if self.best else None}

    def state_dict(self) -> dict:
        return {"evaluations": self.evaluations, "best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.evaluations = [list(row) for row in state["evaluations"]]
        self.best = state["best"]
