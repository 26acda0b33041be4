"""Validation of run configs: one place for every config, run by `RunConfig.from_dict`, which builds every config
(presets, CLI overrides, each config.json that train, distill, resume, sample and eval read).

`check_types` checks raw values against the dataclass field types before a section is built; `validate` checks
each number against `RANGES` (and finiteness), then the combinations that would otherwise be accepted at train
time and fail later. Errors are one ConfigError naming the option and the allowed range.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import os
import types
import typing

import torch

from fastdiff.errors import ConfigError


def _has_type(value, hint) -> bool:
    """Whether a JSON value fits a dataclass field's type (ints for floats are fine, bools for numbers are not)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_has_type(v, args[0]) for v in value)
        return len(value) == len(args) and all(_has_type(v, a) for v, a in zip(value, args))
    return True  # a type this check does not know: the section's own code checks it


def _type_name(hint) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if hint in names:
        return names[hint]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        each = _type_name(args[0]).removeprefix("an ").removeprefix("a ")  # "a list of integers", not "of an"
        return f"a list of {each}s" if args[-1] is Ellipsis else f"a list of {len(args)} {each}s"
    return str(hint)


_INT = 2**31 - 1  # integer options above this overflow torch's int32 paths long before they would be useful
# Allowed ranges in interval notation; the message quotes them. An option not listed is only type-checked (and
# finite if a number). Options of sections other helpers add belong here too.
RANGES: dict[str, str] = {
    "model.image_size": "[1, inf)", "model.in_channels": "[1, inf)", "model.base_channels": "[1, inf)",
    "model.channel_mult[]": "[1, inf)", "model.num_res_blocks": "[0, inf)",
    "model.attn_resolutions[]": "[1, inf)", "model.num_heads": "[1, inf)", "model.dropout": "[0, 1)",
    "model.num_groups": "[1, inf)", "model.num_classes": "[0, inf)",
    "diffusion.num_timesteps": "[2, inf)", "diffusion.beta_start": "(0, 1)", "diffusion.beta_end": "(0, 1)",
    "train.steps": "[1, inf)", "train.batch_size": "[1, inf)", "train.lr": "(0, inf)",
    "train.weight_decay": "[0, inf)", "train.warmup_steps": "[0, inf)", "train.grad_clip": "(0, inf]",
    "train.ema_decay": "[0, 1)", "train.p_uncond": "[0, 1]", "train.seed": "[0, 2^63)",
    "train.ckpt_every": "[1, inf)", "train.keep_checkpoints": "[0, inf)", "train.log_every": "[1, inf)",
    "train.sample_every": "[0, inf)",
    "sample.steps": "[1, inf)", "sample.eta": "[0, 1]", "sample.guidance": "[0, inf)", "sample.clip": "(0, inf)",
    "distill.student_timesteps[]": "[0, inf)", "distill.adv_weight": "[0, inf)",
    "distill.distill_weight": "[0, inf)", "distill.teacher_t_min": "[0, inf)",
    "distill.teacher_t_max": "[0, inf)", "distill.teacher_guidance": "[0, inf)",
    "distill.r1_gamma": "[0, inf)", "distill.regress_weight": "[0, inf)",
    "distill.regress_pairs": "[1, inf)", "distill.regress_steps": "[1, inf)",
    "distill.disc_lr": "(0, inf)", "distill.betas[]": "[0, 1)", "distill.disc_steps": "[1, inf)",
    "distill.backbone_steps": "[1, inf)", "distill.backbone_patch": "[1, inf)",
    "distill.backbone_dim": "[1, inf)", "distill.backbone_depth": "[1, inf)",
    "distill.backbone_heads": "[1, inf)", "distill.backbone_size": "[0, inf)",
    "distill.disc_heads": "[1, inf)", "distill.disc_width": "[1, inf)", "distill.disc_mbstd": "[0, inf)",
    "refiner.pairs": "[1, inf)", "refiner.t_min": "[0, inf)", "refiner.t_max": "[0, inf)",
    "refiner.base_channels": "[1, inf)", "refiner.channel_mult[]": "[1, inf)",
}


def _in_range(value, spec: str) -> bool:
    lo_s, hi_s = spec[1:-1].split(", ")
    lo, hi = float(lo_s), float(2**63 if hi_s == "2^63" else hi_s)
    if math.isnan(value) or (math.isinf(value) and not (spec[-1] == "]" and value == hi)):
        return False
    return (lo <= value if spec[0] == "[" else lo < value) and (value <= hi if spec[-1] == "]" else value < hi)


def check_numbers(where: str, section) -> None:
    """Each number of a section dataclass in its RANGES entry (`where.option`), else finite; whole numbers at most
    _INT."""
    for f in dataclasses.fields(section):
        key, value = f"{where}.{f.name}", getattr(section, f.name)
        items = [(key, v) for v in value] if isinstance(value, tuple) else [(key, value)]
        spec = RANGES.get(key + "[]" if isinstance(value, tuple) else key)
        for name, v in items:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if spec is not None and not _in_range(v, spec):
                raise ConfigError(f"{name} must be in {spec}, got {v!r}")
            if isinstance(v, int) and v > _INT and key != "train.seed":
                raise ConfigError(f"{name} must be at most {_INT}, got {v}")
            if spec is None and not math.isfinite(v):
                raise ConfigError(f"{name} must be a finite number, got {v!r}")


def check_types(section_cls, values: dict, where: str) -> None:
    """Each raw value (from JSON or a flag) fits its dataclass field's type, before the section is built."""
    hints = typing.get_type_hints(section_cls)
    for name, value in values.items():
        if not _has_type(value, hints[name]):
            raise ConfigError(f"{where}.{name} must be {_type_name(hints[name])}, got {repr(value)[:60]}")


def guides_untrained_null(cfg, guidance: float) -> bool:
    """Whether classifier-free guidance `guidance` of a run's model would guide against a null label that the run
    never trained (train.p_uncond 0: its embedding row stays random). A student's null label is its teacher's."""
    m = cfg.model
    return guidance != 1 and bool(m.num_classes) and m.null_class and cfg.distill is None and not cfg.train.p_uncond


def validate(cfg, saved: bool = False) -> None:
    """Every option of every section in its range, and the combinations that would fail later (in training, at
    sampling time, or in another command) refused now. Raises ConfigError naming the option and what is allowed.
    saved: a run's own config.json, already trained: a default it cannot use (`guides_untrained_null`, which
    runs before 2026-12-07 could be given) is refused when sampling uses it, not when the run loads, and settings
    such runs were given without effect (distill.backbone_size without a backbone file, regress_steps beyond T)
    still load."""
    from fastdiff.config import REGRESS_AT
    from fastdiff.data.datasets import DATASETS
    from fastdiff.diffusion.parameterization import PREDICTIONS
    from fastdiff.diffusion.samplers import SPACINGS
    from fastdiff.diffusion.schedules import SCHEDULES, named_betas
    from fastdiff.runtime import AMP_MODES

    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if dataclasses.is_dataclass(section):
            check_numbers(f.name, section)
    m, d, s, dc = cfg.model, cfg.diffusion, cfg.sample, cfg.distill
    for key, value, choices in (("diffusion.schedule", d.schedule, SCHEDULES),
                                ("diffusion.prediction", d.prediction, PREDICTIONS),
                                ("sample.spacing", s.spacing, SPACINGS),
                                ("train.amp", cfg.train.amp, ("auto", *AMP_MODES)),
                                ("data.dataset", cfg.data.dataset, DATASETS)):
        if value not in choices:
            raise ConfigError(f"{key} {value!r} is not one of {', '.join(choices)}")
    if cfg.data.data_dir is not None and not str(cfg.data.data_dir).strip():  # "" was the current folder
        raise ConfigError("data.data_dir is empty; give a folder, or null for $FASTDIFF_DATA_DIR or ./data")

    if m.num_classes and not m.null_class:  # no null label to drop labels to, or to guide against
        if cfg.train.p_uncond:
            raise ConfigError(f"train.p_uncond {cfg.train.p_uncond} drops labels to the null class, which "
                              "model.null_class false removes; set train.p_uncond 0")
        if s.guidance != 1:
            raise ConfigError(f"sample.guidance {s.guidance} needs a null class, which model.null_class false "
                              "removes; set sample.guidance 1")
    if not m.num_classes and not saved:  # sampling took guidance as 1, training dropped no labels, without a word
        ddpm = [("train.p_uncond", cfg.train.p_uncond, 0)] if cfg.distill is None else []  # a student drops none
        for key, value, neutral in [("sample.guidance", s.guidance, 1), *ddpm]:
            if value != neutral:
                raise ConfigError(f"{key} {value} needs class labels, and model.num_classes 0 makes an unconditional "
                                  f"model; set {key} {neutral} (or give the model classes)")
    if not saved and guides_untrained_null(cfg, s.guidance):
        raise ConfigError(f"sample.guidance {s.guidance} guides against the null class, which train.p_uncond 0 "
                          "never trains (its embedding stays random); set train.p_uncond above 0 (e.g. 0.1) or "
                          "sample.guidance 1")

    if not m.channel_mult:
        raise ConfigError("model.channel_mult is empty; give one multiplier of base_channels per resolution level, "
                          "e.g. [1, 2, 2]")

    # The model: every attention resolution must be one the UNet has, and attention needs heads that divide it.
    resolutions = [m.image_size // 2**i for i in range(len(m.channel_mult))]
    missing = [r for r in m.attn_resolutions if r not in resolutions]
    if missing:
        levels = len(m.channel_mult)
        sizes = {r * 2**i for r in m.attn_resolutions for i in range(levels)}
        fit = sorted(z for z in sizes if z % 2 ** (levels - 1) == 0
                     and all(r in [z // 2**i for i in range(levels)] for r in m.attn_resolutions))
        raise ConfigError(f"model.image_size {m.image_size} does not fit this model: its attention resolutions "
                          f"{list(m.attn_resolutions)} are not among its levels {resolutions}, so attention would "
                          f"silently not exist; use image size {' or '.join(map(str, fit)) or '(none fits)'}, or a "
                          "preset made for this size")
    attn_channels = {m.base_channels * m.channel_mult[-1]}  # the middle block always has attention
    attn_channels |= {m.base_channels * mult for mult, r in zip(m.channel_mult, resolutions) if r in m.attn_resolutions}
    bad = sorted(c for c in attn_channels if c % m.num_heads)
    if bad:
        raise ConfigError(f"model.num_heads {m.num_heads} does not divide the attention channels {bad}")

    # The schedule: betas in (0, 1), so that alphas_cumprod stays positive (except zero terminal SNR's last step).
    try:
        named_betas(d.schedule, d.num_timesteps, d.beta_start, d.beta_end)
    except ConfigError as e:
        raise ConfigError(f"diffusion: {e}") from None
    if d.zero_terminal_snr:
        if d.prediction == "eps":
            raise ConfigError("diffusion.zero_terminal_snr with prediction eps cannot recover x0 at the last step "
                              "(alphas_cumprod = 0) and is refused by every sampler; use --prediction v")
    T = d.num_timesteps

    if dc is not None:
        ts = list(dc.student_timesteps)
        if not ts or any(t >= T for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
            raise ConfigError(f"distill.student_timesteps {ts} must be a non-empty, strictly decreasing list in "
                              f"[0, {T - 1}]")
        if not dc.teacher_t_min <= dc.teacher_t_max <= T - 1:
            raise ConfigError(f"distill.teacher_t_min {dc.teacher_t_min} and teacher_t_max {dc.teacher_t_max} must "
                              f"satisfy 0 <= min <= max <= {T - 1}")
        if dc.regress_at not in REGRESS_AT:
            raise ConfigError(f"distill.regress_at {dc.regress_at!r} is not one of {', '.join(REGRESS_AT)}")
        if dc.regress_steps > T and not saved:  # the teacher's DDIM steps for its pairs
            raise ConfigError(f"distill.regress_steps {dc.regress_steps} must be in [1, {T}] (the teacher's "
                              "timesteps)")
        # choices the discriminator and the losses hold, refused now (they failed after the teacher pairs and the
        # backbone's pretraining, and passed --dry-run)
        from fastdiff.models.discriminator import HEAD_KINDS, parse_augment
        from fastdiff.train.add_losses import WEIGHTINGS

        for key, value, choices in (("distill.disc_head", dc.disc_head, HEAD_KINDS),
                                    ("distill.distill_weighting", dc.distill_weighting, WEIGHTINGS)):
            if value not in choices:
                raise ConfigError(f"{key} {value!r} is not one of {', '.join(choices)}")
        parse_augment(dc.augment)
        if dc.backbone_dim % dc.backbone_heads:
            raise ConfigError(f"distill.backbone_dim {dc.backbone_dim} is not divisible by backbone_heads "
                              f"{dc.backbone_heads}")
        if dc.backbone in ("pretrain", "none") and m.image_size % dc.backbone_patch:
            raise ConfigError(f"distill.backbone_patch {dc.backbone_patch} does not divide the image size "
                              f"{m.image_size}")
        if dc.backbone in ("pretrain", "none") and dc.backbone_size and not saved:  # it was dropped without a word
            raise ConfigError(f"distill.backbone_size {dc.backbone_size} applies to a backbone file only; the "
                              f"'{dc.backbone}' backbone takes the images at their size: drop it")
        if not saved:  # what new runs would train without, silently (runs given them before still load)
            _check_add_settings(cfg)
        if dc.backbone in ("pretrain", "none") and dc.disc_heads > dc.backbone_depth:
            raise ConfigError(f"distill.disc_heads {dc.disc_heads} must be in [1, backbone_depth "
                              f"{dc.backbone_depth}]")

    # Sampling defaults: the run's own sampler must be able to run them.
    if s.sampler not in ("ddim", "ddpm", "student"):
        raise ConfigError(f"sample.sampler {s.sampler!r} is not one of ddim, ddpm, student")
    if s.sampler == "student" and dc is None:
        raise ConfigError("sample.sampler 'student' needs an ADD student run (a distill section)")
    limit = len(dc.student_timesteps) if s.sampler == "student" else T
    if s.steps > limit:
        raise ConfigError(f"sample.steps {s.steps} must be in [1, {limit}] for sampler {s.sampler}")
    if dc is not None and s.sampler != "student" and not saved:  # `fastdiff sample` of the student refused it
        from fastdiff.diffusion.samplers import student_grid

        ok = student_grid(dc.student_timesteps, T, s.spacing)
        if s.steps not in ok:
            raise ConfigError(f"sample.sampler {s.sampler} with sample.steps {s.steps} ({s.spacing} spacing) would run "
                              f"the student at timesteps other than its {list(dc.student_timesteps)}; use sampler "
                              f"student, or steps {' or '.join(map(str, ok)) or 'on another spacing'}")


def _check_add_settings(cfg) -> None:
    """A new student's settings that would do nothing: a loss with no weight at all, regression options without
    the regression, discriminator options without the adversarial loss, teacher guidance without a null class,
    minibatch-std groups of one sample."""
    m, dc = cfg.model, cfg.distill
    if not (dc.adv_weight or dc.distill_weight or dc.regress_weight):
        raise ConfigError("distill.adv_weight, distill_weight and regress_weight are all 0: the student would never "
                          "change; give one of them a weight (the preset's: adv 1, distill 2.5)")
    from fastdiff.config import DISCRIMINATOR_KEYS
    from fastdiff.presets import DISTILL_PRESETS, student_defaults

    # the options a switched-off part reads, set beyond what `distill_config` gives (its preset's, and the
    # defaults it fits to the teacher's T): --regress-weight 0 on mnist5k's regression options is an ablation
    T = cfg.diffusion.num_timesteps
    given = {**dataclasses.asdict(student_defaults(T)), **DISTILL_PRESETS.get(cfg.preset, {}).get("distill", {})}
    for off, reader, keys, fix in (
            (not dc.regress_weight, "the regression loss", ("regress_pairs", "regress_steps", "regress_at"),
             "distill.regress_weight is 0 (off): give --regress-weight"),
            (not dc.distill_weight, "the distillation loss", ("teacher_t_min", "teacher_t_max", "distill_weighting"),
             "distill.distill_weight is 0 (off): give --distill-weight"),
            (not dc.adv_weight, "the discriminator", DISCRIMINATOR_KEYS,
             "distill.adv_weight is 0 (off: no discriminator is built): give --adv-weight"),
            (dc.backbone != "pretrain", "the pretraining of a 'pretrain' backbone", ("backbone_steps",),
             f"distill.backbone is {dc.backbone!r}: give --backbone pretrain")):
        unused = [f"{key} {getattr(dc, key)!r}" for key in keys if getattr(dc, key) != given[key]]
        if off and unused:
            raise ConfigError(f"distill.{', '.join(unused)} set, which only {reader} reads, and {fix}, or drop "
                              f"{'them' if len(unused) > 1 else 'it'}")
    if dc.student_timesteps[0] != T - 1:  # sampling starts from pure noise, which only the noisiest one is
        raise ConfigError(f"distill.student_timesteps {list(dc.student_timesteps)} start at {dc.student_timesteps[0]}, "
                          f"but a student's sampling starts from pure noise, at the noisiest timestep {T - 1}; start "
                          f"them there (e.g. {T - 1} {(T - 1) // 2})")
    if dc.teacher_guidance != 1 and not (m.num_classes and m.null_class):
        raise ConfigError(f"distill.teacher_guidance {dc.teacher_guidance:g} needs a class-conditional teacher with a "
                          f"null class, and this one {'has none' if m.num_classes else 'is unconditional'}; set "
                          "--teacher-guidance 1")
    from fastdiff.train.distributed import torchrun_processes

    group, batch, processes = dc.disc_mbstd, cfg.train.batch_size, torchrun_processes()
    if batch % processes == 0:  # (else `check_batch_split` says so) each process's discriminator sees its share
        batch //= processes
    # minibatch std over gcd(batch, group), of a discriminator that exists
    if dc.adv_weight and group and not m.num_classes and (group == 1 or batch % group):
        took = math.gcd(batch, group)
        if group == 1:
            why, fix = "a group of one sample gives a constant feature", "--disc-mbstd 2 or more, or 0 for off"
        else:
            share = (f"train.batch_size {cfg.train.batch_size} over {processes} processes is {batch} each, which"
                     if processes > 1 else f"train.batch_size {batch}")
            why = (f"{share} is not a multiple of it: groups of {took} would be taken"
                   + (" (one sample: a constant feature)" if took == 1 else ""))
            fix = (f"a batch size that is a multiple of {group * processes}, or --disc-mbstd "
                   f"{took if took > 1 else 0}")
        raise ConfigError(f"distill.disc_mbstd {group} splits the (unconditional) discriminator's batches into groups "
                          f"of {group}, and {why}; use {fix}")


# --- one option of a call (no config built): the Python API's sampling options, the schedulers' arguments ---

# The ranges of the sampling options, for every caller: the CLI's flag types (fastdiff.cli.args) and the Python API
# (fastdiff.sampling.settings) both take them from here.
GUIDANCE_RANGE = dict(lo=0, allowed="0 and up, finite (1 = no guidance, 0 = the unconditional model)")
ETA_RANGE = dict(lo=0, hi=1, allowed="between 0 (deterministic DDIM) and 1")
NO_CLIP = ("none", "off", "inf")  # the clip values, besides float("inf"), of no clipping


def no_clip(value) -> bool:
    """Whether a clip value says "no clipping" in a way other than None: "none", "off" or "inf" (any case, as
    `--clip` takes them; a TOML file has no null) or float inf."""
    if isinstance(value, str):
        return value.strip().lower() in NO_CLIP
    return isinstance(value, float) and math.isinf(value) and value > 0


def number(name: str, value, *, lo=None, hi=None, lo_open: bool = False, finite: bool = True,
           allowed: str = "") -> float:
    """value as a float in [lo, hi] ((lo, hi] with lo_open; finite unless `finite` is False), else one ConfigError
    naming the option (the options of a call, where no config is built: sampling's, for every caller)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not _real_scalar(value):
        raise ConfigError(f"{name}={value!r} is not a number; use a value {allowed}")
    value = float(value)
    ok = (not math.isnan(value) and (math.isfinite(value) or not finite)
          and (lo is None or (value > lo if lo_open else value >= lo)) and (hi is None or value <= hi))
    if not ok:
        raise ConfigError(f"{name}={value:g} is outside the allowed range: {allowed}")
    return value


def integer(name: str, value) -> int:
    """value as an int (of an integer type: 2.5 or "2" is refused, not truncated), else one ConfigError."""
    try:
        n = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        n = None
    if n is None:
        raise ConfigError(f"{name}={value!r} is not a whole number; give an integer")
    return n


def path_arg(name: str, value) -> str:
    """A file or folder argument as a str: a str or os.PathLike, not empty (an unset shell variable, "", would be
    the current folder); else one ConfigError (None or 3 were TypeErrors)."""
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"{name}={value!r} is not a path; give a file or folder name")
    text = os.fspath(value)
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{name} is empty; give a file or folder name")
    return text


def flag(name: str, value) -> bool:
    """value as a bool (True or False, a numpy bool too), else one ConfigError: "no", or 1, was taken as true."""
    if isinstance(value, bool):
        return value
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0 and value.dtype.kind == "b":
        return bool(value)
    raise ConfigError(f"{name}={value!r} is not True or False")


def count(name: str, value) -> int:
    """value as an int >= 1, else one ConfigError naming the option."""
    n = integer(name, value)
    if n < 1:
        raise ConfigError(f"{name}={n} must be at least 1")
    return n


def _real_scalar(value) -> bool:
    """A numpy or 0-d torch real number (what a caller's arithmetic may hand over)."""
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.is_complex() and value.dtype != torch.bool
    return type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0 and value.dtype.kind in "iuf"
