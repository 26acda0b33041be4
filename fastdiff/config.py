"""Run configuration: dataclasses and CLI overrides on top of a preset (the presets: `fastdiff.presets`).

A resolved config is written to every run directory as config.json and read back by sample, eval and resume.
"""

from __future__ import annotations

import dataclasses
import json
import os
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
    # False: no null label (the class embedding has num_classes rows; no classifier-free guidance). fastdiff's runs
    # have one; a diffusers UNet2DModel that fastdiff did not export has none (fastdiff.interop.diffusers).
    null_class: bool = True
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
        if not isinstance(self.num_groups, int) or isinstance(self.num_groups, bool) or self.num_groups < 1:
            raise ConfigError(f"model.num_groups must be a whole number of at least 1, got {self.num_groups!r}")
        for m in (1, *self.channel_mult):  # 1: the input convolution's channels, normed where channel_mult[0] > 1
            if (self.base_channels * m) % self.num_groups:  # (num_groups 0 was a ZeroDivisionError)
                raise ConfigError(f"channels {self.base_channels * m} (base_channels {self.base_channels} x {m}) not "
                                  f"divisible by num_groups={self.num_groups}; choose base_channels or num_groups so "
                                  "that it divides every level's channels")


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


REGRESS_AT = ("first", "all")  # ADDConfig.regress_at


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
    regress_at: str = "first"  # one of REGRESS_AT
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


# the ADDConfig options only the discriminator reads (none is built where adv_weight is 0)
DISCRIMINATOR_KEYS = ("r1_gamma", "disc_lr", "disc_steps", "augment", "backbone", "train_backbone", "backbone_steps",
                      "backbone_patch", "backbone_dim", "backbone_depth", "backbone_heads", "backbone_size",
                      "disc_heads", "disc_head", "disc_width", "disc_mbstd", "spectral_norm")


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
    def from_dict(cls, d: dict, source: str | None = None, saved: bool = False) -> "RunConfig":
        """A validated RunConfig (see `validate`; saved: a run's own config.json) from its dict; `source` (a file)
        prefixes every error."""
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
                kwargs[key] = build_section(SECTIONS[key], value, key)
            cfg = cls(**kwargs)
            validate(cfg, saved)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}" if source else str(e)) from None
        return cfg


def checked(cfg, *, student: bool, saved: bool = False) -> RunConfig:
    """cfg checked as a config file is (`validate`; saved: a resumed run's own): a RunConfig built or changed in
    Python trained unchecked and wrote a run that would not load. `student`: whether the trainer takes a distilled
    student's config (`distill_config`) or a DDPM run's."""
    if not isinstance(cfg, RunConfig):
        raise ConfigError(f"the config must be a fastdiff.config.RunConfig (preset_config, load_config), got "
                          f"{type(cfg).__name__}")
    if cfg.is_student != student:
        raise ConfigError("a distilled student's config (with a distill section) trains with train_add" if
                          cfg.is_student else "train_add needs a student's config: fastdiff.config.distill_config")
    return RunConfig.from_dict(cfg.to_dict(), saved=saved)


# the kinds of training run (each checkpoint's state.json "kind") and the command that trains and resumes each
RUN_KINDS = {"ddpm": "fastdiff train", "add-student": "fastdiff distill", "refiner": "fastdiff train-refiner"}

# The options a resume of each kind may change ("section.option"): the loop's length, intervals, learning rate and
# precision (and layout, which the device decides), where the data is read from, and the checkpoint of the other
# run that a student or a refiner reads (a resume moves on to that run's newest where it pruned the recorded one:
# `rundir.source_checkpoint`). Any other change would make the checkpoint and the config disagree: the training
# loop refuses it, whatever gave it (a flag, the Python API, a hand-edited config.json).
_LOOP_RESUMABLE = {"train.steps", "train.ckpt_every", "train.log_every", "train.lr", "train.amp",
                   "train.channels_last"}
RESUMABLE = {
    "ddpm": _LOOP_RESUMABLE | {"train.warmup_steps", "train.sample_every", "train.tensorboard", "data.data_dir"},
    "add-student": _LOOP_RESUMABLE | {"train.warmup_steps", "train.sample_every", "train.tensorboard",
                                      "data.data_dir", "distill.teacher"},
    "refiner": _LOOP_RESUMABLE | {"refiner.data_dir", "refiner.generator"},
}


def config_changes(old: dict, new: dict, where: str = "") -> list[tuple[str, object, object]]:
    """The options that differ between two configs, as ('section.option', old, new) (a tuple equals the list that
    config.json holds for it). An option the old config lacks is one added since it was written: no change."""
    out = []
    for key in sorted(set(old) & set(new)):
        a, b = (list(v) if isinstance(v, tuple) else v for v in (old.get(key), new.get(key)))
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{where}{key}.")
        elif a != b:
            out.append((f"{where}{key}", a, b))
    return out


def resume_changes(old: dict, new: dict, kind: str) -> list[tuple[str, object, object]]:
    """The changes (`config_changes`) from the config of the checkpoint a resume starts from (`old`) to the run's
    new config; one ConfigError where one is not among those a resume of `kind` may make (`config.RESUMABLE`: the
    command line refuses such flags itself; this also holds for the Python API and a hand-edited config.json)."""
    changes = config_changes(old, new)
    refused = [f"{key} {a} -> {b}" for key, a, b in changes if key not in RESUMABLE[kind]]
    if refused:
        allowed = ", ".join(sorted(RESUMABLE[kind]))
        raise ConfigError(f"a resume cannot change {'; '.join(refused)} (the checkpoint was trained with the old "
                          f"value); only {allowed} can change. Restore the run's config.json, or start a new run")
    return changes


def run_kind(d) -> str:
    """The RUN_KINDS key of a run's config.json dict: a refiner's, a distilled student's (a distill section), or a
    DDPM run's."""
    if isinstance(d, dict) and d.get("kind") == "refiner":
        return "refiner"
    return "add-student" if isinstance(d, dict) and isinstance(d.get("distill"), dict) else "ddpm"


def load_config(path) -> RunConfig:
    """The RunConfig in a config.json (a run's or a checkpoint's), validated; one ConfigError naming the file."""
    from fastdiff.checkpoint import CHECKPOINTS, is_pretrained, read_json

    d = read_json(path, error=ConfigError)
    if isinstance(d, dict) and d.get("kind") == "refiner":
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.basename(os.path.dirname(folder)) == CHECKPOINTS:  # a run's checkpoint: name the run
            folder = os.path.dirname(os.path.dirname(folder))
        name = f"pretrained:{os.path.basename(folder)}" if is_pretrained(folder) else folder
        generator = d["refiner"].get("generator") if isinstance(d.get("refiner"), dict) else None
        raise ConfigError(f"{name} is a refiner (fastdiff train-refiner), not a diffusion run: it refines the samples "
                          f"of its generator, e.g. fastdiff sample --checkpoint {generator or 'GENERATOR'} --refine "
                          f"{name}")
    missing = [name for name in ("model", "diffusion", "data", "train", "sample") if name not in d]
    if missing:
        raise ConfigError(f"{path}: config sections {missing} are missing; this is not a config.json that fastdiff "
                          "wrote")
    return RunConfig.from_dict(d, source=str(path), saved=True)


def build_section(section_cls, values: dict, where: str):
    """The section dataclass of `values` (a config file's or a flag's raw values): one ConfigError naming `where`
    for an unknown option or a value of the wrong type. Its numbers' ranges: `config_checks.check_numbers`."""
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


def apply_overrides(cfg: RunConfig, overrides: dict[str, object], saved: bool = False) -> RunConfig:
    """Overrides are {"section.option": value}. A None is a value (a --config file's null: no clipping, grids at
    each checkpoint), checked like any other; flags the user did not pass are left out by the CLI, not here.
    saved: cfg is a resumed run's own (`validate`'s saved: what such a run was given before a check still loads).
    A new config of an unconditional model (model.num_classes 0) has guidance 1 and label dropout 0 unless they are
    given: a class-conditional preset's would be ignored by sampling and training, yet written in the run."""
    d = cfg.to_dict()
    for key, value in overrides.items():
        section, _, option = key.partition(".")
        if section not in d or not isinstance(d[section], dict) or option not in d[section]:
            raise ConfigError(f"unknown option {key!r}")
        d[section][option] = value
    if not saved and d["model"]["num_classes"] == 0:
        for key, neutral in (("sample.guidance", 1.0), ("train.p_uncond", 0.0)):
            section, _, option = key.partition(".")
            if key not in overrides:
                d[section][option] = neutral
    return RunConfig.from_dict(d, saved=saved)


# The presets live in fastdiff.presets (they build on the dataclasses above); fastdiff.config keeps their names.
from fastdiff.presets import (  # noqa: E402  (after the dataclasses it imports)
    DATASET_PRESETS,
    DEFAULT_PRESET,
    DISTILL_PRESET_HELP,
    DISTILL_PRESETS,
    PRESET_HELP,
    PRESETS,
    distill_config,
    preset_config,
    train_config,
)

__all__ = [
    "ADDConfig", "DataConfig", "DiffusionConfig", "REGRESS_AT", "RunConfig", "SECTIONS", "SampleConfig",
    "TrainConfig", "UNetConfig", "apply_overrides", "load_config",
    "DATASET_PRESETS", "DEFAULT_PRESET", "DISTILL_PRESET_HELP", "DISTILL_PRESETS", "PRESET_HELP", "PRESETS",
    "distill_config", "preset_config", "train_config",
]
