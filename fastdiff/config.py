"""Run configuration: dataclasses, named presets, and CLI overrides on top of a preset.

A resolved config is written to every run directory as config.json and read back by sample, eval and resume.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import asdict, dataclass, field

from fastdiff.config_checks import check_types, validate
from fastdiff.errors import ConfigError
from fastdiff.runtime import train_defaults


@dataclass
class UNetConfig:
    """The UNet of `fastdiff.models.unet` (here so that configs import no model code)."""

    image_size: int = 32
    in_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    num_heads: int = 1
    dropout: float = 0.1
    num_groups: int = 32
    num_classes: int = 0  # 0: unconditional; else labels 0..num_classes-1 and the null label num_classes
    # Layout options of imported diffusers UNet2DModels (google/ddpm-cifar10-32: False, 1, 0, 1e-6):
    flip_sin_to_cos: bool = True  # timestep features [cos, sin] (False: [sin, cos])
    freq_shift: float = 0.0  # frequencies exp(-ln(max_period) * i / (half - freq_shift))
    downsample_padding: int = 1  # 0: pad right/bottom by one before the stride-2 conv
    norm_eps: float = 1e-5  # GroupNorm epsilon

    def __post_init__(self):
        if self.downsample_padding not in (0, 1):
            raise ConfigError(f"downsample_padding={self.downsample_padding} must be 0 or 1")
        self.channel_mult = tuple(self.channel_mult)
        self.attn_resolutions = tuple(self.attn_resolutions)
        downs = len(self.channel_mult) - 1
        if self.image_size % (2**downs):
            raise ConfigError(
                f"image_size={self.image_size} is not divisible by 2**{downs} for channel_mult={self.channel_mult}; "
                "choose an image size or fewer levels that divide evenly"
            )
        for m in self.channel_mult:
            if (self.base_channels * m) % self.num_groups:
                raise ConfigError(f"channels {self.base_channels * m} not divisible by num_groups={self.num_groups}")


@dataclass
class DiffusionConfig:
    schedule: str = "linear"  # linear | cosine
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    zero_terminal_snr: bool = False
    prediction: str = "eps"  # eps | v | x0


@dataclass
class DataConfig:
    """Images are loaded at model.image_size (resized when the dataset's native size differs)."""

    dataset: str = "digits"
    data_dir: str | None = None  # None: $FASTDIFF_DATA_DIR or ./data
    hflip: bool = False  # random horizontal flips (CIFAR-10, FER-2013; never digits)


@dataclass
class TrainConfig:
    steps: int = 10_000
    batch_size: int = 128
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 500
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    amp: str = "auto"  # fp32 | bf16 | fp16 | auto: the device's default (`runtime.train_defaults`), recorded by the run
    p_uncond: float = 0.1  # label dropout for classifier-free guidance (class-conditional models)
    seed: int = 0
    ckpt_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 100
    channels_last: bool | None = None  # NHWC activations (None: the device's default, as for amp)
    sample_every: int | None = None  # EMA sample grid every N steps into RUN/samples (None: at each checkpoint; 0: off)
    tensorboard: bool = False  # scalars and sample grids as TensorBoard events under RUN/tb

    def for_device(self, device) -> "TrainConfig":
        """This config with amp "auto" and channels_last None decided for `device` (`runtime.train_defaults`)."""
        amp, channels_last = train_defaults(device)
        return dataclasses.replace(self, amp=amp if self.amp == "auto" else self.amp,
                                   channels_last=channels_last if self.channels_last is None else self.channels_last)


@dataclass
class SampleConfig:
    """Defaults for `fastdiff sample` and `fastdiff eval` with this run's checkpoints."""

    sampler: str = "ddim"  # ddim | ddpm | student (the few-step sampler of an ADD student)
    steps: int = 50
    eta: float = 0.0
    guidance: float = 1.0
    spacing: str = "trailing"
    clip: float | None = 1.0


@dataclass
class ADDConfig:
    """Adversarial Diffusion Distillation (Sauer et al. 2023) of a teacher run into a few-step student.

    The student's optimizer, warm-up, EMA, AMP, steps, batch size and checkpointing are the run's `train`
    section; this section holds what is specific to ADD. A run whose config has it is a student.
    """

    teacher: str = ""  # the teacher's run directory or checkpoint folder
    student_timesteps: tuple[int, ...] = (999, 749, 499, 249)  # the student's timesteps, noisiest first
    # Generator loss = adv_weight * hinge adversarial + distill_weight * c(t) * ||x0_student - sg(x0_teacher)||^2
    adv_weight: float = 1.0
    distill_weight: float = 2.5  # lambda
    distill_weighting: str = "sqrt_ab"  # c(t): sqrt_ab | ab | snr | none
    teacher_t_min: int = 0  # the teacher's timestep is uniform on [teacher_t_min, teacher_t_max]
    teacher_t_max: int = 999
    teacher_guidance: float = 1.0  # classifier-free guidance of the teacher's x0 (class-conditional teachers)
    # + regress_weight * ||x0_student(z, first student timestep) - teacher DDIM-regress_steps(z)||^2 on
    # regress_pairs cached teacher samples (`fastdiff.train.add_pairs`: keeps a 1-step student's variety)
    regress_weight: float = 0.0
    regress_pairs: int = 2048
    regress_steps: int = 20
    # first: only the pure noise at the first student timestep; all: also the teacher's DDIM state of the same
    # noise at each later student timestep -> the same sample (the multistep sampler's later steps then keep a
    # deterministic target, as in consistency distillation, instead of ADD alone)
    regress_at: str = "first"
    # Discriminator: hinge loss + r1_gamma / 2 * E ||grad of D(real) w.r.t. the head inputs||^2
    r1_gamma: float = 1e-4
    disc_lr: float = 1e-4
    betas: tuple[float, float] = (0.0, 0.99)  # Adam betas of the student and the discriminator
    disc_steps: int = 1  # discriminator updates per student update
    augment: str = "translation,cutout"  # DiffAugment ops, comma-separated ('' for none)
    backbone: str = "pretrain"  # pretrain (a ViT classifier trained on the dataset, cached) | none | PATH
    train_backbone: bool = False  # adapt the backbone too (a 'none' backbone always trains)
    backbone_steps: int = 600  # pretraining steps of a 'pretrain' backbone
    backbone_patch: int = 2  # architecture of a 'pretrain' / 'none' backbone (a file brings its own)
    backbone_dim: int = 64
    backbone_depth: int = 4
    backbone_heads: int = 4
    backbone_size: int = 0  # input size of a file backbone (0: its pretraining size)
    disc_heads: int = 2  # heads on this many evenly spaced backbone blocks
    disc_head: str = "conv"  # conv | mlp
    disc_width: int = 64
    disc_mbstd: int = 4  # minibatch-std channel over same-label samples (groups of this size if unconditional); 0: off
    spectral_norm: bool = True

    def __post_init__(self):
        self.student_timesteps = tuple(int(t) for t in self.student_timesteps)
        self.betas = tuple(self.betas)


@dataclass
class RunConfig:
    preset: str = "digits"
    model: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    distill: ADDConfig | None = None  # set on ADD students only

    @property
    def is_student(self) -> bool:
        return self.distill is not None

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.distill is None:  # teacher configs stay as they were before ADD existed
            del d["distill"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict, source: str | None = None) -> "RunConfig":
        """A validated RunConfig (see `validate`) from its dict; `source` (a file) prefixes every error."""
        try:
            if not isinstance(d, dict):
                raise ConfigError(f"a config is a JSON object of sections, got {type(d).__name__}")
            sections = {f.name for f in dataclasses.fields(cls)}
            kwargs = {}
            for key, value in d.items():
                if key not in sections:
                    raise ConfigError(f"unknown config section {key!r}")
                if key == "preset" or (key == "distill" and value is None):
                    if key == "preset" and not isinstance(value, str):
                        raise ConfigError(f"preset must be a string, got {value!r}")
                    kwargs[key] = value
                    continue
                kwargs[key] = _build(SECTIONS[key], value, key)
            cfg = cls(**kwargs)
            validate(cfg)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}" if source else str(e)) from None
        return cfg


def load_config(path) -> RunConfig:
    """The RunConfig in a config.json (a run's or a checkpoint's), validated; one ConfigError naming the file."""
    from fastdiff.checkpoint import read_json

    d = read_json(path, error=ConfigError)
    missing = [name for name in ("model", "diffusion", "data", "train", "sample") if name not in d]
    if missing:
        raise ConfigError(f"{path}: config sections {missing} are missing; this is not a config.json that fastdiff "
                          "wrote")
    return RunConfig.from_dict(d, source=str(path))


def _build(section_cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"config section {where!r} must be an object of options, got {repr(values)[:60]}")
    names = {f.name for f in dataclasses.fields(section_cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"unknown option(s) {sorted(unknown)} in config section {where!r}")
    check_types(section_cls, values, where)
    try:
        return section_cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid {where} config: {e}") from None


SECTIONS = {"model": UNetConfig, "diffusion": DiffusionConfig, "data": DataConfig, "train": TrainConfig,
            "sample": SampleConfig, "distill": ADDConfig}


# Presets: overrides on the defaults above. Sizes, steps and learning rates were chosen by measurement
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
                      ckpt_every=5000, log_every=500),
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


def train_config(preset: str | None, overrides: dict[str, object]) -> RunConfig:
    """A new training run's config: `preset` with the CLI overrides ({"section.option": value}) on top.

    Without a preset, the dataset (overrides["data.dataset"]) picks its own from DATASET_PRESETS, so that
    `--dataset mnist5k` builds a 28x28 model. A dataset whose native image size differs from the model's is
    refused unless model.image_size is overridden explicitly: images are never resized silently (MNIST squashed
    to 8x8 under the digits preset).
    """
    from fastdiff.data.datasets import NATIVE

    dataset = overrides.get("data.dataset")
    name = preset or DATASET_PRESETS.get(dataset, DEFAULT_PRESET)
    cfg = apply_overrides(preset_config(name), overrides)
    native = NATIVE.get(cfg.data.dataset)
    size = cfg.model.image_size
    if native and native[1] != size and overrides.get("model.image_size") is None:
        n = native[1]
        raise ConfigError(f"dataset {cfg.data.dataset} has {n}x{n} images but preset {name} builds a model for "
                          f"{size}x{size} images; use --preset {DATASET_PRESETS[cfg.data.dataset]} (or no --preset), "
                          f"or pass --image-size {size} to resize the images on purpose")
    return cfg


def apply_overrides(cfg: RunConfig, overrides: dict[str, object]) -> RunConfig:
    """Overrides are {"section.option": value}; None values are skipped (flags the user did not pass)."""
    d = cfg.to_dict()
    for key, value in overrides.items():
        if value is None:
            continue
        section, _, option = key.partition(".")
        if section not in d or not isinstance(d[section], dict) or option not in d[section]:
            raise ConfigError(f"unknown option {key!r}")
        d[section][option] = value
    return RunConfig.from_dict(d)


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
    d["train"] = asdict(TrainConfig())
    d["distill"] = asdict(ADDConfig(teacher=str(teacher_path), teacher_guidance=teacher_cfg.sample.guidance))
    for section, values in DISTILL_PRESETS[name].items():
        d[section].update(copy.deepcopy(values))
    return RunConfig.from_dict(d)
