"""`fastdiff train | sample | eval | env | bench | distill | train-refiner | export | plot`.

Errors that the user can fix (FastdiffError) print one line and exit with status 2; anything else is a bug
and keeps its traceback.

Over 400 lines on purpose: one parser function and one command function per subcommand, read side by side;
splitting the parsers from their commands would only scatter them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from fastdiff.errors import ConfigError, FastdiffError

# --- option checks: every CLI-only number is checked here, as it is parsed (config options: fastdiff.config_checks)

class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help says it already (a None default must: "the
    preset's", "the run's", never "None"); line breaks inside a help are kept (the --preset lists)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text or "required" in text or not action.option_strings
                or default is None or default is False or default is argparse.SUPPRESS):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"

    def _split_lines(self, text, width):
        split = super()._split_lines  # (zero-argument super() does not work inside a comprehension)
        return [line for part in text.splitlines() for line in split(part, width)]


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (`fastdiff sample: error: ...`), exit status 2, like every other error."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind, lo=None, hi=None, *, lo_open=False, allowed: str = ""):
    """An argparse `type=`: a finite int or float in [lo, hi] ((lo, hi] with lo_open), else one message."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        ok = (math.isfinite(value) and (lo is None or (value > lo if lo_open else value >= lo))
              and (hi is None or value <= hi))
        if not ok:
            raise argparse.ArgumentTypeError(f"{text} is outside the allowed range {allowed}")
        return value
    return parse


COUNT = _number(int, 1, 2**31 - 1, allowed="1 and up")  # --n, --steps, --batch-size, ...
SEED = _number(int, 0, 2**62, allowed="0 to 2^62")
GUIDANCE = _number(float, 0, allowed="0 and up, finite (1 = no guidance, 0 = the unconditional model)")
ETA = _number(float, 0, 1, allowed="[0, 1]")
POSITIVE = _number(float, 0, lo_open=True, allowed="above 0, finite")
NON_NEGATIVE_INT = _number(int, 0, 2**31 - 1, allowed="0 and up")


def _preset_list(lead: str, descriptions: dict[str, str]) -> str:
    """A --preset help: `lead`, then one line per preset (fastdiff.config keeps the lines beside the presets)."""
    return lead + ":\n" + "\n".join(f"{name}: {text}" for name, text in descriptions.items())


def _add_config_file_flag(p, what: str):
    p.add_argument("--config", metavar="FILE", help=f"JSON or TOML file of config sections, e.g. {{\"train\": "
                   f"{{\"lr\": 0.001}}}} or [train] lr = 0.001; {what}; applied over the preset, under the flags "
                   "(default: none)")


def _add_train(sub):
    from fastdiff.config import PRESET_HELP

    p = sub.add_parser("train", help="train a DDPM UNet", description="Train a DDPM UNet on a dataset. Options "
                       "come from the preset, then --config FILE, then the flags; --dry-run prints the result.")
    p.add_argument("--preset", help=_preset_list("named configuration (default: the dataset's preset, else digits; "
                                                 "the run's own with --resume)", PRESET_HELP))
    _add_config_file_flag(p, "its keys: preset and the sections model, diffusion, data, train, sample (the ones "
                          "--dry-run prints)")
    p.add_argument("--dataset", help="digits | mnist5k | mnist | fashion-mnist | cifar10 | fer2013 | folder | "
                   "synthetic (default: the preset's)")
    p.add_argument("--data-dir", help="folder with the dataset files (default: $FASTDIFF_DATA_DIR or ./data)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, logs, config) (required)")
    p.add_argument("--steps", type=int, help="total optimizer steps (default: the preset's)")
    p.add_argument("--batch-size", type=int, help="images per optimizer step, over all processes (default: the "
                   "preset's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the preset's)")
    p.add_argument("--warmup", type=int, dest="warmup_steps", help="learning-rate warm-up steps (default: the "
                   "preset's)")
    _add_loop_flags(p, unit="steps", ema="the EMA weights that sample and eval use",
                    seed="the initial weights, batches and noise")
    p.add_argument("--image-size", type=int, help="model input size; images are resized to it (default: the "
                   "preset's)")
    p.add_argument("--channels", type=int, help="image channels of the model, 1 or 3 (default: the preset's)")
    p.add_argument("--num-classes", type=int, help="classes of a conditional model, 0 for unconditional (default: "
                   "the preset's)")
    p.add_argument("--prediction", choices=["eps", "v", "x0"], help="what the model predicts: the noise eps, the "
                   "velocity v or x0 (default: the preset's)")
    p.add_argument("--schedule", choices=["linear", "cosine"], help="beta schedule (default: the preset's)")
    p.add_argument("--zero-terminal-snr", action="store_true", default=None,
                   help="rescale the betas to zero SNR at the last timestep (default: the preset's, off)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC activations (default: on a GPU; on the CPU as `fastdiff env` shows)")
    _add_monitor_flags(p)
    _add_accel_flags(p)
    _add_resume_flags(p, "fastdiff train")


def _add_loop_flags(p, *, unit: str, ema: str, seed: str):
    """The training skeleton's options, which train and distill share: --amp, --ema-decay, --seed, --ckpt-every,
    --log-every."""
    p.add_argument("--amp", choices=["auto", "fp32", "bf16", "fp16"], help="autocast dtype of training; auto: "
                   "bf16 on a CPU with bf16 instructions (AMX or AVX-512 BF16), else fp32 (`fastdiff env` shows the "
                   "choice) (default: the preset's, auto)")
    p.add_argument("--ema-decay", type=float, help=f"decay of {ema} (default: the preset's)")
    p.add_argument("--seed", type=int, help=f"seed of {seed} (default: the preset's, 0)")
    p.add_argument("--ckpt-every", type=int, help=f"checkpoint every N {unit} (default: the preset's)")
    p.add_argument("--log-every", type=int, help=f"log line and stats.jsonl record every N {unit} (default: the "
                   "preset's)")


def _add_monitor_flags(p):
    p.add_argument("--sample-every", type=int, help="EMA sample grid every N steps into RUN/samples/step-N.png "
                   "(default: at each checkpoint; 0: none)")
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                   help="also write scalars and sample grids as TensorBoard events under RUN/tb (default: off)")


def _add_resume_flags(p, command):
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint; --steps may grow, and --lr / --warmup "
                   "may change: the optimizer state is kept and the new learning-rate schedule applies from the "
                   f"resumed step (e.g. after the NaN guard stopped a run: {command} --out RUN --resume --lr 1e-4 "
                   "--warmup 1000)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr (log lines go to stderr "
                   "plainly)")


def _add_accel_flags(p):
    g = p.add_argument_group("acceleration (defaults: on with a CUDA device, off on the CPU)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on with a CUDA device)")
    g.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="capture each step as a CUDA graph, one replay per step (default: on with a CUDA device)")
    g.add_argument("--compile-mode", help="torch.compile mode (default: Inductor's default)")
    return g


def accel_options(args, device, **extra):
    """AccelOptions for the device's defaults, overridden by the flags the user passed."""
    from fastdiff.runtime import AccelOptions

    return AccelOptions.for_device(device, compile=args.compile, cuda_graphs=args.cuda_graphs,
                                   compile_mode=args.compile_mode, **extra).check(device)


TRAIN_FLAGS = {  # CLI dest -> config key
    "dataset": "data.dataset", "data_dir": "data.data_dir", "steps": "train.steps", "batch_size": "train.batch_size",
    "lr": "train.lr", "warmup_steps": "train.warmup_steps", "amp": "train.amp", "ema_decay": "train.ema_decay",
    "seed": "train.seed", "ckpt_every": "train.ckpt_every", "log_every": "train.log_every",
    "image_size": "model.image_size", "channels": "model.in_channels", "num_classes": "model.num_classes",
    "prediction": "diffusion.prediction", "schedule": "diffusion.schedule",
    "zero_terminal_snr": "diffusion.zero_terminal_snr", "channels_last": "train.channels_last",
    "sample_every": "train.sample_every", "tensorboard": "train.tensorboard",
}
# Flags that may change when a run is resumed; the rest would make the checkpoint and the config disagree.
# lr and warmup_steps: the new schedule applies from the resumed step, the optimizer state is kept (train/loop.py).
LOOP_RESUMABLE = {"steps", "ckpt_every", "log_every", "lr", "warmup_steps", "sample_every", "tensorboard"}
RESUMABLE = LOOP_RESUMABLE | {"data_dir", "channels_last"}


def _flags(names) -> str:
    return ", ".join("--" + k.replace("_", "-") for k in sorted(names))


def _resumed_config(args, given: dict, resumable: set, not_on_resume: dict, parse=None):
    """The run's saved config when `--resume` finds one in --out (None otherwise), after checking that no flag
    in `not_on_resume` is given and that `given` changes only `resumable` flags (any other change would make the
    checkpoint and the config disagree). `parse` reads the saved dict (default: config.load_config's checks)."""
    from fastdiff.checkpoint import read_json
    from fastdiff.config import load_config

    saved = Path(args.out) / "config.json"
    if not (args.resume and saved.exists()):
        return None
    extra = [k for k, v in not_on_resume.items() if v]
    if extra:
        raise ConfigError(f"--resume continues the run with its own config; drop {_flags(extra)}")
    changed = set(given) - resumable
    if changed:
        raise ConfigError(f"{_flags(changed)} cannot change on --resume (only {_flags(resumable)} can)")
    return load_config(saved) if parse is None else parse(read_json(saved, error=ConfigError))


def _config_file(args, **keys):
    """The --config layer (fastdiff.config_file; empty without --config)."""
    from fastdiff.config_file import ConfigFile, read_config_file

    return read_config_file(args.config, **keys) if args.config else ConfigFile()


def resolve_train_config(args):
    """The preset, then the --config file, then the flags (or the resumed run's config, then the flags)."""
    from fastdiff.config import apply_overrides, train_config

    given = {k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k) is not None}
    cfg = _resumed_config(args, given, RESUMABLE, {"preset": args.preset, "config": args.config})
    file = _config_file(args, sections=("model", "diffusion", "data", "train", "sample"))
    overrides = {**file.overrides, **{TRAIN_FLAGS[k]: v for k, v in given.items()}}
    if cfg is None:
        return train_config(args.preset or file.names.get("preset"), overrides)
    return apply_overrides(cfg, overrides)


def cmd_train(args) -> int:
    cfg = resolve_train_config(args)
    if args.dry_run:
        print(cfg.to_json())
        return 0
    from fastdiff.runtime import resolve_device
    from fastdiff.train import train_ddpm

    device = resolve_device(args.device)
    record = train_ddpm(cfg, args.out, device=device, resume=args.resume, progress=not args.no_progress,
                        echo=_stderr, accel=accel_options(args, device))
    print(json.dumps({"run_dir": str(args.out), **record}))
    return 0


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def _add_distill(sub):
    from fastdiff.config import DISTILL_PRESET_HELP, REGRESS_AT

    p = sub.add_parser("distill", help="distil a teacher run into a 1-4 step student (ADD)",
                       description="Adversarial Diffusion Distillation of a DDPM teacher run into a few-step student. "
                       "Options come from the distillation preset, then --config FILE, then the flags; the student's "
                       "model, diffusion and data are the teacher's.")
    p.add_argument("--teacher", help="the teacher's run directory or checkpoint folder (required unless --config "
                   "names it or with --resume)")
    p.add_argument("--out", required=True, help="the student's run directory (required)")
    p.add_argument("--preset", help=_preset_list("distillation preset (default: the teacher's preset name if one "
                                                 "exists, else default)", DISTILL_PRESET_HELP))
    _add_config_file_flag(p, "its keys: preset, teacher and the sections train, distill, sample")
    p.add_argument("--steps", type=int, help="total student updates (default: the preset's)")
    p.add_argument("--batch-size", type=int, help="student batch (default: the preset's)")
    p.add_argument("--lr", type=float, help="student learning rate (default: the preset's)")
    p.add_argument("--warmup", type=int, dest="warmup_steps", help="learning-rate warm-up steps (default: the "
                   "preset's)")
    _add_loop_flags(p, unit="updates", ema="the student's EMA weights", seed="the batches, timesteps and noise")
    p.add_argument("--student-timesteps", type=int, nargs="+", help="the student's timesteps, noisiest first "
                   "(default: the preset's, 999 749 499 249)")
    p.add_argument("--adv-weight", type=float, help="weight of the hinge adversarial loss (default: the preset's, 1)")
    p.add_argument("--distill-weight", type=float, help="lambda of the distillation loss (default: the preset's, "
                   "2.5)")
    p.add_argument("--distill-weighting", choices=["sqrt_ab", "ab", "snr", "none"], help="c(t) of the distillation "
                   "loss (default: the preset's, sqrt_ab)")
    p.add_argument("--teacher-t-min", type=int, help="lowest timestep of the teacher's target (default: the "
                   "preset's, 0)")
    p.add_argument("--teacher-t-max", type=int, help="highest timestep of the teacher's target (default: the "
                   "preset's, 999)")
    p.add_argument("--teacher-guidance", type=float, help="classifier-free guidance of the teacher's target "
                   "(default: the teacher's sampling guidance)")
    p.add_argument("--regress-weight", type=float, help="weight of the regression loss on cached teacher DDIM "
                   "samples of pure noise, which keeps a 1-step student's variety; 0 for off (default: the preset's)")
    p.add_argument("--regress-pairs", type=int, help="how many teacher samples the regression loss draws from "
                   "(default: the preset's, 2048)")
    p.add_argument("--regress-steps", type=int, help="DDIM steps of those teacher samples (default: the preset's, "
                   "20)")
    p.add_argument("--regress-at", choices=REGRESS_AT, help="first: regress the pure noise at the first "
                   "student timestep only; all: also the teacher's DDIM state at each later student timestep, for "
                   "multi-step sampling (default: the preset's)")
    p.add_argument("--r1-gamma", type=float, help="R1 penalty weight of the discriminator (default: the preset's)")
    p.add_argument("--disc-lr", type=float, help="discriminator learning rate (default: the preset's)")
    p.add_argument("--disc-steps", type=int, help="discriminator updates per student update (default: the "
                   "preset's, 1)")
    p.add_argument("--augment", help="DiffAugment ops, comma-separated: translation,cutout,brightness,contrast "
                   "('' for none) (default: the preset's, translation,cutout)")
    p.add_argument("--backbone", help="pretrain (a ViT trained on the dataset and cached), none (random, trained), "
                   "or a local timm/DINO ViT state dict (default: the preset's, pretrain)")
    p.add_argument("--train-backbone", action="store_true", default=None, help="adapt the backbone too (default: "
                   "the preset's)")
    p.add_argument("--backbone-steps", type=int, help="pretraining steps of a 'pretrain' backbone (default: the "
                   "preset's, 600)")
    p.add_argument("--backbone-size", type=int, help="input size of a file backbone (default: its own)")
    p.add_argument("--disc-heads", type=int, help="heads on this many evenly spaced backbone blocks (default: the "
                   "preset's, 2)")
    p.add_argument("--disc-head", choices=["conv", "mlp"], help="discriminator head (default: the preset's, conv)")
    p.add_argument("--disc-mbstd", type=int, help="minibatch-std channel in the heads: its group size, 0 for off "
                   "(default: the preset's, 4)")
    p.add_argument("--no-spectral-norm", action="store_false", dest="spectral_norm", default=None,
                   help="heads without spectral norm (default: the preset's, with)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    _add_monitor_flags(p)
    _add_accel_flags(p)
    _add_resume_flags(p, "fastdiff distill")


DISTILL_FLAGS = {  # CLI dest -> config key
    "steps": "train.steps", "batch_size": "train.batch_size", "lr": "train.lr", "warmup_steps": "train.warmup_steps",
    "amp": "train.amp", "ema_decay": "train.ema_decay", "seed": "train.seed", "ckpt_every": "train.ckpt_every",
    "log_every": "train.log_every", "sample_every": "train.sample_every", "tensorboard": "train.tensorboard",
    **{k: "distill." + k for k in (
        "student_timesteps", "adv_weight", "distill_weight", "distill_weighting", "teacher_t_min", "teacher_t_max",
        "teacher_guidance", "regress_weight", "regress_pairs", "regress_steps", "regress_at", "r1_gamma", "disc_lr",
        "disc_steps", "augment", "backbone", "train_backbone",
        "backbone_steps", "backbone_size", "disc_heads", "disc_head", "disc_mbstd", "spectral_norm")},
}
DISTILL_RESUMABLE = set(LOOP_RESUMABLE)


def resolve_distill_config(args):
    from fastdiff import checkpoint as ckpt
    from fastdiff.config import apply_overrides, distill_config, load_config

    given = {k: getattr(args, k) for k in DISTILL_FLAGS if getattr(args, k) is not None}
    cfg = _resumed_config(args, given, DISTILL_RESUMABLE,
                          {"preset": args.preset, "teacher": args.teacher, "config": args.config})
    # distill.teacher is the --teacher path; the student's model, diffusion and data are the teacher's
    file = _config_file(args, sections=("train", "distill", "sample"), names=("preset", "teacher"),
                        excluded=("distill.teacher",))
    if cfg is None:
        teacher = args.teacher or file.names.get("teacher")
        if not teacher:
            raise ConfigError("fastdiff distill needs --teacher RUN_DIR (a run trained with fastdiff train)")
        path = ckpt.resolve_checkpoint(teacher)
        cfg = distill_config(load_config(path / "config.json"), teacher, args.preset or file.names.get("preset"))
    overrides = {**file.overrides, **{DISTILL_FLAGS[k]: v for k, v in given.items()}}
    timesteps = overrides.get("distill.student_timesteps")
    if (isinstance(timesteps, (list, tuple)) and timesteps and cfg.sample.sampler == "student"
            and "sample.steps" not in overrides):
        overrides["sample.steps"] = min(cfg.sample.steps, len(timesteps))  # a student samples with at most these
    return apply_overrides(cfg, overrides)


def cmd_distill(args) -> int:
    cfg = resolve_distill_config(args)
    if args.dry_run:
        print(cfg.to_json())
        return 0
    from fastdiff.runtime import resolve_device
    from fastdiff.train import train_add

    device = resolve_device(args.device)
    record = train_add(cfg, args.out, device=device, resume=args.resume, progress=not args.no_progress,
                       echo=_stderr, accel=accel_options(args, device))
    print(json.dumps({"run_dir": str(args.out), **record}))
    return 0


def _clip(value: str) -> float:
    """--clip C (x0 clamped to [-C, C]); none, off or inf for no clipping."""
    if value.lower() in ("none", "off", "inf"):
        return float("inf")
    try:
        clip = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or none, got {value!r}") from None
    if not clip > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be above 0 (or none), got {value!r}")
    return clip


def add_sampling_args(p):
    """The sampling flags of `fastdiff sample`, `fastdiff eval` and `python -m fastdiff.distill_table`, with one
    meaning everywhere (resolved by `fastdiff.sampling.resolve_settings`; None: the run's own setting)."""
    g = p.add_argument_group("sampling (defaults: the run's own sample settings)")
    g.add_argument("--sampler", choices=["ddim", "ddpm", "student"],
                   help="default: the run's (ddim; student for a distilled student run)")
    g.add_argument("--steps", type=COUNT, help="denoising steps (default: the run's for its own sampler; else "
                   "ddim 50, ddpm all T, and on a student all its timesteps)")
    g.add_argument("--eta", type=ETA, help="DDIM eta, 0 = deterministic; ddim only (default: the run's, 0)")
    g.add_argument("--guidance", type=GUIDANCE, help="classifier-free guidance scale, 1 = none (default: the run's)")
    g.add_argument("--spacing", choices=["leading", "trailing", "linspace"], help="timestep spacing (default: the "
                   "run's, trailing)")
    g.add_argument("--clip", type=_clip, help="clamp x0 to [-CLIP, CLIP], none: no clipping (default: the run's, 1)")
    g.add_argument("--batch-size", type=COUNT, help="images per batch (default: 256 on a GPU, 64 on the CPU, "
                   "measured fastest there; samples do not depend on it beyond rounding)")
    g = _add_accel_flags(p)
    g.add_argument("--amp", choices=["fp32", "bf16", "fp16"], help="autocast for the model (default: bf16 on a GPU "
                   "and on a CPU with AMX or AVX-512 BF16, else fp32; `fastdiff env` shows the CPU's choice)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC activations (default: on a GPU; on the CPU as `fastdiff env` shows)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (denoising steps, with ETA) on stderr")


def sampling_overrides(args) -> dict:
    """The keyword overrides of `fastdiff.sampling.resolve_settings` from the flags of `add_sampling_args`."""
    keys = ("sampler", "steps", "eta", "guidance", "spacing", "clip", "batch_size", "amp", "channels_last",
            "compile", "cuda_graphs", "compile_mode")
    return {k: getattr(args, k) for k in keys}


def _add_run_flags(p, n_default):
    p.add_argument("--checkpoint", required=True, help="run directory (its latest checkpoint), a checkpoint folder "
                   "or pretrained:NAME (required)")
    p.add_argument("--n", type=COUNT, default=n_default, help="number of samples")
    p.add_argument("--seed", type=SEED, default=0, help="sample i uses seed + i")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--refine", metavar="RUN_DIR", help="apply a refiner trained with `fastdiff train-refiner` "
                   "(default: none)")


def cmd_sample(args) -> int:
    from fastdiff.images import save_grid, save_images, save_samples, save_trajectory, writable
    from fastdiff.runtime import resolve_device
    from fastdiff.sampling import TrajectoryRecorder, load_run, resolve_settings, sample

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out must be a .png file, got {out}")
    writable(out)  # before the sampling, not after it
    device = resolve_device(args.device)
    run = load_run(args.checkpoint, device, use_ema=not args.no_ema)
    settings = resolve_settings(run, device, refiner=args.refine, **sampling_overrides(args))
    recorder = TrajectoryRecorder(settings.steps, rows=min(args.n, args.trajectory_rows)) if args.trajectory else None
    res = sample(run, settings, n=args.n, seed=args.seed, labels=args.labels, callback=recorder,
                 progress=not args.no_progress)
    classes = run.num_classes
    nrow = classes if res.labels is not None and args.labels is None and args.n % classes == 0 else None
    grid = save_grid(res.images, out, nrow=nrow)
    raw = save_samples(out.with_suffix(".npz"), res.images, res.labels, res.seeds)
    result = {"grid": str(grid), "samples": str(raw), "n": args.n, "sampler": settings.sampler,
              "steps": settings.steps, "guidance": settings.guidance if res.labels is not None else None,
              "seconds": round(res.seconds + res.setup_s, 3), "images_per_sec": res.images_per_sec,
              "setup_seconds": round(res.setup_s, 3), "accel": settings.accel.describe(), "checkpoint": run.path,
              "refiner": args.refine}
    if args.save_images:
        save_images(res.images, res.seeds, res.labels, args.save_images)
        result["images"] = str(args.save_images)
    if recorder is not None:
        traj = out.with_name(out.stem + "_trajectory.png")
        save_trajectory(recorder.frames, traj, title=f"{settings.sampler}, {settings.steps} steps")
        result["trajectory"] = str(traj)
    print(json.dumps(result))
    return 0


def cmd_eval(args) -> int:
    from fastdiff.evaluate import evaluate_run

    result = evaluate_run(args.checkpoint, n=args.n, seed=args.seed, device=args.device,
                          classifier_steps=args.classifier_steps, log=lambda s: print(s, file=sys.stderr),
                          refiner=args.refine, progress=not args.no_progress, **sampling_overrides(args))
    floor = result["fd_cls_floor"]
    print(f"FD_cls {result['fd_cls']:.3f} (real-vs-real floor {floor:.3f}, ratio {result['fd_ratio']:.2f})")
    print(f"KID {result['kid']:.5f} +- {result['kid_std']:.5f} "
          f"(real-vs-real {result['kid_floor']:.5f} +- {result['kid_floor_std']:.5f})")
    print(f"precision {result['precision']:.3f}, recall {result['recall']:.3f} "
          f"(real-vs-real {result['precision_floor']:.3f}, {result['recall_floor']:.3f})")
    if "cond_accuracy" in result:
        print(f"class-conditional accuracy {100 * result['cond_accuracy']:.1f}% "
              f"(classifier on held-out real images: {100 * result['classifier_test_accuracy']:.1f}%)")
    print(json.dumps(result))
    return 0


def cmd_env(args) -> int:
    from fastdiff.envinfo import collect

    info = collect()
    for key, value in info.items():
        print(f"{key:>18}: {value}")
    print(json.dumps(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastdiff", description="Fast diffusion training and sampling.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    p = sub.add_parser("sample", help="draw samples from a trained run into a PNG grid (+ .npz)",
                       description="Draw --n samples from a run with its own sampling settings (or the flags') into "
                       "a PNG grid, the raw samples beside it as .npz; sample i depends only on its seed and label. "
                       "Prints a JSON summary as the last line.")
    _add_run_flags(p, 100)
    p.add_argument("--labels", type=int, nargs="+", help="class labels, repeated to fill --n (default: balanced "
                   "classes on a conditional model)")
    p.add_argument("--out", required=True, help="output PNG; raw samples go beside it as .npz (required)")
    p.add_argument("--trajectory", action="store_true", help="also write <out>_trajectory.png")
    p.add_argument("--trajectory-rows", type=COUNT, default=4, help="samples shown in the trajectory figure")
    p.add_argument("--save-images", metavar="DIR", help="also write one PNG per sample into DIR, named by its seed "
                   "and label: seed000123-label7.png (seed000123.png unconditional) (default: off)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    add_sampling_args(p)
    p = sub.add_parser("eval", help="FD_cls, its real-vs-real floor, and class-conditional accuracy",
                       description="Sample --n images from a run and score them against held-out real images with "
                       "a classifier trained on the dataset (cached): FD_cls, KID, precision and recall, each beside "
                       "its real-vs-real value, and class-conditional accuracy. JSON on the last line.")
    _add_run_flags(p, 1000)
    p.add_argument("--classifier-steps", type=COUNT, default=1500,
                   help="training steps of the evaluation classifier when it is not cached yet")
    add_sampling_args(p)
    sub.add_parser("env", help="versions, device, and which kernels are usable",
                   description="Print the Python, torch and triton versions, the device, and which kernels (Triton, "
                   "the native extension) are usable here; JSON on the last line.")
    _add_distill(sub)
    _add_train_refiner(sub)
    _add_bench(sub)
    _add_export(sub)
    _add_plot(sub)
    return parser


def _add_train_refiner(sub):
    p = sub.add_parser("train-refiner", help="train a refiner for a run's samples (fastdiff sample --refine)",
                       description="Train a small UNet that maps a run's samples to cleaner ones: for a DDPM run on "
                                   "its x0 estimates of noised real images, for an ADD student on its own samples "
                                   "and its teacher's of the same noises.")
    p.add_argument("--checkpoint", help="the run (teacher or student) whose x0 estimates it refines (required "
                   "unless --resume)")
    p.add_argument("--out", required=True, help="the refiner's run directory (required)")
    p.add_argument("--steps", type=COUNT, help="total optimizer steps (default: 1500)")
    p.add_argument("--batch-size", type=COUNT, help="pairs per optimizer step (default: 128)")
    p.add_argument("--lr", type=POSITIVE, help="peak learning rate of the one-cycle schedule (default: 1e-3)")
    p.add_argument("--inputs", choices=["noised", "samples"], help="the pairs: noised (the run's x0 estimates of "
                   "real images noised to t in [0, t-max] -> the images) or samples (an ADD student's 1-step samples "
                   "-> its teacher's DDIM samples of the same noises) (default: samples for a student, else "
                   "noised)")
    p.add_argument("--t-max", type=NON_NEGATIVE_INT,
                   help="noised pairs come from x0 estimates at t in [0, t-max] (default: T/2)")
    p.add_argument("--pairs", type=COUNT, help="samples pairs, sampled once and cached in --out (default: 2048)")
    p.add_argument("--base-channels", type=COUNT, help="width of the refiner's UNet (default: 16)")
    p.add_argument("--seed", type=SEED, help="seed of the weights, pairs and noise (default: 0)")
    p.add_argument("--amp", choices=["auto", "fp32", "bf16", "fp16"], help="autocast of the refiner; auto: bf16 on a "
                   "CPU with AMX or AVX-512 BF16, else fp32 (default: auto)")
    p.add_argument("--ckpt-every", type=COUNT, help="checkpoint every N steps (default: 500)")
    p.add_argument("--log-every", type=COUNT, help="log line every N steps (default: 250)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    _add_accel_flags(p)
    _add_resume_flags(p, "fastdiff train-refiner")


REFINER_FLAGS = {  # CLI dest -> (section, option) of RefinerConfig
    "steps": "train.steps", "batch_size": "train.batch_size", "lr": "train.lr", "seed": "train.seed",
    "amp": "train.amp", "ckpt_every": "train.ckpt_every", "log_every": "train.log_every", "t_max": "refiner.t_max",
    "base_channels": "refiner.base_channels", "inputs": "refiner.inputs", "pairs": "refiner.pairs",
}
REFINER_RESUMABLE = {"steps", "ckpt_every", "log_every", "lr"}


def resolve_refiner_config(args):
    from fastdiff.train.refiner import RefinerConfig

    given = {k: getattr(args, k) for k in REFINER_FLAGS if getattr(args, k) is not None}
    cfg = _resumed_config(args, given, REFINER_RESUMABLE, {"checkpoint": args.checkpoint},
                          parse=RefinerConfig.from_dict)
    if cfg is None:
        if not args.checkpoint:
            raise ConfigError("fastdiff train-refiner needs --checkpoint RUN_DIR (the run whose samples it refines)")
        cfg = RefinerConfig(generator=args.checkpoint)
    d = cfg.to_dict()
    for dest, value in given.items():
        section, option = REFINER_FLAGS[dest].split(".")
        d[section][option] = value
    return RefinerConfig.from_dict(d)


def cmd_train_refiner(args) -> int:
    cfg = resolve_refiner_config(args)
    if args.dry_run:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from fastdiff.runtime import resolve_device
    from fastdiff.train import train_refiner

    device = resolve_device(args.device)
    record = train_refiner(cfg, args.out, device=device, resume=args.resume, progress=not args.no_progress,
                           echo=_stderr, accel=accel_options(args, device))
    print(json.dumps({"run_dir": str(args.out), **record}))
    return 0


def cmd_bench(args) -> int:
    from fastdiff.bench.suite import run_bench
    from fastdiff.runtime import resolve_device

    doc = run_bench(device=resolve_device(args.device), out=Path(args.out), quick=args.quick, sections=args.sections,
                    presets=args.presets, providers=args.providers, budget_s=args.budget_s, rounds=args.rounds,
                    progress=not args.no_progress)
    errors = [r for r in doc["rows"] if str(r.get("status", "")).startswith("error")]
    for r in errors:
        print(f"fastdiff bench: {r.get('case') or r.get('op')} {r.get('provider', '')}: {r['status']}", file=sys.stderr)
    return 1 if errors else 0


def _add_bench(sub):
    from fastdiff.bench.providers import PROVIDERS
    from fastdiff.bench.suite import GPU_PRESETS, PRESETS, SECTIONS

    p = sub.add_parser("bench", help="op, sampling and training benchmarks against the plain PyTorch reference",
                       description="Benchmark the op kernels and end-to-end sampling and training per provider; "
                       "print a table and write bench.json and bench.md.")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CI: under a minute on a CPU)")
    p.add_argument("--out", default="runs/bench", help="folder for bench.json and bench.md (default: runs/bench)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS, help="benchmark sections to run")
    p.add_argument("--presets", nargs="+", help=f"keep the rows of these presets (default: all; the CPU runs "
                   f"{' '.join(PRESETS)}, a GPU {' '.join(GPU_PRESETS)})")
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, help="default: all (diffusers when installed)")
    p.add_argument("--budget-s", type=POSITIVE, help="time budget; later jobs are skipped (default 40 quick, 420 full)")
    p.add_argument("--rounds", type=COUNT, help="interleaved timing rounds per row (default 2 quick, 5 full)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (benchmark jobs, with ETA) on stderr")


def _add_export(sub):
    p = sub.add_parser("export", help="write a run as a diffusers pipeline folder (DDPMPipeline.from_pretrained)",
                       description="Write a run's UNet and schedule as a diffusers folder: model_index.json, "
                                   "unet/ (UNet2DModel) and scheduler/ (DDPMScheduler).")
    p.add_argument("--checkpoint", required=True, help="run directory (its latest checkpoint) or a checkpoint folder "
                   "(required)")
    p.add_argument("--out", required=True, help="the new folder, which must not exist or be empty (required)")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA weights")


def cmd_export(args) -> int:
    from fastdiff.interop import export_run

    out = export_run(args.checkpoint, args.out, use_ema=not args.no_ema)
    print(json.dumps({"out": str(out), "checkpoint": args.checkpoint, "ema": not args.no_ema}))
    return 0


def _add_plot(sub):
    from fastdiff.plot import DEFAULT_KEYS

    p = sub.add_parser("plot", help="draw the training stats of one or more runs on one figure",
                       description="Draw the stats.jsonl of one or more runs on one PNG: one subplot per stat "
                       "against images seen (kimg), one line per run, the legend naming each run directory.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories written by fastdiff train or distill")
    p.add_argument("--out", required=True, help="output .png file (required)")
    p.add_argument("--keys", default=",".join(DEFAULT_KEYS),
                   help="comma-separated stats.jsonl fields, one subplot each, e.g. grad_norm, sec_per_kimg, "
                   "peak_mem_mb, or an ADD run's g_adv, distill, d_loss (default: %(default)s)")


def cmd_plot(args) -> int:
    from fastdiff.plot import plot_stats

    keys = [k.strip() for k in args.keys.split(",") if k.strip()]
    path = plot_stats(args.runs, args.out, keys)
    print(json.dumps({"plot": str(path), "runs": [str(r) for r in args.runs], "keys": keys}))
    return 0


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "env": cmd_env, "distill": cmd_distill,
            "train-refiner": cmd_train_refiner, "bench": cmd_bench, "export": cmd_export, "plot": cmd_plot}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except FastdiffError as e:
        print(f"fastdiff {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastdiff {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
