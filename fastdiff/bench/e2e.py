"""End-to-end benchmarks: sampling images/s and training images/s of a preset's UNet, per provider.

Providers (the same architecture and weights initialisation in each):
  torch-eager    the plain PyTorch reference: reference ops (FASTDIFF_BACKEND=torch), NCHW, no compile, no graphs;
                 `run_table` for sampling, the eager `TrainStep` for training.
  torch-compile  reference ops under torch.compile (the whole denoising step for sampling, the model for
                 training), NCHW, no CUDA graphs.
  fastdiff       what `fastdiff sample` / `fastdiff train` run by default: on a GPU every fast path of
                 `fastdiff.sampling.fast` and `fastdiff.train.step` (fused ops, channels_last, torch.compile,
                 CUDA graphs: one replay per denoising step, a graphed training step); on the CPU the plain
                 loop with the automatic op backend.
  fastdiff-native  the torch-eager loop with the native kernels of the optional extension fastdiff._C
                 (FASTDIFF_BACKEND=native: its C++ CPU or CUDA GroupNorm+SiLU and sampler step), NCHW, no compile.
  diffusers      diffusers' UNet2DModel at the same configuration with its DDPM/DDIM scheduler loop (eager).
A training step is loss + backward + clip + AdamW step + LR schedule + EMA update for every provider.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from fastdiff.bench import diffusers_ref
from fastdiff.bench.telemetry import TelemetrySampler
from fastdiff.bench.timing import time_calls
from fastdiff.config import preset_config
from fastdiff.diffusion import NoiseSchedule, initial_noise, run_table, seeds_for
from fastdiff.diffusion.samplers import StepTable
from fastdiff.models import UNet
from fastdiff.runtime import AccelOptions, compile_fn, peak_memory_mb
from fastdiff.sampling import sampler_table
from fastdiff.sampling.fast import FastSampler, autocast_model
from fastdiff.train.ema import EMA
from fastdiff.train.lr import warmup_lambda
from fastdiff.train.step import make_train_step

PROVIDERS = ("torch-eager", "torch-compile", "fastdiff", "fastdiff-native", "diffusers")


@dataclass
class SampleCase:
    sampler: str  # ddpm | ddim
    steps: int  # the sampler's steps (1000 for DDPM)
    timed_steps: int  # the steps one timed call runs; images/s is extrapolated to `steps`

    @property
    def label(self) -> str:
        return f"{self.sampler}-{self.steps}"


@dataclass
class Job:
    """One provider's runner (a built, possibly compiled model) and the cases measured with it."""

    section: str  # sample | train
    preset: str
    provider: str
    dtype: str  # fp32 | bf16
    batch: int
    cases: list[SampleCase] = field(default_factory=list)  # sampling only; training has one case


@contextlib.contextmanager
def ops_backend(name: str | None):
    """FASTDIFF_BACKEND=name while the block runs (None: the automatic choice). Compilation bakes it in."""
    old = os.environ.get("FASTDIFF_BACKEND")
    if name is None:
        os.environ.pop("FASTDIFF_BACKEND", None)
    else:
        os.environ["FASTDIFF_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FASTDIFF_BACKEND", None)
        else:
            os.environ["FASTDIFF_BACKEND"] = old


def provider_options(provider: str, dtype: str, device: torch.device) -> AccelOptions:
    """fastdiff: what `fastdiff sample` / `fastdiff train` use by default on this device (all fast paths on a
    GPU; on the CPU the plain loop with the automatic op backend); the others as described above."""
    if provider == "torch-compile":
        return AccelOptions(amp=dtype, compile=True)
    if provider == "fastdiff":
        return AccelOptions.for_device(device, amp=dtype)
    return AccelOptions(amp=dtype)


def backend_of(provider: str) -> str | None:
    """The FASTDIFF_BACKEND a provider runs under (None: the automatic choice)."""
    if provider == "fastdiff-native":
        return "native"
    return "torch" if provider in ("torch-eager", "torch-compile") else None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device) -> float | None:
    return round(peak_memory_mb(device), 1) if device.type == "cuda" else None


def _model(preset: str, device, provider: str):
    cfg = preset_config(preset)
    torch.manual_seed(0)
    model = diffusers_ref.unet(cfg.model) if provider == "diffusers" else UNet(cfg.model)
    return cfg, model.to(device)


def measure(fn, device, *, reps: int, warmup: int = 1, setup: Callable[[], float] | None = None) -> dict:
    """First call (wall clock, includes compile and capture), `warmup` more, then the median of `reps` calls."""
    _reset_peak(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first_s = time.perf_counter() - t0
    tel = TelemetrySampler(device)
    timing = time_calls(fn, device, warmup=warmup, reps=reps, region=lambda: tel)
    out = {"median_ms": timing.median_ms, "p20_ms": timing.p20_ms, "p80_ms": timing.p80_ms, "reps": timing.reps,
           "first_call_s": round(first_s, 3), "peak_mem_mb": _peak_mb(device)}
    if setup is not None:
        out["setup_s"] = round(setup(), 3)
    summary = tel.summary()
    if summary is not None:
        out["telemetry"] = summary
    return out


def sample_rows(job: Job, device, *, reps: int, warmup: int = 1, budget=None):
    """Yield one row per sampling case of the job (the runner is built once, the buckets are reused)."""
    cfg, model = _model(job.preset, device, job.provider)
    model.eval().requires_grad_(False)
    mc, dc = cfg.model, cfg.diffusion
    guidance = cfg.sample.guidance if mc.num_classes else 1.0
    null = mc.num_classes if mc.num_classes else None
    seeds = seeds_for(0, job.batch).to(device)
    shape = (mc.in_channels, mc.image_size, mc.image_size)
    x = initial_noise(seeds, shape, device)
    labels = (torch.arange(job.batch, device=device) % mc.num_classes) if mc.num_classes else None
    schedule = NoiseSchedule.from_config(dc, device)
    opts = provider_options(job.provider, job.dtype, device)
    with ops_backend(backend_of(job.provider)):
        fast = None
        if job.provider in ("torch-compile", "fastdiff"):
            fast = FastSampler(model, opts, device=device, shape=shape, guidance=guidance, null_label=null,
                               clip=cfg.sample.clip, capacity=dc.num_timesteps)
        forward = autocast_model(model, device, job.dtype)
        for case in job.cases:
            if budget is not None and budget.exhausted():
                yield {"sampler": case.label, "timed_steps": case.timed_steps, "status": "skipped: time budget"}
                continue
            full = sampler_table(schedule, case.sampler, case.steps, prediction=dc.prediction, device=device)
            table = StepTable(full.timesteps[: case.timed_steps], full.coefs[: case.timed_steps])
            if job.provider == "diffusers":
                sched = diffusers_ref.scheduler(case.sampler, dc, clip=cfg.sample.clip)

                def fn(sched=sched, case=case):
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=job.dtype == "bf16"):
                        return diffusers_ref.sample(model, sched, x, steps=case.steps, timed_steps=case.timed_steps,
                                                    labels=labels, guidance=guidance, null_label=null)
            elif fast is not None:
                def fn(table=table):
                    return fast.run(x, table, seeds=seeds, labels=labels)
            else:
                def fn(table=table):
                    with torch.no_grad():
                        return run_table(forward, x, table, seeds=seeds, labels=labels, guidance=guidance,
                                         null_label=null, clip=cfg.sample.clip)
            before = fast.setup_s if fast is not None else 0.0
            row = measure(fn, device, reps=reps, warmup=warmup,
                          setup=lambda: (fast.setup_s - before) if fast is not None else 0.0)
            seconds_per_image_run = row["median_ms"] / 1e3 * case.steps / case.timed_steps
            row.update(sampler=case.label, timed_steps=case.timed_steps, images_per_s=job.batch / seconds_per_image_run,
                       options=_describe(job.provider, opts), status="ok")
            yield row


def train_row(job: Job, device, *, reps: int, warmup: int = 1) -> dict:
    """Training images/s of one provider: a full optimisation step on a fixed synthetic batch."""
    from fastdiff.train.ddpm import diffusion_loss  # the loss `fastdiff train` optimises

    cfg, model = _model(job.preset, device, job.provider)
    mc, tc = cfg.model, cfg.train
    opts = provider_options(job.provider, job.dtype, device)
    channels_last = tc.channels_last if job.provider == "fastdiff" else False  # as `fastdiff train` does
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format).train()
    gen = torch.Generator().manual_seed(0)
    x0 = (torch.rand((job.batch, mc.in_channels, mc.image_size, mc.image_size), generator=gen) * 2 - 1)
    x0 = x0.to(device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, max(mc.num_classes, 1), (job.batch,), generator=gen).to(device)
    schedule = NoiseSchedule.from_config(cfg.diffusion, device)
    with ops_backend(backend_of(job.provider)):
        opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, fused=device.type == "cuda")
        lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(tc.warmup_steps))
        ema = EMA(model, tc.ema_decay)
        forward = diffusers_ref.as_denoiser(model) if job.provider == "diffusers" else compile_fn(model, opts)
        null = mc.num_classes if mc.num_classes else None

        def loss_fn(g, x, y):
            return diffusion_loss(forward, schedule, x, y, g, prediction=cfg.diffusion.prediction,
                                  p_uncond=tc.p_uncond, null_label=null, device=device, amp=job.dtype)

        step_fn = make_train_step(model, opt, loss_fn, grad_clip=tc.grad_clip, seed=0, device=device, amp=job.dtype,
                                  options=opts)
        counter = iter(range(10**9))

        def fn():
            k = next(counter)
            loss, _ = step_fn(k, x0, labels)
            lr_sched.step()
            ema.update(model, k)
            return loss

        row = measure(fn, device, reps=reps, warmup=warmup, setup=step_fn.take_setup_seconds)
    row.update(images_per_s=job.batch / (row["median_ms"] / 1e3), options=_describe(job.provider, opts),
               step=type(step_fn).__name__, status="ok")
    return row


def _describe(provider: str, opts: AccelOptions) -> str:
    if provider == "diffusers":
        return f"{opts.amp}+UNet2DModel"
    ops = {"torch": "reference-ops", "native": "native-ops"}.get(backend_of(provider), "fused-ops")
    return f"{opts.describe()}+{ops}"
