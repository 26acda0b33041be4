"""What a training run shows besides log.txt and stats.jsonl: EMA sample grids (RUN/samples/step-N.png), the
stats plot (RUN/stats.png) and, with --tensorboard, TensorBoard scalars and grids (RUN/tb).

The grids use fixed seeds and labels (sample i: seed i, label i mod num_classes, one class per column), so that
the grids of one run compare across steps. All of it runs between steps, at its own interval, off the clock of
the training throughput. Drawing stats.png takes a few hundred milliseconds, so at short logging intervals it is
redrawn at most every PLOT_MIN_INTERVAL_S seconds, and always at the run's last step.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from fastdiff.diffusion import initial_noise, run_table, seeds_for
from fastdiff.diffusion.samplers import StepTable
from fastdiff.errors import FastdiffError
from fastdiff.images import auto_scale, class_columns, make_grid, save_png
from fastdiff.plot import plot_stats

GRID_SAMPLES = 40  # 4 rows of 10 classes
GRID_STEPS = 10  # DDIM steps of a teacher's grid: enough to judge the samples, cheap next to a checkpoint
PLOT_MIN_INTERVAL_S = 20.0  # stats.png is redrawn at a logging interval if the last drawing is this old (or at the end)


@torch.no_grad()
def sample_grid(model, table: StepTable, *, shape: tuple[int, ...], num_classes: int, guidance: float,
                null_label: int | None, clip: float | None, device) -> np.ndarray:
    """A uint8 grid of the model's samples from the fixed seeds and labels, one class per column."""
    rows = max(1, GRID_SAMPLES // num_classes) if num_classes else None
    n = rows * num_classes if num_classes else GRID_SAMPLES
    seeds = seeds_for(0, n).to(device)
    labels = (torch.arange(n, device=device) % num_classes) if num_classes else None
    x = run_table(model, initial_noise(seeds, shape, device), table, seeds=seeds, labels=labels,
                  guidance=guidance if num_classes else 1.0, null_label=null_label, clip=clip)
    return make_grid(x, nrow=class_columns(n, num_classes), scale=auto_scale(shape[-1]))


class Monitor:
    """Grids, stats.png and TensorBoard events of the run in `run_dir` (the writing process only)."""

    def __init__(self, run_dir: Path, *, tensorboard: bool, start_step: int, plot_keys: tuple[str, ...]):
        # matplotlib's C modules load now, before training: a SIGTERM inside their first import (at the first
        # stats.png) became "ImportError: initialization failed", a traceback and exit 1 instead of a stop
        import matplotlib.backends.backend_agg  # noqa: F401

        self.run_dir, self.plot_keys = run_dir, plot_keys
        self.plotted_at = -float("inf")
        self.tb = None
        if tensorboard:
            try:  # the tensorboard package is an optional extra
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise FastdiffError("--tensorboard needs the tensorboard package: pip install 'fastdiff[tensorboard]' "
                                    "(or drop --tensorboard)") from None

            # purge_step: events past the checkpoint a resume starts from are dropped, as stats.jsonl's are (on a
            # fresh start, those of an earlier start that stopped before its first checkpoint)
            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1)

    def grid_path(self, step: int) -> Path:
        return self.run_dir / "samples" / f"step-{step:09d}.png"

    def grid(self, step: int, grid: np.ndarray) -> Path:
        path = save_png(grid, self.grid_path(step))
        if self.tb is not None:
            self.tb.add_image("samples", grid, step, dataformats="HWC")
        return path

    def record(self, record: dict, last: bool = False) -> None:
        """At each logging interval: refresh stats.png and write the record's scalars to TensorBoard."""
        if last or time.perf_counter() - self.plotted_at >= PLOT_MIN_INTERVAL_S:
            self.plot()
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}", value, record["step"])
            self.tb.flush()

    def plot(self) -> None:
        plot_stats([self.run_dir], self.run_dir / "stats.png", keys=self.plot_keys)
        self.plotted_at = time.perf_counter()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
