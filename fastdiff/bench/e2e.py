"""End-to-end rows: sampling and training images/s of a preset's UNet, the providers of a job interleaved.

Every provider starts from the same randomly initialised fastdiff UNet (seed 0; diffusers' model is
`diffusers_ref.twin` of it) and the same inputs: initial noise from per-sample seeds and balanced labels for
sampling, one fixed synthetic batch for training. Sampling runs a case's StepTable (DDIM eta 0 or fixed-small
DDPM, trailing timesteps, the preset's guidance and clipping; diffusers' scheduler at the same settings); a case
may time only its first `timed_steps` steps, and images/s is then extrapolated to the whole run (every step does
the same work) and the row says so. A training step is loss + backward + clip + AdamW + LR schedule + EMA for
every provider.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

import torch

from fastdiff.bench import diffusers_ref
from fastdiff.bench.providers import backend_of, describe, provider_options, unavailable, with_backend
from fastdiff.bench.telemetry import TelemetrySampler
from fastdiff.bench.timing import error_status, measure
from fastdiff.config import preset_config
from fastdiff.diffusion import NoiseSchedule, initial_noise, run_table, seeds_for
from fastdiff.diffusion.samplers import StepTable
from fastdiff.models import UNet
from fastdiff.ops import use_backend
from fastdiff.runtime import AccelOptions, autocast, compile_fn
from fastdiff.sampling import sampler_table
from fastdiff.sampling.fast import FastSampler, autocast_model
from fastdiff.train.ddpm import diffusion_loss
from fastdiff.train.ema import EMA
from fastdiff.train.lr import warmup_lambda
from fastdiff.train.step import adamw, make_train_step


@dataclass(frozen=True)
class SampleCase:
    sampler: str  # ddpm | ddim
    steps: int  # the sampler's steps (1000 for DDPM)
    timed_steps: int  # the steps one timed call runs; images/s is extrapolated to `steps`

    @property
    def label(self) -> str:
        return f"{self.sampler}-{self.steps}"


@dataclass(frozen=True)
class Job:
    """Providers measured against each other, interleaved, on one preset and batch (and each sampling case)."""

    section: str  # sample | train
    preset: str
    batch: int
    providers: tuple[tuple[str, str], ...]  # (provider, dtype: fp32 | bf16)
    cases: tuple[SampleCase, ...] = field(default=())  # sampling only

    def row(self, provider: str, dtype: str, case: SampleCase | None = None, **fields) -> dict:
        head = {"section": self.section, "preset": self.preset, "batch": self.batch, "provider": provider,
                "dtype": dtype}
        what = f"{self.section} {self.preset} b{self.batch}"
        if case is not None:
            head.update(sampler=case.label, timed_steps=case.timed_steps)
            what += f" {case.label}/{case.timed_steps}"
        return {**head, "case": what, **fields}


def base_unet(cfg) -> torch.nn.Module:
    """The preset's fastdiff UNet, randomly initialised with seed 0 (every provider starts from it)."""
    torch.manual_seed(0)
    return UNet(cfg.model)


def _model(provider: str, base: torch.nn.Module, device) -> torch.nn.Module:
    return (diffusers_ref.twin(base) if provider == "diffusers" else copy.deepcopy(base)).to(device)


@dataclass
class SampleInputs:
    """What every provider of a sampling job shares."""

    cfg: object
    device: torch.device
    batch: int

    def __post_init__(self):
        mc = self.cfg.model
        self.shape = (mc.in_channels, mc.image_size, mc.image_size)
        self.seeds = seeds_for(0, self.batch).to(self.device)
        self.x = initial_noise(self.seeds, self.shape, self.device)
        self.labels = (torch.arange(self.batch, device=self.device) % mc.num_classes) if mc.num_classes else None
        self.null = mc.num_classes if mc.num_classes else None
        self.guidance = self.cfg.sample.guidance if mc.num_classes else 1.0
        self.clip = self.cfg.sample.clip
        self.schedule = NoiseSchedule.from_config(self.cfg.diffusion, self.device)

    def table(self, case: SampleCase) -> StepTable:
        full = sampler_table(self.schedule, case.sampler, case.steps, prediction=self.cfg.diffusion.prediction,
                             device=self.device)
        return StepTable(full.timesteps[: case.timed_steps], full.coefs[: case.timed_steps])


def sampler_for(provider: str, dtype: str, base, s: SampleInputs, options: AccelOptions | None = None):
    """case -> the callable that samples one batch for this provider (the model is built once per job).
    `options` replaces the provider's own (`provider_options`) for the fastdiff paths."""
    device = s.device
    model = _model(provider, base, device).eval().requires_grad_(False)
    if provider == "diffusers":
        forward = diffusers_ref.as_denoiser(model)

        def make(case):
            sched = diffusers_ref.scheduler(case.sampler, s.cfg.diffusion, clip=s.clip)

            def fn():
                with autocast(device, dtype):
                    return diffusers_ref.sample(forward, sched, s.x, steps=case.steps, timed_steps=case.timed_steps,
                                                labels=s.labels, guidance=s.guidance, null_label=s.null)
            return fn
        return make
    if provider in ("torch-compile", "fastdiff"):
        fast = FastSampler(model, options or provider_options(provider, dtype, device), device=device, shape=s.shape,
                           guidance=s.guidance, null_label=s.null, clip=s.clip, capacity=s.schedule.num_timesteps)

        def make(case, fast=fast):
            table = s.table(case)
            return lambda: fast.run(s.x, table, seeds=s.seeds, labels=s.labels)
        return make
    forward = autocast_model(model, device, dtype)

    def make(case):
        table = s.table(case)

        def fn():
            with torch.no_grad():
                return run_table(forward, s.x, table, seeds=s.seeds, labels=s.labels, guidance=s.guidance,
                                 null_label=s.null, clip=s.clip)
        return fn
    return make


def _prepare(job: Job, device, quick: bool, build) -> tuple[dict, dict]:
    """({key: build(provider, dtype)} for the providers that can run here, {key: why not} for the others)."""
    built, status = {}, {}
    for key in job.providers:
        status[key] = unavailable(key[0], device, quick)
        if status[key] is None:
            try:
                with use_backend(backend_of(key[0])):
                    built[key] = build(*key)
            except Exception as e:  # noqa: BLE001 - reported in the provider's rows
                status[key] = error_status(e)
    return built, status


def _timed_rows(job: Job, device, fns: dict, status: dict, fields: dict, *, rounds: int, warmup: int, per_image_s,
                case=None, log=None, budget=None):
    """Time fns interleaved and yield one row per provider of the job (a status row where it has no timing);
    fields: more values per provider; per_image_s(timing): the seconds one batch's whole run takes; log: a line
    per provider as its warm-up (compile, capture) ends; budget: once spent, the providers not yet warm are
    skipped and the warm ones timed (`timing.measure`'s stop)."""
    tel = TelemetrySampler(device)
    on_warm = None
    if log is not None:
        def on_warm(key, seconds):
            log(f"{job.row(*key, case)['case']} {key[0]} {key[1]}: warm-up (compile, capture) {seconds:.1f} s")
    timings = measure({k: with_backend(k[0], fn) for k, fn in fns.items()}, device, rounds=rounds, warmup=warmup,
                      telemetry=tel, on_warm=on_warm, stop=budget.exhausted if budget is not None else None
                      ) if fns else {}
    for key in job.providers:
        t = timings.get(key, status.get(key))
        if isinstance(t, str):
            yield job.row(*key, case, status=t)
            continue
        row = job.row(*key, case, images_per_s=job.batch / per_image_s(t), **t.to_dict(),
                      **{"options": describe(key[0], provider_options(*key, device), device), **fields[key]},
                      status="ok")
        summary = tel.summary(key)
        yield {**row, **({"telemetry": summary} if summary else {}),
               **({"weights": diffusers_ref.WEIGHTS} if key[0] == "diffusers" else {})}


def sample_rows(job: Job, device, *, rounds: int, warmup: int = 1, quick: bool = False, budget=None, log=None):
    """Yield one row per (case, provider) of a sampling job (log: as in `_timed_rows`)."""
    if budget is not None and budget.exhausted():  # before building any model
        yield from (job.row(p, d, case, status="skipped: time budget") for case in job.cases for p, d in job.providers)
        return
    device = torch.device(device)
    s = SampleInputs(preset_config(job.preset), device, job.batch)
    base = base_unet(s.cfg)
    makers, status = _prepare(job, device, quick, lambda p, d: sampler_for(p, d, base, s))
    for case in job.cases:
        if budget is not None and budget.exhausted():
            yield from (job.row(p, d, case, status="skipped: time budget") for p, d in job.providers)
            continue
        fields = {key: {"extrapolated": case.timed_steps < case.steps} for key in makers}
        yield from _timed_rows(job, device, {k: make(case) for k, make in makers.items()}, status, fields,
                               rounds=rounds, warmup=warmup, case=case, log=log, budget=budget,
                               per_image_s=lambda t, c=case: t.median_ms / 1e3 * c.steps / c.timed_steps)


def train_step_for(provider: str, dtype: str, base, cfg, device, x0, labels, options: AccelOptions | None = None,
                   channels_last: bool | None = None):
    """One optimisation step of this provider on the fixed batch, and the name of the step class. `options` and
    `channels_last` replace the provider's own (fastdiff: what `fastdiff train` does; the others NCHW)."""
    tc = cfg.train
    opts = options or provider_options(provider, dtype, device)
    if channels_last is None:  # fastdiff: the layout `fastdiff train` resolves for this device
        channels_last = tc.for_device(device).channels_last if provider == "fastdiff" else False
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = _model(provider, base, device).to(memory_format=memory_format).train()
    x0 = x0.contiguous(memory_format=memory_format)
    schedule = NoiseSchedule.from_config(cfg.diffusion, device)
    opt = adamw(model.parameters(), device, lr=tc.lr)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(tc.warmup_steps))
    ema = EMA(model, tc.ema_decay)
    forward = diffusers_ref.as_denoiser(model) if provider == "diffusers" else compile_fn(model, opts)
    null = cfg.model.num_classes if cfg.model.num_classes else None

    def loss_fn(g, x, y):
        return diffusion_loss(forward, schedule, x, y if null is not None else None, g,
                              prediction=cfg.diffusion.prediction,
                              p_uncond=tc.p_uncond, null_label=null, device=device, amp=dtype)

    step_fn = make_train_step(model, opt, loss_fn, grad_clip=tc.grad_clip, seed=0, device=device, amp=dtype,
                              options=opts)
    counter = iter(range(10**9))

    def fn():
        k = next(counter)
        loss, _ = step_fn(k, x0, labels)
        lr_sched.step()
        ema.update(model, k)
        return loss

    # what the step ran with, for its row: the training layout, and no sampling row limit
    fn.options = describe(provider, replace(opts, channels_last=channels_last, max_rows=0), device)
    return fn, type(step_fn).__name__


def train_batch(cfg, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed synthetic training batch (images in [-1, 1], labels) that every provider trains on."""
    mc = cfg.model
    gen = torch.Generator().manual_seed(0)
    x0 = (torch.rand((batch, mc.in_channels, mc.image_size, mc.image_size), generator=gen) * 2 - 1).to(device)
    labels = torch.randint(0, max(mc.num_classes, 1), (batch,), generator=gen).to(device)
    return x0, labels


def train_rows(job: Job, device, *, rounds: int, warmup: int = 1, quick: bool = False, budget=None, log=None):
    """Yield one row per provider of a training job: images/s of a full optimisation step (log: as in
    `_timed_rows`)."""
    if budget is not None and budget.exhausted():
        yield from (job.row(p, d, status="skipped: time budget") for p, d in job.providers)
        return
    device = torch.device(device)
    cfg = preset_config(job.preset)
    base = base_unet(cfg)
    x0, labels = train_batch(cfg, job.batch, device)
    steps, status = _prepare(job, device, quick, lambda p, d: train_step_for(p, d, base, cfg, device, x0, labels))
    yield from _timed_rows(job, device, {k: fn for k, (fn, _) in steps.items()}, status,
                           {k: {"step": name, "options": fn.options} for k, (fn, name) in steps.items()},
                           rounds=rounds, warmup=warmup,
                           per_image_s=lambda t: t.median_ms / 1e3, log=log, budget=budget)
