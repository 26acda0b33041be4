"""diffusers' DDPMScheduler / DDIMScheduler options (names and defaults of diffusers 0.42) and fastdiff's reading.

One table serves the three readers of a scheduler_config.json: `NoiseSchedule.from_config` (the schedule keys),
`fastdiff.schedulers` (every key of its class) and `fastdiff.interop` (a run config for a diffusers folder).
A key that no DDPM/DDIM scheduler has, or a value fastdiff cannot honour, is a ConfigError that names it.
"""

from __future__ import annotations

from collections.abc import Mapping

from fastdiff.config_checks import flag, integer, number
from fastdiff.errors import ConfigError

SCHEDULE_OPTIONS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "rescale_betas_zero_snr": False,
}
STEP_OPTIONS = {
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,  # read only with thresholding
    "sample_max_value": 1.0,  # read only with thresholding
    "timestep_spacing": "leading",
    "steps_offset": 0,
}
CLASS_OPTIONS = {
    "DDPMScheduler": {**SCHEDULE_OPTIONS, **STEP_OPTIONS, "variance_type": "fixed_small"},
    "DDIMScheduler": {**SCHEDULE_OPTIONS, **STEP_OPTIONS, "set_alpha_to_one": True},
    "schedule": SCHEDULE_OPTIONS,
}
KNOWN = set().union(*CLASS_OPTIONS.values())

BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
# fixed_small_log is fixed_small's standard deviation computed as exp(0.5 * log(var)): the same to rounding.
VARIANCE_TYPES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large"}
SPACINGS = ("leading", "trailing", "linspace")


class FrozenConfig(dict):
    """A read-only dict whose keys are also attributes, like diffusers' FrozenDict (`scheduler.config.x`)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def _readonly(self, *args, **kwargs):
        raise AttributeError("a scheduler's config is read-only; build a new one with from_config(config, key=value)")

    __setitem__ = __delitem__ = __setattr__ = update = pop = setdefault = _readonly

    def __reduce__(self):
        # copy, deepcopy and pickle rebuild a dict subclass item by item through __setitem__; the constructor
        # takes the items at once (so a copied or pickled scheduler works, as diffusers' does)
        return (FrozenConfig, (dict(self),))


def _one_of(key, value, allowed, why=""):
    if value not in allowed:
        choices = ", ".join(map(str, allowed))
        raise ConfigError(f"{key}={value!r} is not supported by fastdiff{why}; use one of {choices}")


def resolve_options(config: Mapping, class_name: str) -> dict:
    """The options of `class_name` ('DDPMScheduler', 'DDIMScheduler' or 'schedule'): `config`'s values over the
    defaults. Metadata keys (leading '_') and the other scheduler's keys are ignored, as diffusers' from_config
    ignores them; an unknown key or a value fastdiff cannot honour raises a ConfigError naming it."""
    unknown = sorted(k for k in config if not k.startswith("_") and k not in KNOWN)
    if unknown:
        raise ConfigError(f"scheduler config key(s) {unknown} are not options of diffusers' DDPMScheduler or "
                          f"DDIMScheduler, which fastdiff implements; remove them (known: {', '.join(sorted(KNOWN))})")
    own = CLASS_OPTIONS[class_name]
    opts = {k: config.get(k, default) for k, default in own.items()}
    for key, default in own.items():  # "no" was taken as true
        if isinstance(default, bool):
            opts[key] = flag(key, opts[key])
    # numbers: 10.5 timesteps or a string beta were TypeErrors deep inside, steps_offset -5 gave negative timesteps
    opts["num_train_timesteps"] = integer("num_train_timesteps", opts["num_train_timesteps"])
    if opts["num_train_timesteps"] < 2:
        raise ConfigError(f"num_train_timesteps={opts['num_train_timesteps']} must be at least 2")
    opts["beta_start"] = number("beta_start", opts["beta_start"], lo=0, allowed="0 or more, finite")
    opts["beta_end"] = number("beta_end", opts["beta_end"], lo=0, lo_open=True, allowed="above 0, finite")
    if opts.get("clip_sample"):
        opts["clip_sample_range"] = number("clip_sample_range", opts["clip_sample_range"], lo=0, lo_open=True,
                                           allowed="above 0 (with clip_sample)")
    if "steps_offset" in opts:
        opts["steps_offset"] = integer("steps_offset", opts["steps_offset"])
        if opts["steps_offset"] < 0:
            raise ConfigError(f"steps_offset={opts['steps_offset']} must be 0 or more")
    if "beta_schedule" in opts and opts["trained_betas"] is None:
        _one_of("beta_schedule", opts["beta_schedule"], list(BETA_SCHEDULES))
    if "prediction_type" in opts:
        _one_of("prediction_type", opts["prediction_type"], list(PREDICTIONS))
        _one_of("timestep_spacing", opts["timestep_spacing"], SPACINGS)
        if opts["thresholding"]:
            raise ConfigError("thresholding=True (dynamic thresholding, Saharia et al. 2022) is not supported by "
                              "fastdiff's schedulers; set thresholding to false (clip_sample clips x0 instead)")
    if "variance_type" in opts:
        _one_of("variance_type", opts["variance_type"], list(VARIANCE_TYPES),
                " (learned variances need a second output half; fixed_large_log is log-variance)")
    return opts


def schedule_kwargs(opts: Mapping) -> dict:
    """`NoiseSchedule(**kwargs)` for resolved options. fastdiff gives linear endpoints for T = 1000 and scales them
    by 1000/T; diffusers uses them as they are, so for other T the endpoints are given back in fastdiff's units."""
    T = int(opts["num_train_timesteps"])
    common = dict(num_timesteps=T, zero_terminal_snr=bool(opts["rescale_betas_zero_snr"]))
    if opts["trained_betas"] is not None:
        return dict(kind="linear", betas=opts["trained_betas"], **common)
    kind = BETA_SCHEDULES[opts["beta_schedule"]]
    if kind == "cosine":  # diffusers' squaredcos_cap_v2: s = 0.008 and betas capped at 0.999, fastdiff's defaults
        return dict(kind=kind, **common)
    scale = 1.0 if T == 1000 else T / 1000.0
    return dict(kind=kind, beta_start=opts["beta_start"] * scale, beta_end=opts["beta_end"] * scale, **common)
