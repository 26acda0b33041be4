"""Samplers as plain functions over any `model(x, t, labels) -> output`.

Every sampler here is the same loop: for each step i, evaluate the model (with classifier-free guidance when
asked), then one `fastdiff.ops.sampler_step` with that step's coefficients:

    x0     = p*x_t + q*out                    (the parameterisation; optionally clipped)
    x_prev = A*x0 + B*x_t + sigma*z           (the sampler's update; z from the sample's own seed)

The coefficients of all steps are computed up front in float64 and moved to the device once, so the loop has
no host syncs. Noise comes from per-sample seeds: a sample depends only on its seed, label and settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from fastdiff import ops
from fastdiff.config_checks import ETA_RANGE, GUIDANCE_RANGE, integer, number
from fastdiff.diffusion.parameterization import check_prediction, x0_coefficients
from fastdiff.diffusion.schedules import NoiseSchedule
from fastdiff.errors import ConfigError
from fastdiff.reference import seeded_randn

SPACINGS = ("leading", "trailing", "linspace")
VARIANCES = ("fixed_small", "fixed_large")


def make_timesteps(num_train_timesteps: int, steps: int, spacing: str = "trailing") -> torch.Tensor:
    """Descending int64 timesteps, spaced as in diffusers / Lin et al. 2024, Table 2.

    leading:  0, r, 2r, ... (r = T // steps), reversed   -- never reaches T-1
    trailing: round(T - k*T/steps) - 1 for k = 0..steps-1 -- always starts at T-1
    linspace: round(linspace(0, T-1, steps)), reversed   -- both ends

    Computed with numpy's arange and linspace, as diffusers computes them: torch's float64 arange and linspace
    round differently in the last bit, which moves a value that lands near .5 to the other integer (trailing
    48 steps of 1000: 937 for diffusers' 936; linspace 27: 500 for 499). Always `steps` timesteps in [0, T):
    diffusers' trailing spacing gives one more, -1, for 62 of the 1000 counts of T = 1000 (61, 103, 121, ...).
    """
    T = num_train_timesteps
    if not 1 <= integer("steps", steps) <= T:
        raise ConfigError(f"steps={steps} must be between 1 and the {T} training timesteps")
    if spacing == "leading":
        ts = np.arange(steps, dtype=np.int64) * (T // steps)
    elif spacing == "trailing":
        # [:steps]: the arange's length rounds up past `steps` for some counts (61 of 1000: ceil(61.00000000000001)),
        # adding a last value of about -6e-13 that became timestep -1 (alphas_cumprod[-1], the noisiest), as
        # diffusers' trailing spacing still does (62 timesteps for 61)
        ts = np.round(np.arange(T, 0, -T / steps)[:steps])[::-1] - 1
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, steps).round()
    else:
        raise ConfigError(f"unknown timestep spacing {spacing!r}; use one of {', '.join(SPACINGS)}")
    return torch.from_numpy(ts.astype(np.int64)).flip(0)


@dataclass
class StepTable:
    """Everything the loop reads per step, on the device: model timesteps and (p, q, A, B, sigma)."""

    timesteps: torch.Tensor  # [n] float32, the model's t input
    coefs: torch.Tensor  # [n, 5] float32: p, q, A, B, sigma

    def __len__(self) -> int:
        return self.timesteps.shape[0]


def _table(timesteps, p, q, A, B, sigma, device) -> StepTable:
    coefs = torch.stack([p, q, A, B, sigma], dim=1).to(device, torch.float32)
    return StepTable(timesteps.to(device, torch.float32), coefs)


def _prev_alphas_cumprod(schedule: NoiseSchedule, timesteps: torch.Tensor) -> torch.Tensor:
    ab = schedule.alphas_cumprod64
    # The step after the last one lands on clean data: alphas_cumprod = 1 (diffusers' set_alpha_to_one).
    return torch.cat([ab[timesteps[1:]], torch.ones(1, dtype=torch.float64)])


def ddim_table(schedule, timesteps, *, eta: float = 0.0, prediction: str = "eps", device=None) -> StepTable:
    """DDIM (Song et al. 2021, eq. 12) over `timesteps`, each step landing on the next one (see `ddim_coefficients`)."""
    ab = schedule.alphas_cumprod64[timesteps]
    ab_prev = _prev_alphas_cumprod(schedule, timesteps)
    return _table(timesteps, *ddim_coefficients(ab, ab_prev, eta=eta, prediction=prediction),
                  device or schedule.device)


def ddim_coefficients(ab, ab_prev, *, eta: float = 0.0, prediction: str = "eps"):
    """DDIM from alphas_cumprod ab to ab_prev written as x_prev = A*x0 + B*x_t + sigma*z; float64 (p, q, A, B, sigma).

    eps_hat = (x_t - sqrt(ab) x0) / sqrt(1-ab) is re-derived from the (possibly clipped) x0, so
    x_prev = sqrt(ab_prev) x0 + c * eps_hat + sigma z  with c = sqrt(1 - ab_prev - sigma^2).
    """
    eta = number("eta", eta, **ETA_RANGE)  # above 1, sigma^2 would exceed 1 - ab_prev (diffusers' NaN)
    p, q = x0_coefficients(check_prediction(prediction), ab)
    # (16): sigma_t(eta) = eta * sqrt((1 - ab_prev) / (1 - ab)) * sqrt(1 - ab / ab_prev)
    sigma = eta * ((1 - ab_prev) / (1 - ab)).sqrt() * (1 - ab / ab_prev).clamp(min=0).sqrt()
    c = (1 - ab_prev - sigma**2).clamp(min=0).sqrt()
    A = ab_prev.sqrt() - c * ab.sqrt() / (1 - ab).sqrt()
    B = c / (1 - ab).sqrt()
    return p, q, A, B, sigma


def ddpm_table(schedule, timesteps, *, variance: str = "fixed_small", prediction: str = "eps", device=None):
    """DDPM ancestral sampling over `timesteps` (see `ddpm_coefficients`); no noise on the last step."""
    ab = schedule.alphas_cumprod64[timesteps]
    ab_prev = _prev_alphas_cumprod(schedule, timesteps)
    p, q, A, B, sigma = ddpm_coefficients(ab, ab_prev, variance=variance, prediction=prediction)
    sigma[-1] = 0.0
    return _table(timesteps, p, q, A, B, sigma, device or schedule.device)


def ddpm_coefficients(ab, ab_prev, *, variance: str = "fixed_small", prediction: str = "eps"):
    """DDPM (Ho et al. 2020, eq. 6-7) from the posterior q(x_prev | x_t, x0); float64 (p, q, A, B, sigma).

    On a subset of timesteps the step's beta is 1 - ab/ab_prev (the respacing of Nichol & Dhariwal 2021).
    mean = sqrt(ab_prev) beta / (1-ab) * x0 + sqrt(alpha) (1-ab_prev) / (1-ab) * x_t
    fixed_small: sigma^2 = beta (1-ab_prev) / (1-ab);  fixed_large: sigma^2 = beta.
    """
    if variance not in VARIANCES:
        raise ConfigError(f"unknown DDPM variance {variance!r}; use one of {', '.join(VARIANCES)}")
    p, q = x0_coefficients(check_prediction(prediction), ab)
    alpha = ab / ab_prev
    beta = 1 - alpha
    A = ab_prev.sqrt() * beta / (1 - ab)
    B = alpha.sqrt() * (1 - ab_prev) / (1 - ab)
    var = beta * (1 - ab_prev) / (1 - ab) if variance == "fixed_small" else beta.clone()
    return p, q, A, B, var.sqrt()


def student_timesteps(trained, steps: int | None = None) -> torch.Tensor:
    """The timesteps of a `steps`-step student run: `steps` of its trained timesteps, evenly spread, noisiest first.

    A student distilled on {999, 749, 499, 249} samples with [999] (1 step), [999, 499] (2), [999, 749, 249] (3)
    or all four; steps=None uses all of them.
    """
    ts = torch.as_tensor([integer("student timestep", t) for t in trained], dtype=torch.int64)  # 999.5 was 999
    if ts.dim() != 1 or len(ts) == 0 or bool((ts[1:] >= ts[:-1]).any()):
        raise ConfigError(f"student timesteps must be a non-empty, strictly decreasing list, got {ts.tolist()}")
    k = len(ts) if steps is None else integer("steps", steps)  # 2.5 was an IndexError, True one step
    if not 1 <= k <= len(ts):
        raise ConfigError(f"a student distilled on {len(ts)} timesteps {ts.tolist()} samples with 1 to {len(ts)} "
                          f"steps, not {k}")
    picks = torch.div(torch.arange(k) * len(ts) + k // 2, k, rounding_mode="floor")
    return ts[picks]


def student_table(schedule, timesteps, *, prediction: str = "v", device=None) -> StepTable:
    """The few-step ADD sampler (Sauer et al. 2023): predict x0, then re-noise it to the next timestep.

    x_next = sqrt(ab_next) x0 + sqrt(1 - ab_next) z with fresh per-sample noise z, i.e. A = sqrt(ab_next),
    B = 0, sigma = sqrt(1 - ab_next); after the last step ab_next = 1, so the output is the x0 prediction.
    """
    if int(timesteps.max()) >= schedule.num_timesteps or int(timesteps.min()) < 0:
        raise ConfigError(f"student timesteps {timesteps.tolist()} outside 0..{schedule.num_timesteps - 1}")
    ab = schedule.alphas_cumprod64[timesteps]
    ab_next = _prev_alphas_cumprod(schedule, timesteps)
    p, q = x0_coefficients(check_prediction(prediction), ab)
    A, B, sigma = ab_next.sqrt(), torch.zeros_like(ab), (1 - ab_next).sqrt()
    return _table(timesteps, p, q, A, B, sigma, device or schedule.device)


def model_output(out, x: torch.Tensor) -> torch.Tensor:
    """The model's output for input x, checked: a tensor of x's shape (eps, v or x0), else one ConfigError."""
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = f"a tensor of shape {list(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"the model returned {got} for x of shape {list(x.shape)}; it must return a tensor of "
                          "x's shape (eps, v or x0). A diffusers UNet2DModel returns an output object: load its "
                          "folder with fastdiff.load(FOLDER), or wrap it as lambda x, t, y: unet(x, t, "
                          "class_labels=y).sample")
    return out


def guided(model: Callable, x, t, labels, guidance: float, null_label: int | None):
    """Classifier-free guidance (Ho & Salimans 2022): out = uncond + guidance * (cond - uncond).

    guidance = 1 is the plain conditional model and guidance = 0 the unconditional one (one evaluation each:
    guidance 0 ran the conditional half too, at twice the cost, to multiply it by 0); other values evaluate the
    conditional and the unconditional (null label) halves as one batch.
    """
    if labels is None or guidance == 1.0:
        return model_output(model(x, t, labels), x)
    if null_label is None:
        raise ConfigError("classifier-free guidance needs a class-conditional model (null_label is None)")
    null = torch.full_like(labels, null_label)
    if guidance == 0.0:
        return model_output(model(x, t, null), x)
    both = torch.cat([x, x])
    cond, uncond = model_output(model(both, torch.cat([t, t]), torch.cat([labels, null])), both).chunk(2)
    return uncond + guidance * (cond - uncond)


def check_batch(x: torch.Tensor, seeds: torch.Tensor, labels: torch.Tensor | None) -> None:
    """The per-sample inputs of a batch of n images: x a float [n, C, H, W] tensor, int64 seeds [n] and integer
    labels [n] (or None)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
        got = f"{x.dtype} of shape {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ConfigError(f"x must be a float tensor [n, C, H, W] (initial_noise(seeds, shape)), got {got}")
    n = x.shape[0]
    if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64:
        got = seeds.dtype if isinstance(seeds, torch.Tensor) else type(seeds).__name__
        raise ConfigError(f"seeds must be an int64 tensor [n] (seeds_for(seed, n)), got {got}")
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.is_floating_point()
                               or labels.is_complex() or labels.dtype == torch.bool):
        got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ConfigError(f"labels must be an integer tensor [n], got {got}")
    if seeds.shape != (n,):
        raise ConfigError(f"seeds must have shape [{n}] (one per sample), got {list(seeds.shape)}")
    if labels is not None and labels.shape != (n,):
        raise ConfigError(f"labels must have shape [{n}] (one per sample), got {list(labels.shape)}")


def check_guidance_clip(guidance, clip) -> tuple[float, float | None]:
    """The guidance and clip of a sampling loop (`run_table`, `fastdiff.sampling.fast.FastSampler`), checked: NaN
    gave NaN images, clip -1 all -1."""
    guidance = number("guidance", guidance, **GUIDANCE_RANGE)
    if clip is not None:
        clip = number("clip", clip, lo=0, lo_open=True, finite=False, allowed="above 0 (None for no clipping)")
    return guidance, clip


def denoise_step(model: Callable, x, t, coefs, seeds, step, labels, *, guidance: float, null_label: int | None,
                 clip: float | None):
    """One denoising step: the model (with guidance), then `ops.sampler_step` with this step's coefficients.

    t: [n] float timesteps, coefs: [5] (p, q, A, B, sigma), step: an int or a 0-d int64 tensor on x's device
    (the CUDA-graph runner of `fastdiff.sampling.fast` passes device tensors). Returns (x_prev, x0).
    """
    n = x.shape[0]
    out = guided(model, x, t, labels, guidance, null_label)
    p, q, A, B, sigma = (c.expand(n) for c in coefs.unbind(0))
    return ops.sampler_step(x, out, p, q, A, B, sigma, seeds, step, clip=clip, return_x0=True)


@torch.inference_mode()
def run_table(
    model: Callable,
    x: torch.Tensor,
    table: StepTable,
    *,
    seeds: torch.Tensor,
    labels: torch.Tensor | None = None,
    guidance: float = 1.0,
    null_label: int | None = None,
    clip: float | None = None,
    callback: Callable | None = None,
) -> torch.Tensor:
    """The shared sampling loop, under `torch.inference_mode()` (no autograd graph is kept, whatever the model's
    parameters say). callback(i, t, x_prev, x0) is called after each step when given."""
    check_batch(x, seeds, labels)
    guidance, clip = check_guidance_clip(guidance, clip)
    if guidance != 1.0 and labels is None:  # it was dropped without a word
        raise ConfigError(f"guidance={guidance:g} needs labels (the classes to guide towards); pass labels, or "
                          "guidance 1")
    n = x.shape[0]
    seeds = seeds.to(x.device)
    for i in range(len(table)):
        t = table.timesteps[i].expand(n)
        x, x0 = denoise_step(model, x, t, table.coefs[i], seeds, i, labels, guidance=guidance, null_label=null_label,
                             clip=clip)
        if callback is not None:
            callback(i, t, x, x0)
    return x


def sample_ddim(
    model, x, schedule, *, steps=50, eta=0.0, seeds, labels=None, guidance=1.0, null_label=None,
    prediction="eps", clip=None, spacing="trailing", callback=None,
):
    """DDIM(eta) from initial noise x (use `initial_noise`); eta = 0 is deterministic, eta = 1 is DDPM-like."""
    ts = make_timesteps(schedule.num_timesteps, steps, spacing)
    table = ddim_table(schedule, ts, eta=eta, prediction=prediction, device=x.device)
    return run_table(model, x, table, seeds=seeds, labels=labels, guidance=guidance, null_label=null_label,
                     clip=clip, callback=callback)


def sample_ddpm(
    model, x, schedule, *, steps=None, variance="fixed_small", seeds, labels=None, guidance=1.0, null_label=None,
    prediction="eps", clip=None, spacing="trailing", callback=None,
):
    """DDPM ancestral sampling over all T steps (steps=None) or a respaced subset."""
    ts = make_timesteps(schedule.num_timesteps, schedule.num_timesteps if steps is None else steps, spacing)
    table = ddpm_table(schedule, ts, variance=variance, prediction=prediction, device=x.device)
    return run_table(model, x, table, seeds=seeds, labels=labels, guidance=guidance, null_label=null_label,
                     clip=clip, callback=callback)


def sample_student(
    model, x, schedule, *, timesteps=(999, 749, 499, 249), steps=None, seeds, labels=None, guidance=1.0,
    null_label=None, prediction="v", clip=None, callback=None,
):
    """A distilled student in 1 to len(timesteps) steps (`student_timesteps` picks which) from initial noise x."""
    ts = student_timesteps(timesteps, steps)
    table = student_table(schedule, ts, prediction=prediction, device=x.device)
    return run_table(model, x, table, seeds=seeds, labels=labels, guidance=guidance, null_label=null_label,
                     clip=clip, callback=callback)


def student_grid(trained, T: int, spacing: str = "trailing") -> list[int]:
    """The step counts at which DDIM or DDPM with `spacing` over T timesteps runs only on a student's `trained`
    timesteps (elsewhere its outputs are the teacher's half-forgotten ones): trailing 1, 2 and 4 for 999, 749,
    499, 249."""
    trained = {int(t) for t in trained}
    return [k for k in range(1, len(trained) + 1) if set(make_timesteps(T, k, spacing).tolist()) <= trained]


def initial_noise(seeds: torch.Tensor, shape: tuple[int, ...], device=None, dtype=torch.float32) -> torch.Tensor:
    """x_T for each seed: standard normal of `shape` (C, H, W), a pure function of the seed."""
    if not isinstance(seeds, torch.Tensor) or seeds.dim() != 1 or seeds.is_floating_point():
        raise ConfigError(f"seeds must be a 1-D integer tensor (seeds_for(seed, n)), got {seeds!r:.80}")
    if not isinstance(shape, (tuple, list, torch.Size)) or not all(integer("shape[]", s) > 0 for s in shape):
        raise ConfigError(f"shape must be the (channels, height, width) of one sample, got {shape!r}")
    device = device if device is not None else seeds.device
    return seeded_randn(seeds.to(device), tuple(int(s) for s in shape), dtype)


def seeds_for(seed: int, n: int) -> torch.Tensor:
    """Per-sample seeds seed, seed+1, ..., seed+n-1: sample k of a run is reproducible on its own."""
    seed, n = integer("seed", seed), integer("n", n)  # 2.5 or True would be 2 or 1 without a word
    if n < 0:
        raise ConfigError(f"n={n} must be 0 or more")
    if not 0 <= seed < 2**63:
        raise ConfigError(f"seed={seed} must be a non-negative 63-bit integer")
    if seed + n > 2**63:
        raise ConfigError(f"the seeds {seed}..{seed + n - 1} pass the largest 63-bit integer, 2^63 - 1; use a "
                          "smaller seed")
    return torch.arange(n, dtype=torch.int64) + seed  # arange's end may be 2^63 itself


__all__ = [
    "SPACINGS", "VARIANCES", "StepTable", "check_batch", "ddim_coefficients", "ddim_table", "ddpm_coefficients",
    "ddpm_table", "denoise_step", "guided", "initial_noise", "make_timesteps", "run_table", "sample_ddim",
    "sample_ddpm", "sample_student", "seeds_for", "student_grid", "student_table", "student_timesteps",
]
