"""Pieces shared by the DDPM and ADD training loops: devices, AMP, EMA, deterministic per-step randomness,
run-directory logging, and the NaN guard.

Randomness is a pure function of (seed, step): the data order, timesteps, noise, label dropout and dropout
masks of step k are the same whether the run got there in one go or was killed and resumed. That is what
makes a resumed run continue exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

from fastdiff.errors import ConfigError, FastdiffError, TrainingDiverged

AMP_MODES = ("fp32", "bf16", "fp16")


def resolve_device(name: str | None = "auto") -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def amp_dtype(amp: str) -> torch.dtype | None:
    if amp not in AMP_MODES:
        raise ConfigError(f"unknown --amp {amp!r}; use one of {', '.join(AMP_MODES)}")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device: torch.device, amp: str):
    dtype = amp_dtype(amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """A loss scaler for fp16 (bf16 and fp32 need none: it is then a disabled pass-through)."""
    return torch.amp.GradScaler(device.type, enabled=(amp == "fp16"))


def mix_seed(seed: int, step: int, stream: int = 0) -> int:
    """A 63-bit seed for (seed, step, stream), decorrelated by odd multipliers (splitmix64 constants)."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    return x & (2**63 - 1)


def step_generator(seed: int, step: int, device: torch.device, stream: int = 0) -> torch.Generator:
    return torch.Generator(device).manual_seed(mix_seed(seed, step, stream))


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


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


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
