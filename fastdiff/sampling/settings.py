"""Sampling settings, resolved once: the denoiser's defaults (a run's `sample` config), then the caller's overrides.

`fastdiff sample`, `fastdiff eval`, `python -m fastdiff.distill_table`, `fastdiff bench` and `fastdiff.Pipeline`
all resolve their settings here, so a flag or keyword means the same thing everywhere:

    sampler     ddim | ddpm | student (default: the run's)
    steps       the run's when the sampler is the run's own; else ddim 50, ddpm all T, student all its timesteps
    eta         DDIM only (default: the run's); a non-zero eta for another sampler is an error
    guidance    classifier-free guidance scale (default: the run's; 1 on an unconditional model, where any other
                value is an error, as it is on a model without a null class)
    spacing     leading | trailing | linspace (default: the run's)
    clip        x0 is clamped to [-clip, clip]; inf or "none" for no clipping (None in `resolve_settings`'s result)
    batch_size  images per batch (default: `runtime.sample_batch_size`, 256 on a GPU, 64 on the CPU; the samples do
                not depend on it, up to the rounding of the convolutions, and of bf16 where it runs)
    accel       `AccelOptions.for_device(device)` (every fast path on a GPU, `runtime.cpu_choice` on the CPU), then the
                flat overrides compile, cuda_graphs, channels_last, amp, compile_mode, max_rows (the most rows
                one model call runs: `AccelOptions.max_rows`)
    refiner     a refiner run directory (`fastdiff train-refiner`), applied inside the timed region
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch

from fastdiff.config import SampleConfig
from fastdiff.config_checks import ETA_RANGE, GUIDANCE_RANGE, count, guides_untrained_null, integer, no_clip, number
from fastdiff.diffusion.samplers import SPACINGS, make_timesteps, student_grid, student_timesteps
from fastdiff.errors import ConfigError, FastdiffWarning
from fastdiff.runtime import AccelOptions, sample_batch_size

SAMPLERS = ("ddim", "ddpm", "student")
ACCEL_KEYS = ("compile", "cuda_graphs", "channels_last", "amp", "compile_mode", "max_rows")


@dataclass(frozen=True)
class SampleSettings:
    """Everything a sampling run reads besides its model, n, seed and labels. Build it with `resolve_settings`."""

    sampler: str
    steps: int
    eta: float
    guidance: float
    spacing: str
    clip: float | None
    batch_size: int
    accel: AccelOptions
    refiner: str | None = None


def resolve_settings(denoiser, device=None, *, accel: AccelOptions | None = None, **overrides) -> SampleSettings:
    """The settings of sampling `denoiser` (a `fastdiff.sampling.Denoiser`) on `device` (default: the denoiser's).

    overrides: sampler, steps, eta, guidance, spacing, clip, batch_size, refiner and the acceleration keys
    compile, cuda_graphs, channels_last, amp, compile_mode, max_rows; a value of None means "not given" (so CLI
    arguments pass straight through). accel: options to start from instead of `AccelOptions.for_device(device)`.
    Each bad value raises one ConfigError naming it and the fix.
    """
    known = {"sampler", "steps", "eta", "guidance", "spacing", "clip", "batch_size", "refiner", *ACCEL_KEYS}
    unknown = set(overrides) - known
    if unknown:
        raise ConfigError(f"unknown sampling option(s) {sorted(unknown)}; use {', '.join(sorted(known))}")
    given = {k: v for k, v in overrides.items() if v is not None}
    device = torch.device(device) if device is not None else denoiser.device
    run: SampleConfig = denoiser.defaults
    sampler = given.get("sampler", run.sampler)
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
    if sampler == "student" and denoiser.student_timesteps is None:
        raise ConfigError(f"{denoiser.name} is not an ADD student run; sample it with --sampler ddim or ddpm")
    spacing = given.get("spacing", run.spacing)
    steps = _steps(denoiser, sampler, given.get("steps"), spacing)
    eta = number("eta", given.get("eta", run.eta if sampler == "ddim" else 0.0), **ETA_RANGE)
    if eta != 0 and sampler != "ddim":
        raise ConfigError(f"eta={eta} applies to --sampler ddim only, not {sampler}; drop --eta")
    guidance = _guidance(denoiser, given.get("guidance"))
    if sampler == "student" and spacing != run.spacing:  # its timesteps are its run's
        raise ConfigError("spacing applies to the ddim and ddpm samplers; a student steps through its own "
                          "timesteps: drop --spacing")
    if spacing not in SPACINGS:
        raise ConfigError(f"unknown timestep spacing {spacing!r}; use one of {', '.join(SPACINGS)}")
    if sampler != "student" and steps == 1 and spacing != "trailing":  # its one timestep is 0
        raise ConfigError(f"1 {sampler} step with {spacing} spacing runs the model at timestep 0 only, on pure noise "
                          "(the images are that noise); use --spacing trailing, which starts at the noisiest "
                          "timestep, or more steps")
    if sampler != "student" and denoiser.student_timesteps is not None:
        _check_student_grid(denoiser, sampler, steps, spacing)
    clip = given.get("clip", run.clip)
    if no_clip(clip):  # "none" as the CLI's --clip none, or inf
        clip = math.inf
    if clip is not None:
        clip = number("clip", clip, lo=0, lo_open=True, finite=False, allowed="above 0 (inf for no clipping)")
    clip = None if clip is None or math.isinf(clip) else clip
    batch_size = count("batch_size", given.get("batch_size", sample_batch_size(device)))
    flat = {k: given[k] for k in ACCEL_KEYS if k in given}
    # for_device takes the overrides itself: the CPU's row limit follows the precision and layout they give
    options = (dataclasses.replace(accel, **flat) if accel is not None
               else AccelOptions.for_device(device, **flat)).check(device)
    refiner = given.get("refiner")
    if refiner is not None and not str(refiner).strip():
        raise ConfigError("an empty refiner names no run; pass a refiner run directory (fastdiff train-refiner), or "
                          "none")
    if refiner:  # checked now, before any sampling (or an evaluation classifier's training): its images' shape
        _check_refiner(denoiser, refiner)
    return SampleSettings(sampler=sampler, steps=steps, eta=eta, guidance=guidance, spacing=spacing, clip=clip,
                          batch_size=batch_size, accel=options, refiner=str(refiner) if refiner else None)


def _check_refiner(denoiser, refiner) -> None:
    """A refiner of this model's images (else one ConfigError), trained on this model's samples (else one
    FastdiffWarning: the weights differ from those its run recorded, e.g. another run's of the same shape, or a later
    checkpoint of its generator; a refiner from before 2026-12-07 recorded none)."""
    from fastdiff.models.refiner import refiner_config
    from fastdiff.sources import model_fingerprint

    _, rc, made_for = refiner_config(refiner)
    if (rc.in_channels, rc.image_size, rc.image_size) != tuple(denoiser.image_shape):
        raise ConfigError(f"the refiner {refiner} refines images {[rc.in_channels, rc.image_size, rc.image_size]}"
                          f", not {denoiser.name}'s {list(denoiser.image_shape)}; pass a refiner trained for this "
                          "model (`fastdiff train-refiner --checkpoint` it)")
    expected = made_for.get("generator_weights")
    if expected and expected != model_fingerprint(denoiser.model):
        warnings.warn(f"the refiner {refiner} was trained on the samples of other weights ({made_for.get('generator')}"
                      f", fingerprint {expected}) than {denoiser.name}'s: its corrections may not fit them; train a "
                      f"refiner for this model (fastdiff train-refiner --checkpoint {denoiser.path or 'RUN'})",
                      FastdiffWarning)  # its place here, not the caller's: once, though `sample` resolves again


def _steps(denoiser, sampler: str, steps: int | None, spacing: str) -> int:
    T = denoiser.schedule.num_timesteps
    if steps is None:
        if sampler == denoiser.defaults.sampler and denoiser.defaults.steps is not None:
            steps = denoiser.defaults.steps
        elif denoiser.student_timesteps is not None and sampler != "student":  # its DDIM or DDPM: the most of
            # its timesteps it can run on alone (all of them was refused for 999, 500: trailing 2 are 999, 499)
            fit = student_grid(denoiser.student_timesteps, T, spacing) if spacing in SPACINGS else []
            steps = max(fit, default=len(denoiser.student_timesteps))
        elif sampler == "ddpm":
            steps = T
        elif sampler == "student":
            steps = len(denoiser.student_timesteps)
        else:
            steps = SampleConfig.steps
        steps = min(steps, T)  # a default beyond a short schedule (a wrapped model's own) is all its timesteps
    steps = integer("steps", steps)
    if sampler == "student":
        student_timesteps(denoiser.student_timesteps, steps)  # raises for steps outside 1..len
    else:
        make_timesteps(T, steps, "trailing")  # raises for steps outside 1..T
    return steps


def student_grid_steps(denoiser, spacing: str = "trailing") -> list[int]:
    """The step counts at which a student's DDIM or DDPM with `spacing` runs only on the timesteps it was trained at
    (elsewhere its outputs are the teacher's half-forgotten ones): e.g. trailing 1, 2 and 4 on a student of 999,
    749, 499, 249."""
    return student_grid(denoiser.student_timesteps, denoiser.schedule.num_timesteps, spacing)


def _check_student_grid(denoiser, sampler: str, steps: int, spacing: str) -> None:
    """A student runs DDIM or DDPM only on its trained timesteps (`student_grid_steps`)."""
    ok = student_grid_steps(denoiser, spacing)
    if steps not in ok:
        trained = [int(t) for t in denoiser.student_timesteps]
        hint = f"--steps {' or '.join(map(str, ok))} ({spacing} spacing)" if ok else "another --spacing"
        raise ConfigError(f"{denoiser.name} is an ADD student trained at timesteps {trained}; {sampler} with {steps} "
                          f"steps would run it at others: use --sampler student, or {sampler} with {hint}")


def _guidance(denoiser, guidance: float | None) -> float:
    if guidance is None:  # the run's own guidance; an unconditional model has none to apply
        if denoiser.null_label is None:
            return 1.0
        guidance, given = denoiser.defaults.guidance, "its default guidance"
    else:
        given = "guidance"
    guidance = number("guidance", guidance, **GUIDANCE_RANGE)
    if guidance != 1.0 and denoiser.null_label is None:
        what = "is unconditional" if denoiser.num_classes == 0 else "has no null class"
        raise ConfigError(f"guidance={guidance:g} needs a class-conditional model with a null class, but "
                          f"{denoiser.name} {what}; use guidance 1")
    if denoiser.config is not None and guides_untrained_null(denoiser.config, guidance):
        raise ConfigError(f"{given} {guidance:g} guides against the null class, which {denoiser.name} never "
                          "trained (train.p_uncond 0: its embedding is random); use guidance 1")
    return guidance
