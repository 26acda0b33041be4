"""Sampling from a trained run: load its model, draw batches with per-sample seeds, collect trajectories.

The samplers in `fastdiff.diffusion` are plain functions over any model; this module is the part that knows
about fastdiff's checkpoints and configs, used by `fastdiff sample` and `fastdiff eval`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from fastdiff import checkpoint as ckpt
from fastdiff.config import RunConfig, load_config
from fastdiff.diffusion import (
    NoiseSchedule,
    ddim_table,
    ddpm_table,
    initial_noise,
    make_timesteps,
    run_table,
    seeds_for,
    student_table,
    student_timesteps,
)
from fastdiff.diffusion.samplers import StepTable
from fastdiff.errors import ConfigError
from fastdiff.models import UNet
from fastdiff.sampling.fast import FastSampler

SAMPLERS = ("ddim", "ddpm", "student")


@dataclass
class Loaded:
    model: torch.nn.Module
    config: RunConfig
    path: str
    schedule: NoiseSchedule


def load_run(checkpoint, device, use_ema: bool = True) -> Loaded:
    """The model (EMA weights by default) and config of a run directory or checkpoint folder."""
    path = ckpt.resolve_checkpoint(checkpoint)
    cfg = load_config(path / "config.json")
    model = UNet(cfg.model)
    ckpt.load_model_weights(model, ckpt.load_tensors(path, "ema" if use_ema else "model"), path)
    model = model.to(device).eval().requires_grad_(False)
    return Loaded(model, cfg, str(path), NoiseSchedule.from_config(cfg.diffusion, device))


def default_labels(n: int, num_classes: int) -> torch.Tensor | None:
    """Sample i gets label i mod num_classes (balanced classes); None for an unconditional model."""
    return torch.arange(n) % num_classes if num_classes > 0 else None


def parse_labels(spec: list[int] | None, n: int, num_classes: int) -> torch.Tensor | None:
    if num_classes == 0:
        if spec:
            raise ConfigError("--labels given but the model is unconditional (num_classes = 0)")
        return None
    if not spec:
        return default_labels(n, num_classes)
    bad = [y for y in spec if not 0 <= y < num_classes]
    if bad:
        raise ConfigError(f"labels {bad} are outside 0..{num_classes - 1}")
    return torch.tensor(spec, dtype=torch.long).repeat((n + len(spec) - 1) // len(spec))[:n]


@torch.no_grad()
def generate(loaded: Loaded, *, n: int, seed: int = 0, sampler: str = "ddim", steps: int = 50, eta: float = 0.0,
             guidance: float = 1.0, labels: torch.Tensor | None = None, batch_size: int = 256, clip=1.0,
             spacing: str = "trailing", callback=None, device=None, accel=None, timings: dict | None = None,
             refiner=None):
    """n samples as float [-1, 1] on the CPU, with their labels, seeds and the sampling time in seconds.

    sampler "student" is the few-step sampler of an ADD student run (1 to len(student_timesteps) steps).
    refiner (`fastdiff.models.refiner.Refiner`): applied to each batch's output, inside the timed region.
    callback(i, t, x, x0) sees the first batch only (for trajectory figures). `accel` (`fastdiff.runtime.AccelOptions`)
    selects the fast paths; None or all-off is the plain loop. `timings`, when given, receives setup_s (compile and
    capture) and sampling_s (the rest).
    """
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
    if sampler == "student" and not loaded.config.is_student:
        raise ConfigError(f"{loaded.path} is not an ADD student run; sample it with --sampler ddim or ddpm")
    if n < 1:
        raise ConfigError(f"--n must be at least 1, got {n}")
    mc, dc = loaded.config.model, loaded.config.diffusion
    device = device or next(loaded.model.parameters()).device
    seeds = seeds_for(seed, n)
    shape = (mc.in_channels, mc.image_size, mc.image_size)
    null = loaded.model.null_label
    out = []
    table = sampler_table(loaded.schedule, sampler, steps, eta=eta, prediction=dc.prediction, spacing=spacing,
                          device=device, trained_timesteps=_trained_timesteps(loaded))
    fast = None
    if accel is not None and not accel.plain:
        fast = _fast_sampler(loaded, accel, device, shape, guidance, clip)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for start in range(0, n, batch_size):
        s = seeds[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device) if labels is not None else None
        x = initial_noise(s, shape, device)
        cb = callback if start == 0 else None
        if fast is not None:
            x = fast.run(x, table, seeds=s, labels=y, callback=cb)
        else:
            x = run_table(loaded.model, x, table, seeds=s, labels=y, guidance=guidance, null_label=null, clip=clip,
                          callback=cb)
        if refiner is not None:
            x = refiner(x).clamp(-clip, clip) if clip is not None else refiner(x)
        out.append(x.float().cpu())
    seconds = time.perf_counter() - t0
    if timings is not None:
        timings["setup_s"] = fast.setup_s if fast is not None else 0.0
        timings["sampling_s"] = seconds - timings["setup_s"]
    return torch.cat(out), labels, seeds, seconds


def _fast_sampler(loaded: Loaded, accel, device, shape, guidance, clip):
    return FastSampler(loaded.model, accel, device=device, shape=shape, guidance=guidance,
                       null_label=loaded.model.null_label, clip=clip, capacity=loaded.schedule.num_timesteps)


def _trained_timesteps(loaded: Loaded):
    return loaded.config.distill.student_timesteps if loaded.config.is_student else None


def sampler_table(schedule: NoiseSchedule, sampler: str, steps: int | None, *, eta: float = 0.0,
                  prediction: str = "eps", spacing: str = "trailing", device=None,
                  trained_timesteps=None) -> StepTable:
    """The StepTable that `sample_ddim` / `sample_ddpm` (fixed-small variance) / `sample_student` would run.

    sampler "student" needs `trained_timesteps`, the timesteps the student was distilled on.
    """
    if sampler == "student":
        ts = student_timesteps(trained_timesteps, steps)
        return student_table(schedule, ts, prediction=prediction, device=device)
    ts = make_timesteps(schedule.num_timesteps, steps or schedule.num_timesteps, spacing)
    if sampler == "ddim":
        return ddim_table(schedule, ts, eta=eta, prediction=prediction, device=device)
    return ddpm_table(schedule, ts, prediction=prediction, device=device)


class TrajectoryRecorder:
    """A sampler callback keeping x_t and the x0 prediction of the first `rows` samples at ~`cols` steps."""

    def __init__(self, total_steps: int, rows: int = 4, cols: int = 10):
        self.rows = rows
        self.total_steps = total_steps
        picks = torch.linspace(0, total_steps - 1, min(cols, total_steps)).round().long().tolist()
        self.keep = set(picks)
        self.frames: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def __call__(self, i, t, x, x0):
        if i in self.keep:
            label = f"step {i + 1}/{self.total_steps}\nt={int(t[0])}"
            self.frames.append((label, x[: self.rows].float().cpu(), x0[: self.rows].float().cpu()))
