"""diffusers-compatible DDPMScheduler and DDIMScheduler on fastdiff's schedules and fused sampler step.

    pipe = diffusers.DDIMPipeline.from_pretrained(folder)
    pipe.scheduler = fastdiff.schedulers.DDIMScheduler.from_config(pipe.scheduler.config)

They have diffusers' interface (from_config, from_pretrained / save_pretrained with scheduler_config.json, config,
set_timesteps, timesteps, init_noise_sigma, scale_model_input, add_noise, step) and its options with its defaults
(see `fastdiff.diffusion.diffusers_options`), and they follow diffusers' arithmetic where it differs from fastdiff's
samplers: DDIM steps from t to t - T // steps whatever the spacing, `leading` adds `steps_offset`, DDPM adds noise on
every step with t > 0 (fixed_small's variance floored at 1e-20), and DDIM's default re-uses the model's eps
instead of re-deriving it from the clipped x0 (`use_clipped_model_output=False`; fastdiff's samplers are the True
variant). The coefficient tables are fastdiff's float64 ones (diffusers computes in float32).

Noise. With a `generator` (or neither generator nor seeds: torch's global generator) each step draws
`torch.randn` exactly where and as diffusers does, so a pipeline gives diffusers' images; with `seeds` (an int64
tensor, one per sample) the fused op draws fastdiff's per-sample Philox noise in the kernel, so a sample does not
depend on its batch (start from `fastdiff.initial_noise(seeds, shape)`).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from fastdiff import ops
from fastdiff.config_checks import integer
from fastdiff.diffusion.diffusers_options import (
    CLASS_OPTIONS,
    KNOWN,
    PREDICTIONS,
    VARIANCE_TYPES,
    FrozenConfig,
    resolve_options,
    schedule_kwargs,
)
from fastdiff.diffusion.parameterization import v_from
from fastdiff.diffusion.samplers import ddim_coefficients, ddpm_coefficients, make_timesteps
from fastdiff.diffusion.schedules import NoiseSchedule
from fastdiff.errors import ConfigError, FastdiffWarning
from fastdiff.scheduler_inputs import batch_timesteps, diffusers_noise, one_timestep

CONFIG_NAME = "scheduler_config.json"
# diffusers' from_pretrained keywords for fetching from the hub: a local folder (all fastdiff reads) needs none
HUB_KEYWORDS = ("cache_dir", "force_download", "proxies", "token", "local_files_only", "revision", "user_agent",
                "return_commit_hash")
DIFFUSERS_VERSION = "0.42.1"  # the diffusers release these schedulers and their files are tested against


@dataclass
class SchedulerOutput:
    """What `step` returns: x_{t-1} and the (clipped) x0 prediction. Indexable like diffusers' outputs."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor

    def to_tuple(self) -> tuple:
        return (self.prev_sample, self.pred_original_sample)

    def __getitem__(self, i):
        return self.to_tuple()[i]


class _Scheduler:
    config_name = CONFIG_NAME
    order = 1
    init_noise_sigma = 1.0
    _compatibles = ["DDPMScheduler", "DDIMScheduler"]

    def __init__(self, **options):
        name = type(self).__name__
        extra = sorted(set(options) - set(CLASS_OPTIONS[name]))
        if extra:
            raise ConfigError(f"{name} has no option(s) {extra}; its options are {', '.join(CLASS_OPTIONS[name])}")
        self.num_inference_steps = None
        self.custom_timesteps = False
        self._internal_dict = options
        self._set(torch.arange(len(self) - 1, -1, -1, dtype=torch.int64))

    # ---- diffusers' ConfigMixin surface -------------------------------------------------------------------
    @property
    def config(self) -> FrozenConfig:
        return self._config

    @property
    def _internal_dict(self) -> FrozenConfig:
        return self._config

    @_internal_dict.setter
    def _internal_dict(self, config: Mapping) -> None:
        """Everything the steps read comes from the config, here: diffusers' pipelines replace `_internal_dict` to
        mend an old config (clip_sample, steps_offset), and the scheduler must then step by the new one."""
        opts = resolve_options(config, type(self).__name__)
        if opts["trained_betas"] is not None:
            opts["trained_betas"] = [float(b) for b in torch.as_tensor(opts["trained_betas"]).flatten()]
        before = getattr(self, "_config", None)
        self._config = FrozenConfig(opts)
        self.schedule = NoiseSchedule(**schedule_kwargs(opts))
        self.prediction = PREDICTIONS[opts["prediction_type"]]
        self.clip = float(opts["clip_sample_range"]) if opts["clip_sample"] else None
        self.betas = self.schedule.betas
        self.alphas = 1 - self.schedule.betas
        self._alphas_cumprod = self.schedule.alphas_cumprod
        self._tables = {}
        if before is not None and before.num_train_timesteps != self._config.num_train_timesteps:
            self.num_inference_steps, self.custom_timesteps = None, False  # the old list may not exist in the new
            self._set(torch.arange(len(self) - 1, -1, -1, dtype=torch.int64))

    def register_to_config(self, **kwargs) -> None:
        """Change options in place, as diffusers' `register_to_config` (from_config(config, key=value) builds anew)."""
        self._internal_dict = {**self.config, **kwargs}

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._alphas_cumprod

    @alphas_cumprod.setter
    def alphas_cumprod(self, value) -> None:
        """The same values, moved to a device or cast (as diffusers' own code and training scripts do), are kept and
        read back; other values (beyond their dtype's rounding) are refused, not ignored: the steps use the schedule
        of the config."""
        mine = self.schedule.alphas_cumprod64.cpu()
        value = torch.as_tensor(value)
        eps = torch.finfo(value.dtype).eps if value.is_floating_point() else 0.0
        given = value.detach().to("cpu", torch.float64)
        if given.shape != mine.shape or not torch.allclose(given, mine, rtol=max(1e-5, 4 * eps), atol=1e-7):
            raise ConfigError("fastdiff's schedulers step with the alphas_cumprod of their config; give other betas "
                              "through the config instead (from_config(config, trained_betas=...))")
        self._alphas_cumprod = value

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """From a diffusers scheduler config (a dict or anything with `.config`), with `kwargs` overriding it.

        Keys of the other DDPM/DDIM scheduler are ignored, as diffusers does. So are other keys of `config`, with
        a warning naming them, as diffusers warns: another scheduler's (PNDM's, Euler's), since
        `DDIMScheduler.from_config(pipe.scheduler.config)` swaps a pipeline's scheduler. An unknown keyword is an
        error (a misspelt option would do nothing), or with return_unused_kwargs, returned with the rest of what
        went unused."""
        config = getattr(config, "config", config) or {}
        if not isinstance(config, Mapping):
            raise ConfigError(f"from_config takes a scheduler config dict, got {type(config).__name__}")
        config, kwargs = dict(config), dict(kwargs)
        for key in config.get("_use_default_values", ()):  # values its own class defaulted: this class's defaults
            config.pop(key, None)  # (as diffusers: PNDM's set_alpha_to_one False does not become DDIM's)
        unused = {k: config.pop(k) for k in list(config) if not k.startswith("_") and k not in KNOWN}
        if unused:
            warnings.warn(f"{cls.__name__}.from_config ignores {sorted(unused)}: no options of diffusers' "
                          "DDPMScheduler or DDIMScheduler (another scheduler's config, or a misspelt key)",
                          FastdiffWarning, stacklevel=2)
        if return_unused_kwargs:
            unused.update({k: kwargs.pop(k) for k in list(kwargs) if k not in KNOWN})
        merged = {**config, **kwargs}
        scheduler = cls(**resolve_options(merged, cls.__name__))
        unused.update({k: v for k, v in merged.items() if k not in CLASS_OPTIONS[cls.__name__]})
        return (scheduler, unused) if return_unused_kwargs else scheduler

    @classmethod
    def load_config(cls, path, subfolder: str | None = None) -> dict:
        folder = Path(path) / (subfolder or "")
        if not (folder / CONFIG_NAME).exists() and subfolder is None and (folder / "scheduler" / CONFIG_NAME).exists():
            folder = folder / "scheduler"  # a pipeline folder
        file = folder / CONFIG_NAME
        if not file.exists():
            raise ConfigError(f"no {CONFIG_NAME} in {folder}; fastdiff reads local folders (fetch a hub model "
                              "first, e.g. with huggingface_hub.snapshot_download)")
        try:
            return json.loads(file.read_text())
        except (json.JSONDecodeError, OSError) as e:
            raise ConfigError(f"{file} is not a readable JSON file ({e})") from None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, **kwargs):
        """From a local folder's scheduler_config.json; the hub's keywords (`HUB_KEYWORDS`) are accepted and unused."""
        kwargs = {k: v for k, v in kwargs.items() if k not in HUB_KEYWORDS}
        return cls.from_config(cls.load_config(pretrained_model_name_or_path, subfolder), **kwargs)

    def save_pretrained(self, save_directory, **kwargs) -> Path:
        """scheduler_config.json in save_directory (diffusers' `save_config` too)."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        doc = {"_class_name": type(self).__name__, "_diffusers_version": DIFFUSERS_VERSION, **dict(self.config)}
        (folder / CONFIG_NAME).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        return folder / CONFIG_NAME

    save_config = save_pretrained

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ---- the diffusion interface --------------------------------------------------------------------------
    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def add_noise(self, original_samples, noise, timesteps) -> torch.Tensor:
        """q(x_t | x_0) at `timesteps` (one per sample, or one for all)."""
        device = original_samples.device
        t = batch_timesteps(timesteps, original_samples.shape[0], len(self)).to(device)
        x_t = self.schedule.to(device).add_noise(original_samples, noise, t)
        return x_t.to(original_samples.dtype)

    def get_velocity(self, sample, noise, timesteps) -> torch.Tensor:
        t = batch_timesteps(timesteps, sample.shape[0], len(self)).to(sample.device)
        ab = self.schedule.to(sample.device).alphas_cumprod[t]
        return v_from(sample, noise, ab.view(-1, *([1] * (sample.dim() - 1)))).to(sample.dtype)

    def set_timesteps(self, num_inference_steps: int | None = None, device=None):
        T = len(self)
        n = integer("num_inference_steps", num_inference_steps)
        spacing = self.config.timestep_spacing
        offset = self.config.steps_offset if spacing == "leading" else 0
        ts = make_timesteps(T, n, spacing) + offset
        if int(ts.max()) >= T:  # diffusers: an IndexError at the first step
            raise ConfigError(f"{n} leading steps with steps_offset {offset} start at timestep {int(ts.max())}, past "
                              f"the schedule's 0..{T - 1}; use fewer steps, steps_offset 0 or trailing spacing")
        self.num_inference_steps = n
        self.custom_timesteps = False
        self._set(ts, device)

    def _set(self, timesteps: torch.Tensor, device=None):
        self.timesteps = timesteps.to(device)

    @property
    def timesteps(self) -> torch.Tensor:
        return self._timesteps

    @timesteps.setter
    def timesteps(self, value) -> None:
        """Assigned (a pipeline that starts part-way, `timesteps[k:]`) as set: the steps index the new list."""
        ts = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
        if ts.is_floating_point() or ts.dim() != 1:
            raise ConfigError(f"timesteps must be a 1-D list of integers, got {ts.dtype} of shape {list(ts.shape)}")
        self._timesteps = ts.long()
        self._index = {int(t): i for i, t in enumerate(ts.tolist())}
        self._tables = {}

    def _ab(self, ts: torch.Tensor, final: float | torch.Tensor = 1.0) -> torch.Tensor:
        """alphas_cumprod64 at ts, `final` where ts < 0 (the step past t = 0 lands on clean data)."""
        ab = self.schedule.alphas_cumprod64
        return torch.where(ts >= 0, ab[ts.clamp(min=0)], torch.as_tensor(final, dtype=torch.float64))

    def _row(self, timestep, device, key, coefficients):
        """float32 [6] coefficients (p, q, A, B, sigma, E) of `timestep` on `device` and its step index (or None).

        The table for all of self.timesteps is built once per (key, device) and indexed on the host. Where one of
        them has no row (eps at a zero-SNR timestep), each step computes its own row, so only that step fails."""
        t = one_timestep(timestep, len(self))
        i = self._index.get(t)
        if i is not None and (key, device) not in self._tables:
            try:
                self._tables[(key, device)] = coefficients(self.timesteps.cpu()).to(device, torch.float32)
            except ConfigError:  # a row missing: None, each step's own row
                self._tables[(key, device)] = None
        table = self._tables.get((key, device)) if i is not None else None
        if table is None:
            return coefficients(torch.tensor([t]))[0].to(device, torch.float32), i
        return table[i], i

    def _step(self, row, i, model_output, sample, draw: bool, generator, noise, seeds, extra: bool = False):
        """One fused `ops.sampler_step`; prev = A*x0 + B*x + E*out + sigma*z with x0 = clip(p*x + q*out).

        With seeds the op draws z itself (per-sample Philox, counter = the step's index). Otherwise the op runs
        with sigma = 0 and sigma*z is added here, z drawn like diffusers (`torch.randn` of the output's shape from
        the generator, on the generator's device), so the noise is diffusers' noise. E is nonzero only for DDIM
        with a clipped x0 and use_clipped_model_output=False, whose eps is the model's rather than the clipped
        x0's: the op's form has a single x0, so that term is added here too.
        """
        n = sample.shape[0]
        for name, t in (("model_output", model_output), ("variance_noise", noise)):
            if t is not None and tuple(t.shape) != tuple(sample.shape):
                raise ConfigError(f"{name} has shape {list(t.shape)}, the sample {list(sample.shape)}; they must "
                                  "be equal")
        p, q, A, B, sigma, E = (c.expand(n) for c in row)
        if seeds is not None:
            if generator is not None or noise is not None:
                raise ConfigError("pass either seeds (fastdiff's per-sample noise) or a generator/variance_noise")
            if i is None:
                raise ConfigError("seeds need a timestep from set_timesteps (the noise is keyed by the step index)")
            seeds = torch.as_tensor(seeds)
            if seeds.is_floating_point() or seeds.is_complex() or seeds.dtype == torch.bool:  # 0.5 was seed 0
                raise ConfigError(f"seeds must be integers, got {seeds.dtype}")
            seeds = seeds.to(sample.device, torch.int64)
            if seeds.shape != (n,):
                raise ConfigError(f"seeds must have shape [{n}] (one per sample), got {list(seeds.shape)}")
            prev, x0 = ops.sampler_step(sample, model_output, p, q, A, B, sigma, seeds, i, self.clip, True)
        else:
            unused = torch.zeros(n, dtype=torch.int64, device=sample.device)  # sigma = 0: the op draws nothing
            prev, x0 = ops.sampler_step(sample, model_output, p, q, A, B, torch.zeros_like(sigma), unused, 0,
                                        self.clip, True)
            if draw:
                z = noise if noise is not None else diffusers_noise(model_output, generator)
                prev = prev + sigma.view(-1, *([1] * (sample.dim() - 1))).to(prev.dtype) * z
        if extra:
            prev = prev + E.view(-1, *([1] * (sample.dim() - 1))).to(prev.dtype) * model_output
        return prev, x0


class DDIMScheduler(_Scheduler):
    """diffusers' DDIMScheduler (Song et al. 2021) on fastdiff's fused step; options as diffusers' (see module)."""

    def _final(self):
        return 1.0 if self.config.set_alpha_to_one else self.schedule.alphas_cumprod64[0]

    def previous_timestep(self, timestep):
        return timestep - len(self) // self.num_inference_steps

    def _coefficients(self, ts, eta: float, clipped_eps: bool) -> torch.Tensor:
        ab = self._ab(ts)
        ab_prev = self._ab(self.previous_timestep(ts), self._final())
        p, q, A, B, sigma = ddim_coefficients(ab, ab_prev, eta=eta, prediction=self.prediction)
        E = torch.zeros_like(A)
        if self.clip is not None and not clipped_eps:
            # x_prev = sqrt(ab_prev) x0c + c eps(out) instead of c eps(x0c): with k = c sqrt(ab) / sqrt(1 - ab)
            # = sqrt(ab_prev) - A and eps(x0) = (x - sqrt(ab) x0) / sqrt(1 - ab), x0 = p x + q out,
            # that is A + k on x0c, B - k p on x and -k q on out.
            k = ab_prev.sqrt() - A
            A, B, E = A + k, B - k * p, -k * q
        return torch.stack([p, q, A, B, sigma, E], dim=1)

    def step(self, model_output, timestep, sample, eta: float = 0.0, use_clipped_model_output: bool | None = False,
             generator=None, variance_noise=None, return_dict: bool = True, *, seeds=None):
        """x_{t-1} from the model output at `timestep`. eta > 0 adds noise (from generator/variance_noise as in
        diffusers, or fastdiff's per-sample `seeds`); use_clipped_model_output re-derives eps from the clipped x0."""
        if self.num_inference_steps is None:
            raise ConfigError("the number of inference steps is not set; call set_timesteps(n) before step")
        if eta > 0 and generator is not None and variance_noise is not None:  # neither is read at eta 0
            raise ConfigError("pass either a generator or variance_noise, not both")
        clipped = bool(use_clipped_model_output)
        row, i = self._row(timestep, sample.device, (float(eta), clipped),
                           lambda ts: self._coefficients(ts, float(eta), clipped))
        prev, x0 = self._step(row, i, model_output, sample, eta > 0, generator, variance_noise, seeds,
                              extra=self.clip is not None and not clipped)
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)


class DDPMScheduler(_Scheduler):
    """diffusers' DDPMScheduler (Ho et al. 2020) on fastdiff's fused step; options as diffusers' (see module)."""

    @property
    def variance_type(self) -> str:
        return self.config.variance_type

    @variance_type.setter
    def variance_type(self, value: str) -> None:
        self.register_to_config(variance_type=value)

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None):
        if (num_inference_steps is None) == (timesteps is None):
            raise ConfigError("pass exactly one of num_inference_steps and timesteps to set_timesteps")
        if timesteps is None:
            return super().set_timesteps(num_inference_steps, device)
        ts = torch.as_tensor([integer("timesteps[]", t) for t in timesteps], dtype=torch.int64)
        if not len(ts) or bool((ts[1:] >= ts[:-1]).any()) or int(ts[0]) >= len(self) or int(ts.min()) < 0:
            raise ConfigError(f"custom timesteps must be a non-empty, strictly decreasing list within "
                              f"0..{len(self) - 1}")
        self.num_inference_steps = None
        self.custom_timesteps = True
        self._set(ts, device)

    def previous_timestep(self, timestep):
        if not (self.custom_timesteps or self.num_inference_steps):
            return timestep - 1
        ts = self.timesteps.cpu().tolist() + [-1]

        def prev(t: int) -> int:
            if t not in self._index:
                raise ConfigError(f"timestep {t} is not one of the timesteps set by set_timesteps")
            return ts[self._index[t] + 1]

        if isinstance(timestep, torch.Tensor) and timestep.dim() > 0:
            return torch.tensor([prev(t) for t in timestep.tolist()])
        return prev(int(timestep))

    def _coefficients(self, ts) -> torch.Tensor:
        ab = self._ab(ts)
        ab_prev = self._ab(self.previous_timestep(ts))
        variance = VARIANCE_TYPES[self.variance_type]
        p, q, A, B, sigma = ddpm_coefficients(ab, ab_prev, variance=variance, prediction=self.prediction)
        if variance == "fixed_small":
            sigma = sigma.clamp(min=1e-10)  # diffusers floors the variance at 1e-20
        sigma = torch.where(ts > 0, sigma, torch.zeros_like(sigma))  # noise on every step but t = 0
        return torch.stack([p, q, A, B, sigma, torch.zeros_like(A)], dim=1)

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, *, seeds=None):
        """x_{t-1} from the model output at `timestep`, noise from `generator` as diffusers (or `seeds`)."""
        row, i = self._row(timestep, sample.device, None, self._coefficients)
        prev, x0 = self._step(row, i, model_output, sample, int(timestep) > 0, generator, None, seeds)
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)


__all__ = ["DDIMScheduler", "DDPMScheduler", "FrozenConfig", "SchedulerOutput"]
