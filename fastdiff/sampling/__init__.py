"""The one sampling entry point: `resolve_settings` (settings.py) once, then `sample` for n images.

The samplers in `fastdiff.diffusion` are plain functions over any model; this module is the part that knows
about fastdiff's checkpoints and configs (`load_run`), the refiner and the fast path (`fast.py`). `fastdiff
sample`, `fastdiff eval`, `python -m fastdiff.distill_table`, `fastdiff bench` and `fastdiff.Pipeline` all sample
through `sample`, so that the same settings give the same images bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from fastdiff import checkpoint as ckpt
from fastdiff import state_dicts
from fastdiff.config import RunConfig, SampleConfig, load_config
from fastdiff.config_checks import count, flag, integer, path_arg
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
from fastdiff.diffusion.parameterization import check_prediction
from fastdiff.diffusion.samplers import StepTable
from fastdiff.errors import CheckpointError, ConfigError
from fastdiff.models import UNet
from fastdiff.models.refiner import load_refiner
from fastdiff.runtime import resolve_device, synchronize
from fastdiff.sampling.fast import FastSampler
from fastdiff.sampling.settings import SAMPLERS, SampleSettings, resolve_settings
from fastdiff.sampling.trajectory import TrajectoryRecorder


@dataclass
class Denoiser:
    """A denoiser model(x, t, labels) -> eps | v | x0 and what sampling needs to know about it.

    `load_run` builds one from a fastdiff run; `Denoiser.from_config` from any model with a fastdiff RunConfig
    (a diffusers import, a bench preset); `fastdiff.Pipeline` from a user's own model. `null_label` is the label
    of the unconditional class (None: no classifier-free guidance); `defaults` are the run's sampling defaults.
    """

    model: Callable
    schedule: NoiseSchedule
    image_shape: tuple[int, int, int]
    device: torch.device
    num_classes: int = 0
    null_label: int | None = None
    prediction: str = "eps"
    student_timesteps: tuple[int, ...] | None = None  # set on ADD students: the timesteps they were distilled on
    defaults: SampleConfig = field(default_factory=SampleConfig)
    config: RunConfig | None = None
    path: str = ""
    # FastSamplers built for this denoiser, by settings: their compiled steps and CUDA graphs are reused by later
    # calls of `sample` (a new FastSampler would compile and capture again).
    fast_samplers: dict = field(default_factory=dict, repr=False, compare=False)
    # one sampling of this model at a time (`_exclusive`): its fast samplers' static buffers, its weights' layout
    lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)
    sampling_in: int | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        shape = self.image_shape
        if isinstance(shape, (str, bytes)) or not hasattr(shape, "__len__") or len(shape) != 3:
            raise ConfigError(f"image_shape must be (channels, height, width), got {shape!r}")
        self.image_shape = tuple(count(f"image_shape[{i}]", s) for i, s in enumerate(shape))  # 8.7 was 8
        self.device = resolve_device(self.device)
        check_prediction(self.prediction)
        self.num_classes = integer("num_classes", self.num_classes)
        if self.num_classes < 0:
            raise ConfigError(f"num_classes={self.num_classes} must be >= 0 (0: unconditional)")
        if self.null_label is not None:
            self.null_label = integer("null_label", self.null_label)
            if not self.num_classes:
                raise ConfigError(f"null_label={self.null_label} applies to a class-conditional model only "
                                  "(num_classes=0); pass None")
            if not 0 <= self.null_label <= self.num_classes:
                raise ConfigError(f"null_label={self.null_label} must be in 0..{self.num_classes} "
                                  f"(num_classes={self.num_classes}), or None")
        if not isinstance(self.defaults, SampleConfig):
            raise ConfigError(f"defaults must be a fastdiff.config.SampleConfig, got {type(self.defaults).__name__}")

    @property
    def name(self) -> str:
        return self.path or type(self.model).__name__

    @classmethod
    def from_config(cls, model, cfg: RunConfig, schedule: NoiseSchedule | None = None, path: str = "",
                    device=None) -> "Denoiser":
        """A model that takes a fastdiff run's config: its image shape, classes, prediction and sample defaults."""
        mc = cfg.model
        device = torch.device(device) if device is not None else next(model.parameters()).device
        schedule = schedule if schedule is not None else NoiseSchedule.from_config(cfg.diffusion, device)
        return cls(model=model, schedule=schedule, image_shape=(mc.in_channels, mc.image_size, mc.image_size),
                   device=device, num_classes=mc.num_classes,
                   null_label=mc.num_classes if mc.num_classes and mc.null_class else None,
                   prediction=cfg.diffusion.prediction,
                   student_timesteps=cfg.distill.student_timesteps if cfg.is_student else None,
                   defaults=cfg.sample, config=cfg, path=str(path))


def load_run(checkpoint, device, use_ema: bool = True) -> Denoiser:
    """The model (EMA weights by default) and config of a run directory, a checkpoint folder, `pretrained:NAME`
    (which holds one set of weights, the run's EMA weights, as a copy of its folder does) or a diffusers pipeline or
    UNet2DModel folder (`fastdiff.interop.diffusers.load_diffusers`): what `fastdiff sample`, `eval` and
    `fastdiff.load` all read."""
    from fastdiff.interop.diffusers import is_diffusers_folder, load_diffusers

    use_ema = flag("use_ema", use_ema)
    checkpoint = path_arg("checkpoint", checkpoint)

    if not str(checkpoint).startswith("pretrained:"):
        p = Path(checkpoint)
        if is_diffusers_folder(p):
            _one_set_of_weights(p, use_ema, "a diffusers folder's are the ones it was saved with")
            model, cfg, schedule = load_diffusers(p, device)
            return Denoiser.from_config(model, cfg, schedule, path=str(p), device=device)
        if p.is_dir() and not ((p / "model.safetensors").exists() or ckpt.latest_checkpoint(p)):
            raise CheckpointError(f"{p} is neither a fastdiff run directory or checkpoint folder (no "
                                  "checkpoints/step-*/model.safetensors) nor a diffusers pipeline or UNet2DModel "
                                  "folder; train a model into it, or pass another")
    path = ckpt.resolve_checkpoint(checkpoint)
    one_set = ckpt.holds_one_set(path)
    if one_set:
        _one_set_of_weights(checkpoint, use_ema, "a pretrained model's are its run's EMA weights")
    cfg = load_config(path / "config.json")
    model = UNet(cfg.model)
    weights = "ema" if use_ema and not one_set else "model"
    state_dicts.load_model_weights(model, ckpt.load_tensors(path, weights), path)
    model = model.to(device).eval().requires_grad_(False)
    return Denoiser.from_config(model, cfg, path=str(path), device=device)


def _one_set_of_weights(source, use_ema: bool, which: str) -> None:
    """A pretrained model or a diffusers folder holds one set of weights (`which`: what they are): use_ema=False
    (--no-ema) read them too, without a word."""
    if not use_ema:
        raise ConfigError(f"{source} holds one set of weights ({which}), no raw ones to choose with --no-ema; drop it")


def labels_for(spec, n: int, num_classes: int) -> torch.Tensor | None:
    """The labels of n samples: None gives balanced classes (sample i gets i mod num_classes) on a conditional
    model and None on an unconditional one; an int labels all n; a sequence or tensor shorter than n repeats."""
    if num_classes == 0:
        if spec is not None and not (isinstance(spec, (list, tuple)) and len(spec) == 0):
            raise ConfigError("labels given but the model is unconditional (num_classes = 0); drop them")
        return None
    if spec is None or (isinstance(spec, (list, tuple)) and len(spec) == 0):
        return torch.arange(n) % num_classes
    try:
        labels = torch.as_tensor(spec).cpu()
    except (TypeError, ValueError, RuntimeError):  # a string, a ragged list, ...
        labels = None
    if labels is not None and labels.dim() > 1:  # [[1, 2]] was flattened without a word
        labels = None
    labels = labels.reshape(-1) if labels is not None else None
    if (labels is None or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool
            or len(labels) == 0):
        raise ConfigError(f"labels must be an integer or a 1-D list of integers in 0..{num_classes - 1}, got {spec!r}")
    bad = sorted({int(y) for y in labels if not 0 <= int(y) < num_classes})
    if bad:
        raise ConfigError(f"labels {bad} are outside 0..{num_classes - 1}")
    if len(labels) > n:  # fewer repeat to fill n; more would be dropped without a word
        raise ConfigError(f"{len(labels)} labels for {n} samples; give at most {n} (they repeat to fill them), or "
                          f"raise n (--n) to {len(labels)}")
    return labels.long().repeat((n + len(labels) - 1) // len(labels))[:n]


@dataclass
class SampleResult:
    """n samples as float [-1, 1] on the CPU with their labels and seeds.

    seconds: sampling (and refining) time without setup_s, the compile and capture time of the fast path;
    refine_s: the part of seconds spent in the refiner; unrefined: the samples before the refiner (None without).
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    seeds: torch.Tensor
    seconds: float
    setup_s: float
    settings: SampleSettings
    refine_s: float = 0.0
    unrefined: torch.Tensor | None = None

    @property
    def images_per_sec(self) -> float:
        return len(self.images) / max(self.seconds, 1e-9)


def sample(denoiser: Denoiser, settings: SampleSettings, *, n: int, seed: int = 0, labels=None,
           callback: Callable | None = None, callback_rows: int = 1, progress: bool = False) -> SampleResult:
    """n samples of `denoiser` with `settings` (from `resolve_settings`); sample i has seed seed + i.

    labels: see `labels_for` (None: balanced classes on a conditional model). callback(i, t, x, x0) sees the
    batches that hold the first `callback_rows` samples (the first batch by default; trajectory figures, whose
    rows must not depend on the batch size). With a refiner, each batch is refined inside the timed region.
    progress: a tqdm bar of the denoising steps of all batches, with ETA, on stderr (the CLI's default; it ticks
    through the step callback, so the fast path then clones each step's tensors for it). One sampling of a model
    at a time (`_exclusive`): calls from several threads run one after another, and a call from inside a step
    callback of the same model's sampling is an error (so is a callback that waits for another thread's).
    """
    n = count("n", n)
    settings = _settings_for(denoiser, settings)
    with _exclusive(denoiser):
        return _sample(denoiser, settings, n, seed, labels, callback, callback_rows, progress)


@contextlib.contextmanager
def _exclusive(denoiser: Denoiser):
    """Hold the model for one sampling: its fast samplers' static buffers and its weights' layout are shared by
    every call (four threads got one another's images; a sampling from a step callback changed the outer one's).
    A module in training mode samples in eval mode (dropout, batch-norm statistics would change every sample) and
    is put back as it was."""
    me = threading.get_ident()
    if denoiser.sampling_in == me:
        raise ConfigError(f"sampling {denoiser.name} again from inside a step callback of its own sampling: its "
                          "fast path's buffers are in use; sample after the call returns")
    with denoiser.lock:
        denoiser.sampling_in = me
        module = denoiser.model if isinstance(denoiser.model, torch.nn.Module) else None
        training = {m: m.training for m in module.modules()} if module is not None and module.training else {}
        if training:
            module.eval()
        try:
            yield
        finally:
            denoiser.sampling_in = None
            for m, mode in training.items():
                m.training = mode


def _sample(denoiser: Denoiser, settings: SampleSettings, n: int, seed, labels, callback, callback_rows: int,
            progress: bool) -> SampleResult:
    device, shape = denoiser.device, denoiser.image_shape
    _check_result_fits(n, shape, refined=bool(settings.refiner))
    labels = labels_for(labels, n, denoiser.num_classes)
    seeds = seeds_for(seed, n)
    table = sampler_table(denoiser.schedule, settings.sampler, settings.steps, eta=settings.eta,
                          prediction=denoiser.prediction, spacing=settings.spacing, device=device,
                          trained_timesteps=denoiser.student_timesteps)
    refiner = load_refiner(settings.refiner, device) if settings.refiner else None
    fast = None if settings.accel.plain else _fast_sampler(denoiser, settings)
    setup_before = fast.setup_s if fast is not None else 0.0
    images, unrefined, refine_s = [], [], 0.0
    starts = range(0, n, settings.batch_size)
    bar = tqdm(total=len(starts) * len(table), desc="sampling", unit="step", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    synchronize(device)
    t0 = time.perf_counter()
    with torch.inference_mode(), _batch_memory(settings.batch_size, n, shape, device), bar:
        for start in starts:
            s = seeds[start : start + settings.batch_size].to(device)
            y = labels[start : start + settings.batch_size].to(device) if labels is not None else None
            x = initial_noise(s, shape, device)
            cb = _ticking(bar, callback if start < callback_rows else None)
            if fast is not None:
                x = fast.run(x, table, seeds=s, labels=y, callback=cb)
            else:
                x = run_table(denoiser.model, x, table, seeds=s, labels=y, guidance=settings.guidance,
                              null_label=denoiser.null_label, clip=settings.clip, callback=cb)
            if refiner is not None:
                synchronize(device)
                r0 = time.perf_counter()
                unrefined.append(x.float().cpu())
                x = refiner(x)
                x = x.clamp(-settings.clip, settings.clip) if settings.clip is not None else x
                synchronize(device)
                refine_s += time.perf_counter() - r0
            images.append(x.float().cpu())
    elapsed = time.perf_counter() - t0
    setup_s = fast.setup_s - setup_before if fast is not None else 0.0
    images = torch.cat(images)
    if not torch.isfinite(images).all():  # finite weights can still overflow: never hand out a black grid
        bad = int((~torch.isfinite(images.flatten(1))).any(1).sum())
        guided = labels is not None and settings.guidance is not None and settings.guidance > 1
        cause = (f"guidance {settings.guidance:g} amplified its output past the float range (lower --guidance), or "
                 if guided else "")
        checked = " although its weights are finite; " if denoiser.path else "; "  # a loaded model's were checked
        raise CheckpointError(f"{bad} of {len(images)} samples of {denoiser.path or 'the model'} are NaN or infinite"
                              f"{checked}{cause}the weights are damaged or the model diverged")
    return SampleResult(images=images, labels=labels, seeds=seeds, seconds=elapsed - setup_s,
                        setup_s=setup_s, settings=settings, refine_s=refine_s,
                        unrefined=torch.cat(unrefined) if unrefined else None)


def _settings_for(denoiser: Denoiser, settings: SampleSettings) -> SampleSettings:
    """settings checked against this denoiser by `resolve_settings` itself (the one check): settings resolved for
    another model ran a student off its timesteps, dropped guidance on an unconditional model, and hand-built
    ones ran 1000 steps for steps 0."""
    if not isinstance(denoiser, Denoiser):
        raise ConfigError(f"sample takes a Denoiser (load_run(...), or a Pipeline's .denoiser), got "
                          f"{type(denoiser).__name__}")
    if not isinstance(settings, SampleSettings):
        raise ConfigError(f"settings must be a SampleSettings from resolve_settings, got {type(settings).__name__}")
    return resolve_settings(denoiser, denoiser.device, accel=settings.accel, sampler=settings.sampler,
                            steps=settings.steps, eta=settings.eta, guidance=settings.guidance,
                            spacing=settings.spacing, clip=math.inf if settings.clip is None else settings.clip,
                            batch_size=settings.batch_size, refiner=settings.refiner)


def _check_result_fits(n: int, shape: tuple[int, int, int], refined: bool) -> None:
    """One ConfigError, before anything is allocated, when n samples cannot be held even in all of this machine's
    memory: float32 images, twice over while the batches are joined (four times with a refiner's unrefined copy),
    plus a seed and a label each. Only a certain failure is refused; a run that might fit is left to run."""
    total = _host_memory_bytes()
    need = n * (math.prod(shape) * 4 * 2 * (2 if refined else 1) + 16)
    if total is None or need <= total:
        return
    fits = total // (need // n)
    raise ConfigError(f"--n {n} samples of {'x'.join(map(str, shape))} need about {need / 2**30:,.0f} GiB of memory "
                      f"but this machine has {total / 2**30:,.0f} GiB; use a smaller --n (at most about {fits:,}), "
                      "in several runs with --seed if you need more")


def _host_memory_bytes() -> int | None:
    """This machine's physical memory, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


_OUT_OF_MEMORY = ("out of memory", "not enough memory", "can't allocate memory")  # CUDA, MPS, the CPU allocator


@contextlib.contextmanager
def _batch_memory(batch_size: int, n: int, shape: tuple[int, int, int], device: torch.device):
    """Turn the allocator's out-of-memory error inside the sampling loop into one ConfigError naming the fix."""
    try:
        yield
    except RuntimeError as e:  # torch.OutOfMemoryError on CUDA; a RuntimeError from the CPU allocator
        if not (isinstance(e, torch.cuda.OutOfMemoryError) or any(m in str(e) for m in _OUT_OF_MEMORY)):
            raise
        batch = min(batch_size, n)
        raise ConfigError(f"sampling {batch} images of {'x'.join(map(str, shape))} at once ran out of {device.type} "
                          f"memory; use a smaller --batch-size (e.g. {max(1, batch // 4)})") from None


def _ticking(bar: tqdm, callback: Callable | None) -> Callable | None:
    """`callback` with one tick of `bar` per denoising step; just `callback` when the bar is off."""
    if bar.disable:
        return callback

    def step(i, t, x, x0):
        bar.update()
        if callback is not None:
            callback(i, t, x, x0)
    return step


def _fast_sampler(denoiser: Denoiser, settings: SampleSettings) -> FastSampler:
    key = (dataclasses.astuple(settings.accel), settings.guidance, settings.clip)
    if key not in denoiser.fast_samplers:
        denoiser.fast_samplers[key] = FastSampler(
            denoiser.model, settings.accel, device=denoiser.device, shape=denoiser.image_shape,
            guidance=settings.guidance, null_label=denoiser.null_label, clip=settings.clip,
            capacity=denoiser.schedule.num_timesteps, conditional=denoiser.num_classes > 0)
    return denoiser.fast_samplers[key]


def sampler_table(schedule: NoiseSchedule, sampler: str, steps: int | None, *, eta: float = 0.0,
                  prediction: str = "eps", spacing: str = "trailing", device=None,
                  trained_timesteps=None) -> StepTable:
    """The StepTable that `sample_ddim` / `sample_ddpm` (fixed-small variance) / `sample_student` would run.

    sampler "student" needs `trained_timesteps`, the timesteps the student was distilled on.
    """
    if sampler == "student":
        ts = student_timesteps(trained_timesteps, steps)
        return student_table(schedule, ts, prediction=prediction, device=device)
    ts = make_timesteps(schedule.num_timesteps, schedule.num_timesteps if steps is None else steps, spacing)
    if sampler == "ddim":
        return ddim_table(schedule, ts, eta=eta, prediction=prediction, device=device)
    return ddpm_table(schedule, ts, prediction=prediction, device=device)


__all__ = ["SAMPLERS", "Denoiser", "SampleResult", "SampleSettings", "TrajectoryRecorder", "labels_for", "load_run",
           "resolve_settings", "sample", "sampler_table"]
