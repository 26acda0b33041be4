"""Pieces shared by the DDPM and ADD training loops: the step-addressable batcher, EMA, warm-up, run-directory
logging, interval metering and the NaN guard (devices, AMP and seeding are `fastdiff.runtime`'s).

Randomness is a pure function of (seed, step): the data order, timesteps, noise, label dropout and dropout
masks of step k are the same whether the run got there in one go or was killed and resumed. That is what
makes a resumed run continue exactly where it stopped.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch

from fastdiff.errors import ConfigError, FastdiffError, TrainingDiverged
from fastdiff.runtime import mix_seed, peak_memory_mb


class Batcher:
    """Epochs of shuffled indices, addressable by step: batch(step) is the same in any run with this seed."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n == 0:
            raise ConfigError("the training set is empty")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, stream=7))
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def indices(self, step: int) -> torch.Tensor:
        pos = torch.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs, within = pos // self.n, pos % self.n
        out = torch.empty_like(pos)
        for e in epochs.unique().tolist():
            sel = epochs == e
            out[sel] = self._perm(e)[within[sel]]
        return out


class EMA:
    """Exponential moving average of a model's weights, with the usual warm-up: d = min(decay, (1+n)/(10+n))."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        ema_p = [p for p in self.model.parameters()]
        src_p = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


def warmup_lambda(warmup_steps: int):
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


class RunLog:
    """log.txt (human lines) and stats.jsonl (one JSON record per logging interval) in the run directory."""

    def __init__(self, run_dir: Path, echo=None):
        self.run_dir = run_dir
        self.echo = echo
        self._log = open(run_dir / "log.txt", "a", buffering=1)
        self._stats = open(run_dir / "stats.jsonl", "a", buffering=1)

    def line(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._log.write(f"[{stamp}] {text}\n")
        if self.echo is not None:
            self.echo(text)

    def stats(self, record: dict) -> None:
        self._stats.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._log.close()
        self._stats.close()


def check_finite(loss_sum: torch.Tensor, first_step: int, last_step: int, last_ckpt: str | None) -> float:
    """Sync once per logging interval; stop with a clear error if any loss in the interval was NaN or inf."""
    value = float(loss_sum)
    if not math.isfinite(value):
        where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
        raise TrainingDiverged(
            f"the loss became {value} between steps {first_step + 1} and {last_step}; {where}. "
            "Lower --lr, raise --warmup, use --amp bf16 or fp32 instead of fp16, or check the data for NaNs"
        )
    return value


def prepare_run_dir(run_dir: Path, resume: bool) -> None:
    from fastdiff.checkpoint import latest_checkpoint

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise FastdiffError(f"cannot write to the run directory {run_dir}: {e.strerror}; choose a writable --out")
    has_ckpt = latest_checkpoint(run_dir) is not None
    if resume and not has_ckpt:
        raise FastdiffError(f"--resume: {run_dir} holds no checkpoint to resume from; drop --resume to start a run")
    if not resume and has_ckpt:
        raise FastdiffError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")


class IntervalMeter:
    """Running sums of named loss terms on the device, read once per logging interval (one host sync).

    `read` returns the interval means and the throughput, and stops the run with TrainingDiverged when any
    term was NaN or infinite during the interval.
    """

    def __init__(self, names: tuple[str, ...], device: torch.device, start: int):
        self.names = names
        self.device = device
        self.sums = torch.zeros(len(names), device=device)
        self.start, self.t0 = start, time.perf_counter()

    def add(self, *values: torch.Tensor) -> None:
        self.sums += torch.stack([v.detach().float() for v in values])

    def read(self, done: int, batch_size: int, last_ckpt: str | None) -> dict:
        n = done - self.start
        check_finite(self.sums.sum(), self.start, done, last_ckpt)
        means = (self.sums / n).tolist()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - self.t0
        record = dict(zip(self.names, means))
        record.update(images_per_sec=n * batch_size / dt, sec_per_kimg=dt / (n * batch_size / 1000),
                      peak_mem_mb=peak_memory_mb(self.device))
        self.sums.zero_()
        self.start, self.t0 = done, time.perf_counter()
        return record
