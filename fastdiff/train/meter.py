"""Interval metering and the NaN guard: running sums of the loss terms stay on the device and are read once per
logging interval (one host sync), averaged over the processes of a multi-process run."""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

from fastdiff.errors import TrainingDiverged
from fastdiff.runtime import peak_memory_mb, synchronize


def check_finite(value: float, first_step: int, last_step: int, advice: str, what: str = "the loss") -> float:
    """Stop with TrainingDiverged (and `advice`: what to do next) if `what` of the interval was NaN or inf."""
    if not math.isfinite(value):
        raise TrainingDiverged(f"{what} became {value} between steps {first_step + 1} and {last_step}; {advice}")
    return value


class IntervalMeter:
    """Sums of named loss terms on the device over a logging interval.

    `reduce` is the hook for multi-process runs: it maps this process's sums to their mean over the processes
    (`World.mean`; the identity on one process). `read` returns the interval means and the throughput, and raises
    TrainingDiverged when any term was NaN or infinite during the interval. The clock runs from `restart`, so
    time spent on interval work after `read` (checkpoints, sample grids, plots) is not counted as training.
    """

    def __init__(self, names: tuple[str, ...], device: torch.device, start: int,
                 reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t):
        self.names, self.device, self.reduce = names, device, reduce
        self.sums = torch.zeros(len(names), device=device)
        self.start, self.t0 = start, time.perf_counter()

    def add(self, *values: torch.Tensor) -> None:
        self.sums += torch.stack([v.detach().float().reshape(()) for v in values])

    def read(self, done: int, batch_size: int, advice: str, setup_s: float = 0.0) -> dict:
        """Means over steps start+1..done of each term, images/s and sec/kimg (setup_s excluded), peak memory."""
        n = done - self.start
        sums = self.reduce(self.sums)
        means = (sums / n).tolist()  # the one host sync of the interval
        # the first term that is not finite, by its name (the sum of them all blamed the loss for a gradient norm)
        for name, mean in zip(self.names, means):
            check_finite(mean, self.start, done, advice, "the loss" if name == "loss" else name)
        synchronize(self.device)
        dt = max(time.perf_counter() - self.t0 - setup_s, 1e-9)
        record = dict(zip(self.names, means))
        record.update(images_per_sec=n * batch_size / dt, sec_per_kimg=dt / (n * batch_size / 1000),
                      peak_mem_mb=peak_memory_mb(self.device))
        if setup_s:
            record["setup_s"] = setup_s
        self.sums.zero_()
        self.start = done
        return record

    def restart(self) -> None:
        """Start the next interval's clock (after the interval's checkpoint, grid and plot)."""
        synchronize(self.device)
        self.t0 = time.perf_counter()
