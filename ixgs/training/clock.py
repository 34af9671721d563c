"""Wall time of one reconstruction: the budget, named stages, progress reports and the cancel flag."""
from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass


class ReconstructionCancelled(RuntimeError):
    """Raised when the cancel flag is set; nothing is returned or written."""


@dataclass
class Progress:
    """One progress report: ``stage`` is "sart", "gaussian" or "voxelize"."""

    stage: str
    iteration: int
    total: int
    loss: float
    elapsed_s: float
    eta_s: float


ProgressCallback = Callable[[Progress], None]
CancelFlag = Callable[[], bool]


class Clock:
    """Elapsed time, the budget, named stages, progress reports and the cancel flag, in one place."""

    def __init__(self, start: float, budget_s: float | None, progress: ProgressCallback | None,
                 cancel: CancelFlag | None):
        self.start, self.budget_s, self.progress, self.cancel = start, budget_s, progress, cancel
        self.stages: list[dict] = []  # {"name", "start_s", "end_s"}, seconds since the start

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        """Seconds left in the budget (infinite without one)."""
        return math.inf if self.budget_s is None else self.budget_s - self.elapsed()

    def over_budget(self, reserve_s: float = 0.0) -> bool:
        return self.budget_s is not None and self.elapsed() + reserve_s >= self.budget_s

    def begin_stage(self, name: str) -> dict:
        """Start recording the wall time of a named stage (warm start, a resolution level, voxelization, ...)."""
        record = {"name": name, "start_s": round(self.elapsed(), 3), "end_s": None}
        self.stages.append(record)
        return record

    def end_stage(self, record: dict) -> None:
        record["end_s"] = round(self.elapsed(), 3)

    @contextlib.contextmanager
    def stage(self, name: str):
        record = self.begin_stage(name)
        try:
            yield record
        finally:
            self.end_stage(record)

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


# The default wall-time budget of a run that names neither an iteration count nor a budget (issue 12,
# section 4: `ixgs reconstruct SCAN -o OUT` on 20 views of 128 px ends within 3 minutes on 2 CPU cores
# and within 1 minute on a GPU). The few seconds left are for reading the scan and starting up; the
# final voxelization, re-projections and outputs are reserved for inside the budget, from what the run
# measures (GaussianTrainer.final_stage_reserve_s).
DEFAULT_TIME_BUDGET_S = {"cpu": 170.0, "cuda": 50.0}


def effective_time_budget_s(time_budget_s: float | None, iterations: int | None, device_type: str) -> float | None:
    """The budget a run gets: the one asked for; none when an iteration count is asked for instead
    (iteration-limited runs are repeatable); otherwise the device's default."""
    if time_budget_s is not None:
        return time_budget_s
    if iterations is not None:
        return None
    return DEFAULT_TIME_BUDGET_S.get(device_type, DEFAULT_TIME_BUDGET_S["cpu"])


def busy_cores(sample_s: float = 0.2) -> float:
    """Cores busy right now (with other processes, when this one waits): the kernel's CPU counters
    sampled ``sample_s`` apart; where there are none (not Linux), the load average over the last
    minute, which lags: a run started just after another CPU-heavy one would see the cores as taken."""
    def counters() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # all, idle + waiting for I/O

    cores = os.cpu_count() or 1
    try:
        total, idle = counters()
        time.sleep(sample_s)
        total_after, idle_after = counters()
    except (OSError, ValueError, IndexError):
        try:
            return float(os.getloadavg()[0])
        except OSError:  # not on every platform
            return 0.0
    elapsed = max(total_after - total, 1)
    return cores * (1.0 - (idle_after - idle) / elapsed)


def threads_for_load(threads: int) -> int:
    """CPU threads worth using now: ``threads``, at most the cores that other processes leave free
    (:func:`busy_cores`), at least 1. OpenMP threads that share a core with another process wait at
    every barrier: on 2 cores with one taken, 2 threads made the final voxelization many times slower
    than 1 (the README's demo ran 613 s of a 150 s budget)."""
    cores = os.cpu_count() or threads
    return max(1, min(threads, int(cores - busy_cores() + 0.5)))
