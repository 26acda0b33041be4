"""`fastdiff train`, `distill` and `train-refiner`: each one's parser, its flags' config keys, the config it
resolves (preset, then --config, then the flags; or the resumed run's, then the flags that may change) and its
command."""

from __future__ import annotations

import argparse
import json

from fastdiff.cli.args import (
    COUNT,
    NON_NEGATIVE_INT,
    PATH,
    POSITIVE,
    SEED,
    absolute_data_dir,
    accel_options,
    add_accel_flags,
    add_config_file_flag,
    add_loop_flags,
    add_monitor_flags,
    add_resume_flags,
    config_file_layer,
    echo_stderr,
    preset_list,
    resumed_config,
    show_progress,
)
from fastdiff.errors import ConfigError


def _run(args, cfg, trainer: str, dry_run: str | None) -> int:
    """What train, distill and train-refiner do with their resolved config: print `dry_run` (the config, with
    --dry-run), or train it with `fastdiff.train.<trainer>` on --device and print the run's record as JSON (the
    training stack is imported only then)."""
    from fastdiff.train.distributed import check_batch_split, is_main_process

    if dry_run is not None:
        check_batch_split(cfg.train.batch_size)  # under torchrun: what the run checks first
        if args.resume:  # the step the resume would start from (reading only: the run sets corrupt ones aside)
            from fastdiff import checkpoint as ckpt
            from fastdiff.train.rundir import no_checkpoint, resumed_step

            good = ckpt.latest_good_checkpoint(args.out)
            if good is None:
                raise no_checkpoint(args.out)
            resumed_step(good, cfg.train.steps, args.out)
        if is_main_process():  # one config under torchrun, not one per process
            print(dry_run)
        return 0
    from fastdiff import train
    from fastdiff.runtime import resolve_device

    device = resolve_device(args.device)
    record = getattr(train, trainer)(cfg, args.out, device=device, resume=args.resume, progress=show_progress(args),
                                     echo=echo_stderr, accel=accel_options(args, device))
    if is_main_process():  # under torchrun the first process reports the run (the others' records are partial)
        print(json.dumps({"run_dir": str(args.out), **record}))
    return 0


def add_train(sub):
    from fastdiff.config import PRESET_HELP

    p = sub.add_parser("train", help="train a DDPM UNet", description="Train a DDPM UNet on a dataset. Options "
                       "come from the preset, then --config FILE, then the flags; --dry-run prints the result.")
    p.add_argument("--preset", help=preset_list("named configuration (default: the dataset's preset, else digits; "
                                                 "the run's own with --resume)", PRESET_HELP))
    add_config_file_flag(p, "its keys: preset and the sections model, diffusion, data, train, sample (the ones "
                          "--dry-run prints)")
    p.add_argument("--dataset", help="digits | mnist5k | mnist | fashion-mnist | cifar10 | fer2013 | folder | "
                   "synthetic (default: the preset's)")
    p.add_argument("--data-dir", type=PATH,
                   help="folder with the dataset files (default: $FASTDIFF_DATA_DIR or ./data)")
    p.add_argument("--out", type=PATH, required=True, help="run directory (checkpoints, logs, config) (required)")
    p.add_argument("--steps", type=int, help="total optimizer steps (default: the preset's)")
    p.add_argument("--batch-size", type=int, help="images per optimizer step, over all processes (default: the "
                   "preset's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the preset's)")
    p.add_argument("--warmup", type=int, dest="warmup_steps", help="learning-rate warm-up steps (default: the "
                   "preset's)")
    add_loop_flags(p, unit="steps", ema="the EMA weights that sample and eval use",
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
    add_monitor_flags(p)
    add_accel_flags(p)
    add_resume_flags(p, "fastdiff train")


TRAIN_FLAGS = {  # CLI dest -> config key
    "dataset": "data.dataset", "data_dir": "data.data_dir", "steps": "train.steps", "batch_size": "train.batch_size",
    "lr": "train.lr", "warmup_steps": "train.warmup_steps", "amp": "train.amp", "ema_decay": "train.ema_decay",
    "seed": "train.seed", "ckpt_every": "train.ckpt_every", "log_every": "train.log_every",
    "image_size": "model.image_size", "channels": "model.in_channels", "num_classes": "model.num_classes",
    "prediction": "diffusion.prediction", "schedule": "diffusion.schedule",
    "zero_terminal_snr": "diffusion.zero_terminal_snr", "channels_last": "train.channels_last",
    "sample_every": "train.sample_every", "tensorboard": "train.tensorboard",
}


def resolve_train_config(args):
    """The preset, then the --config file, then the flags (or the resumed run's config, then the flags)."""
    from fastdiff.config import apply_overrides, train_config

    given = {k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k) is not None}
    cfg = resumed_config(args, given, TRAIN_FLAGS, {"preset": args.preset, "config": args.config}, "ddpm")
    file = config_file_layer(args, sections=("model", "diffusion", "data", "train", "sample"))
    overrides = absolute_data_dir({**file.overrides, **{TRAIN_FLAGS[k]: v for k, v in given.items()}})
    if cfg is None:
        # an image size chosen for the dataset: the flag's, or the file's unless the file's dataset was replaced by
        # a flag (a dry run's file holds both: its 8x8 was no choice for the --dataset mnist5k of a flag)
        flags, mine = {TRAIN_FLAGS[k] for k in given}, file.overrides
        resized = "model.image_size" in flags or ("model.image_size" in mine
                                                  and not ("data.dataset" in mine and "data.dataset" in flags))
        return train_config(args.preset or file.names.get("preset"), overrides, resized=resized)
    return apply_overrides(cfg, overrides, saved=True)


def cmd_train(args) -> int:
    cfg = resolve_train_config(args)
    return _run(args, cfg, "train_ddpm", cfg.to_json() if args.dry_run else None)


def add_distill(sub):
    from fastdiff.config import DISTILL_PRESET_HELP, REGRESS_AT

    p = sub.add_parser("distill", help="distil a teacher run into a 1-4 step student (ADD)",
                       description="Adversarial Diffusion Distillation of a DDPM teacher run into a few-step student. "
                       "Options come from the distillation preset, then --config FILE, then the flags; the student's "
                       "model, diffusion and data are the teacher's.")
    p.add_argument("--teacher", type=PATH,
                   help="the teacher's run directory or checkpoint folder (required unless --config "
                   "names it or with --resume)")
    p.add_argument("--out", type=PATH, required=True, help="the student's run directory (required)")
    p.add_argument("--preset", help=preset_list("distillation preset (default: the teacher's preset name if one "
                                                 "exists, else default)", DISTILL_PRESET_HELP))
    add_config_file_flag(p, "its keys: preset, teacher and the sections train, distill, sample")
    p.add_argument("--steps", type=int, help="total student updates (default: the preset's)")
    p.add_argument("--batch-size", type=int, help="student batch (default: the preset's)")
    p.add_argument("--lr", type=float, help="student learning rate (default: the preset's)")
    p.add_argument("--warmup", type=int, dest="warmup_steps", help="learning-rate warm-up steps (default: the "
                   "preset's)")
    add_loop_flags(p, unit="updates", ema="the student's EMA weights", seed="the batches, timesteps and noise")
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
    p.add_argument("--backbone", type=PATH,
                   help="pretrain (a ViT trained on the dataset and cached), none (random, trained), "
                   "or a local timm/DINO ViT state dict (default: the preset's, pretrain)")
    p.add_argument("--train-backbone", action=argparse.BooleanOptionalAction, default=None,
                   help="adapt the backbone too, or freeze it (--no-train-backbone) (default: the preset's)")
    p.add_argument("--backbone-steps", type=int, help="pretraining steps of a 'pretrain' backbone (default: the "
                   "preset's, 600)")
    p.add_argument("--backbone-size", type=int, help="input size of a file backbone (default: its own)")
    p.add_argument("--disc-heads", type=int, help="heads on this many evenly spaced backbone blocks (default: the "
                   "preset's, 2)")
    p.add_argument("--disc-head", choices=["conv", "mlp"], help="discriminator head (default: the preset's, conv)")
    p.add_argument("--disc-mbstd", type=int, help="minibatch-std channel in the heads: its group size (a divisor of "
                   "the batch; a class-conditional model's groups are its labels), 0 for off (default: the preset's, "
                   "4)")
    p.add_argument("--no-spectral-norm", action="store_false", dest="spectral_norm", default=None,
                   help="heads without spectral norm (default: the preset's, with)")
    p.add_argument("--data-dir", type=PATH, help="the folder of the teacher's dataset files, where the one its run "
                   "recorded has moved (default: the teacher's)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    add_monitor_flags(p)
    add_accel_flags(p)
    add_resume_flags(p, "fastdiff distill")


DISTILL_FLAGS = {  # CLI dest -> config key
    "steps": "train.steps", "batch_size": "train.batch_size", "lr": "train.lr", "warmup_steps": "train.warmup_steps",
    "amp": "train.amp", "ema_decay": "train.ema_decay", "seed": "train.seed", "ckpt_every": "train.ckpt_every",
    "log_every": "train.log_every", "sample_every": "train.sample_every", "tensorboard": "train.tensorboard",
    "data_dir": "data.data_dir",
    **{k: "distill." + k for k in (
        "student_timesteps", "adv_weight", "distill_weight", "distill_weighting", "teacher_t_min", "teacher_t_max",
        "teacher_guidance", "regress_weight", "regress_pairs", "regress_steps", "regress_at", "r1_gamma", "disc_lr",
        "disc_steps", "augment", "backbone", "train_backbone",
        "backbone_steps", "backbone_size", "disc_heads", "disc_head", "disc_mbstd", "spectral_norm")},
}


def resolve_distill_config(args):
    from fastdiff import checkpoint as ckpt
    from fastdiff.config import apply_overrides, distill_config, load_config

    given = {k: getattr(args, k) for k in DISTILL_FLAGS if getattr(args, k) is not None}
    cfg = resumed_config(args, given, DISTILL_FLAGS,
                          {"preset": args.preset, "teacher": args.teacher, "config": args.config}, "add-student")
    resumed = cfg is not None
    # distill.teacher is the --teacher path; the student's model, diffusion and data are the teacher's
    file = config_file_layer(args, sections=("train", "distill", "sample"), names=("preset", "teacher"),
                        excluded=("distill.teacher", "train.p_uncond"))  # ADD drops no labels
    if cfg is None:
        teacher = args.teacher or file.names.get("teacher")
        if not teacher:
            raise ConfigError("fastdiff distill needs --teacher RUN_DIR (a run trained with fastdiff train)")
        path = ckpt.resolve_checkpoint(teacher)
        cfg = distill_config(load_config(path / "config.json"), teacher, args.preset or file.names.get("preset"))
    overrides = absolute_data_dir({**file.overrides, **{DISTILL_FLAGS[k]: v for k, v in given.items()}})
    timesteps = overrides.get("distill.student_timesteps")
    if (isinstance(timesteps, (list, tuple)) and timesteps and cfg.sample.sampler == "student"
            and "sample.steps" not in overrides):
        overrides["sample.steps"] = min(cfg.sample.steps, len(timesteps))  # a student samples with at most these
    return apply_overrides(cfg, overrides, saved=resumed)


def cmd_distill(args) -> int:
    cfg = resolve_distill_config(args)
    if args.dry_run:  # the checks the run makes against its teacher, and what they resolve
        from fastdiff.train.add import resolve_add

        cfg = resolve_add(cfg, args.out, args.resume)
    return _run(args, cfg, "train_add", cfg.to_json() if args.dry_run else None)


def add_train_refiner(sub):
    p = sub.add_parser("train-refiner", help="train a refiner for a run's samples (fastdiff sample --refine)",
                       description="Train a small UNet that maps a run's samples to cleaner ones: for a DDPM run on "
                                   "its x0 estimates of noised real images, for an ADD student on its own samples "
                                   "and its teacher's of the same noises.")
    p.add_argument("--checkpoint", type=PATH,
                   help="the run (teacher or student) whose x0 estimates it refines (required "
                   "unless --resume)")
    p.add_argument("--out", type=PATH, required=True, help="the refiner's run directory (required)")
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
    p.add_argument("--seed", type=SEED, help="seed of the weights, the batches and the 'noised' pairs' noise "
                   "('samples' pairs have a fixed seed, apart from the student's and eval's; default: 0)")
    p.add_argument("--amp", choices=["auto", "fp32", "bf16", "fp16"], help="autocast of the refiner; auto: bf16 on a "
                   "CPU with AMX or AVX-512 BF16, else fp32 (default: auto)")
    p.add_argument("--ckpt-every", type=COUNT, help="checkpoint every N steps (default: 500)")
    p.add_argument("--log-every", type=COUNT, help="log line every N steps (default: 250)")
    p.add_argument("--data-dir", type=PATH, help="the folder of the run's dataset files, where the one its run "
                   "recorded has moved (default: the run's)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    add_accel_flags(p)
    add_resume_flags(p, "fastdiff train-refiner", warmup=False)  # its learning rate is one cycle over --steps


REFINER_FLAGS = {  # CLI dest -> (section, option) of RefinerConfig
    "steps": "train.steps", "batch_size": "train.batch_size", "lr": "train.lr", "seed": "train.seed",
    "amp": "train.amp", "ckpt_every": "train.ckpt_every", "log_every": "train.log_every", "t_max": "refiner.t_max",
    "base_channels": "refiner.base_channels", "inputs": "refiner.inputs", "pairs": "refiner.pairs",
    "data_dir": "refiner.data_dir",
}


def resolve_refiner_config(args):
    from fastdiff.train.refiner import RefinerConfig

    given = absolute_data_dir({k: getattr(args, k) for k in REFINER_FLAGS if getattr(args, k) is not None},
                              key="data_dir")
    cfg = resumed_config(args, given, REFINER_FLAGS, {"checkpoint": args.checkpoint}, "refiner",
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
    if args.dry_run:  # the checks the run makes against its generator, and what they resolve
        from fastdiff.train.refiner import resolve_refiner

        cfg = resolve_refiner(cfg, args.out, args.resume)[0]
    return _run(args, cfg, "train_refiner", json.dumps(cfg.to_dict(), indent=2) if args.dry_run else None)
