"""Named presets (`fastdiff train --preset`, `fastdiff distill --preset`): overrides on the defaults of the
config dataclasses in `fastdiff.config`, sized by measurement (README), and the configs built from them.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, replace

from fastdiff.config import ADDConfig, RunConfig, TrainConfig, apply_overrides
from fastdiff.errors import ConfigError

# Presets: overrides on the defaults of fastdiff.config. Sizes, steps and learning rates were chosen by measurement
# (see README); `digits` is sized to train on 2 CPU cores in a few minutes.
PRESETS: dict[str, dict] = {
    "digits": {
        "model": dict(image_size=8, in_channels=1, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                      attn_resolutions=(4,), dropout=0.0, num_groups=8, num_classes=10),
        "data": dict(dataset="digits"),
        "train": dict(steps=1000, batch_size=128, lr=2e-3, warmup_steps=100, ema_decay=0.999, ckpt_every=250,
                      log_every=100),
        "sample": dict(guidance=2.0),
    },
    "mnist": {
        "model": dict(image_size=28, in_channels=1, base_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2,
                      attn_resolutions=(7,), dropout=0.1, num_groups=32, num_classes=10),
        "data": dict(dataset="mnist"),
        "train": dict(steps=20_000, batch_size=128, lr=2e-4, warmup_steps=500, ema_decay=0.9995),
        "sample": dict(guidance=2.0),
    },
    "fer2013": {
        "model": dict(image_size=48, in_channels=1, base_channels=64, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                      attn_resolutions=(12,), dropout=0.1, num_groups=32, num_classes=7),
        "data": dict(dataset="fer2013", hflip=True),
        "train": dict(steps=100_000, batch_size=128, lr=2e-4, warmup_steps=1000),
        "sample": dict(guidance=2.0),
    },
    "cifar10-ddpm": {
        # Ho et al. 2020, Appendix B: 35.7M parameters, T = 1000 linear betas, lr 2e-4, batch 128, 800k steps,
        # dropout 0.1, random flips, EMA 0.9999, unconditional.
        "model": dict(image_size=32, in_channels=3, base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                      attn_resolutions=(16,), dropout=0.1, num_groups=32, num_classes=0),
        "data": dict(dataset="cifar10", hflip=True),
        "train": dict(steps=800_000, batch_size=128, lr=2e-4, warmup_steps=5000, grad_clip=1.0, ema_decay=0.9999,
                      ckpt_every=5000, log_every=500, p_uncond=0.0),
    },
}
# Fashion-MNIST: the MNIST network and settings, trained longer (its classes are harder to tell apart).
PRESETS["fashion-mnist"] = {**copy.deepcopy(PRESETS["mnist"]), "data": dict(dataset="fashion-mnist")}
PRESETS["fashion-mnist"]["train"]["steps"] = 30_000
# The digits teacher for ADD students (`make distill-demo`): the same network and schedule, v-prediction. An
# eps-prediction teacher's x0 at t = 999 is (x - sqrt(1 - ab) eps) / sqrt(ab), which multiplies its eps error by
# 1 / sqrt(ab) = 157, so its student starts from a poor 1-step sampler (README, "Few-step students").
PRESETS["digits-v"] = {**copy.deepcopy(PRESETS["digits"]), "diffusion": dict(prediction="v")}
# Real MNIST on 2 CPU cores (`make demo`): the 4,000 training digits of mnist5k (the 1,000 held out are eval's
# reference). 1300 steps of 64 train in 7-7.5 min on 2 cores (1500: FD_cls 1.36x vs 1.42x, but 8 min 52 s; README,
# "Results"). v-prediction: the same run is the ADD teacher (`make distill-demo`) and the shipped weights (an eps
# teacher's 1-step x0 amplifies its error by 1/sqrt(ab_999) = 157, see digits-v; on digits eps and v scored alike).
PRESETS["mnist5k"] = {
    "model": dict(image_size=28, in_channels=1, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                  attn_resolutions=(7,), dropout=0.0, num_groups=8, num_classes=10),
    "diffusion": dict(prediction="v"),
    "data": dict(dataset="mnist5k"),
    "train": dict(steps=1300, batch_size=64, lr=1e-3, warmup_steps=100, ema_decay=0.998, ckpt_every=250,
                  log_every=50),
    # guidance 1.35: of 1 / 1.25 / 1.35 / 1.4 / 1.5 / 2 on the shipped teacher, the lowest FD_cls with accuracy
    # >= 98% (1.08x the floor, 98.3%; 1.5: 1.38x, 99.1%; 1.25: 0.94x but 97.5%; README, "Results")
    "sample": dict(guidance=1.35, steps=20),
}

# One line per preset for `fastdiff train --help` (tests/test_cli_help.py checks that every preset has one).
PRESET_HELP: dict[str, str] = {
    "digits": "scikit-learn's 8x8 digits, 1.1M-parameter conditional UNet; ~3 minutes on 2 CPU cores",
    "digits-v": "digits with v-prediction: the teacher for few-step ADD students",
    "mnist5k": "the 4,000 embedded MNIST training digits, 28x28, v-prediction; `make demo`, ~7.5 minutes on 2 CPU "
               "cores",
    "mnist": "MNIST 28x28, 6.5M-parameter conditional UNet, 20k steps",
    "fashion-mnist": "Fashion-MNIST 28x28, the mnist network, 30k steps",
    "fer2013": "FER-2013 48x48 faces (7 emotions), 9.0M parameters; needs fer2013.csv",
    "cifar10-ddpm": "CIFAR-10 32x32, Ho et al. 2020's 35.7M-parameter unconditional DDPM, 800k steps",
}

# The preset a dataset trains with when --dataset is given without --preset. Datasets with no native size
# (folder, synthetic) keep the default preset.
DATASET_PRESETS = {"digits": "digits", "mnist5k": "mnist5k", "mnist": "mnist", "fashion-mnist": "fashion-mnist",
                   "cifar10": "cifar10-ddpm", "fer2013": "fer2013"}
DEFAULT_PRESET = "digits"


def preset_config(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    base = RunConfig().to_dict()
    base["preset"] = name
    for section, values in PRESETS[name].items():
        base[section].update(copy.deepcopy(values))
    return RunConfig.from_dict(base)


def train_config(preset: str | None, overrides: dict[str, object], resized: bool | None = None) -> RunConfig:
    """A new training run's config: `preset` with the CLI overrides ({"section.option": value}) on top.

    Without a preset, the dataset (overrides["data.dataset"]) picks its own from DATASET_PRESETS, so that
    `--dataset mnist5k` builds a 28x28 model. A dataset whose native image size differs from the model's is
    refused unless the image size was chosen for it (`resized`; None: model.image_size is among the overrides):
    images are never resized silently (MNIST squashed to 8x8 under the digits preset).
    """
    from fastdiff.data.datasets import NATIVE

    dataset = overrides.get("data.dataset")
    name = preset or DATASET_PRESETS.get(dataset, DEFAULT_PRESET)
    cfg = apply_overrides(preset_config(name), overrides)
    native = NATIVE.get(cfg.data.dataset)
    size = cfg.model.image_size
    resized = overrides.get("model.image_size") is not None if resized is None else resized
    if native and native[1] != size and not resized:
        n = native[1]
        raise ConfigError(f"dataset {cfg.data.dataset} has {n}x{n} images but preset {name} builds a model for "
                          f"{size}x{size} images; use --preset {DATASET_PRESETS[cfg.data.dataset]} (or no --preset), "
                          f"or pass --image-size {size} to resize the images on purpose")
    # an image folder has no size of its own: it read under the default preset as 8x8 grayscale without a word
    default = preset_config(name).model
    unset = [f"{flag} ({what}; preset {name}'s is {value})" for flag, what, value, chosen in (
        ("--image-size", "e.g. 32", default.image_size, resized),
        ("--channels", "1 or 3", default.in_channels, "model.in_channels" in overrides)) if not chosen]
    if cfg.data.dataset == "folder" and preset is None and unset:
        raise ConfigError(f"--dataset folder crops and resizes its images to the model's size and converts them to "
                          f"its channels, which nothing chose here; pass {' and '.join(unset)}, or a --preset")
    return cfg


# Distillation presets: overrides on top of the teacher's config (its model, diffusion and data sections stay).
# `train` here is the student's loop; `sample` makes `fastdiff sample` use the few-step sampler.
DISTILL_PRESETS: dict[str, dict] = {
    "default": {
        "train": dict(steps=4000, batch_size=64, lr=1e-5, warmup_steps=100, weight_decay=0.0, grad_clip=1.0,
                      ema_decay=0.999, ckpt_every=500, log_every=50),
        "distill": dict(),
        "sample": dict(sampler="student", steps=4, guidance=1.0, eta=0.0),
    },
}
DISTILL_PRESETS["digits"] = {
    "train": dict(steps=1000, batch_size=64, lr=1e-4, warmup_steps=50, weight_decay=0.0, grad_clip=1.0,
                  ema_decay=0.999, ckpt_every=250, log_every=50),
    # Measured on digits-v (README, "Few-step students"): a backbone adapted with the heads beat a frozen one,
    # and without spectral norm or with r1_gamma 1 the 4-step student was worse.
    "distill": dict(disc_lr=2e-4, r1_gamma=0.1, train_backbone=True),
    "sample": dict(sampler="student", steps=4, guidance=1.0, eta=0.0),
}
DISTILL_PRESETS["digits-v"] = DISTILL_PRESETS["digits"]
# mnist5k (`make distill-demo`; README, "Few-step students"): digits' at batch 32 with the regression loss on 1024
# teacher samples (without: one digit per class at 1 step) at every student timestep (at the first only, 4 steps
# lost variety) with weight 10 (1: 2.6x / 3.2x the floor at 1 / 4 steps, 10: 1.6x / 2.1x) and adv weight 0.25 (at
# 1 D won); it samples in 1 step by default (its own sampler at 2 steps is level at half the speed; DDIM on its
# timesteps with eta 0.7 is better at 2 and 4 steps, `--sampler ddim --steps 4 --eta 0.7`; the refiner refines
# 1-step samples).
DISTILL_PRESETS["mnist5k"] = copy.deepcopy(DISTILL_PRESETS["digits"])
DISTILL_PRESETS["mnist5k"]["train"].update(batch_size=32, steps=400, ckpt_every=200)
DISTILL_PRESETS["mnist5k"]["distill"].update(adv_weight=0.25, regress_weight=10.0, regress_pairs=1024,
                                             regress_at="all")
DISTILL_PRESETS["mnist5k"]["sample"]["steps"] = 1

DISTILL_PRESET_HELP: dict[str, str] = {  # one line per distillation preset for `fastdiff distill --help`
    "default": "any teacher: 4000 student updates at lr 1e-5, frozen pretrained ViT backbone",
    "digits": "1000 updates at lr 1e-4 with an adapted backbone (measured best on digits-v)",
    "digits-v": "the digits preset",
    "mnist5k": "400 updates at batch 32, regression (weight 10) on 1024 teacher samples and their states at every "
               "student timestep, adv weight 0.25, 1 step: `make distill-demo`",
}


def student_defaults(T: int) -> ADDConfig:
    """ADDConfig's defaults fitted to a teacher of T timesteps: they are T = 1000's (999, 749, 499, 249 and a teacher
    t up to 999), so for another T the same spread over its own (a teacher of 500 was refused whatever the flags
    said, one of 2000 started its student halfway), and at most T regression steps. `distill_config` starts from
    them, and `config_checks` tells a user's setting from them."""
    from fastdiff.diffusion.samplers import make_timesteps

    add = ADDConfig()
    spread = tuple(int(t) for t in make_timesteps(T, min(len(add.student_timesteps), T), "trailing"))
    return replace(add, student_timesteps=spread, teacher_t_max=T - 1, regress_steps=min(add.regress_steps, T))


def distill_config(teacher_cfg: RunConfig, teacher_path: str, preset: str | None = None) -> RunConfig:
    """A student run's config: the teacher's model, diffusion and data sections with a distillation preset on top.

    preset None picks the preset named like the teacher's (e.g. digits), else "default".
    """
    if teacher_cfg.is_student:
        raise ConfigError(f"{teacher_path} is itself an ADD student; distil from a DDPM teacher run")
    name = preset or (teacher_cfg.preset if teacher_cfg.preset in DISTILL_PRESETS else "default")
    if name not in DISTILL_PRESETS:
        raise ConfigError(f"unknown distillation preset {name!r}; choose one of: {', '.join(DISTILL_PRESETS)}")
    d = teacher_cfg.to_dict()
    d["preset"] = name  # the distillation preset (the teacher's own is in its run)
    d["train"] = asdict(TrainConfig())
    tm = teacher_cfg.model  # a teacher without a null class guides nothing (an older one's config may say 2)
    guidance = teacher_cfg.sample.guidance if tm.num_classes and tm.null_class else 1.0
    d["distill"] = asdict(replace(student_defaults(teacher_cfg.diffusion.num_timesteps), teacher=str(teacher_path),
                                  teacher_guidance=guidance))
    for section, values in DISTILL_PRESETS[name].items():
        d[section].update(copy.deepcopy(values))
    return RunConfig.from_dict(d)
