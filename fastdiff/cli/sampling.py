"""`fastdiff sample` and `eval` (with the sampling flags they share with `python -m fastdiff.distill_table`),
and the tools `env`, `bench`, `export` and `plot`: each one's parser and its command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fastdiff.cli.args import (
    COUNT,
    ETA,
    GUIDANCE,
    NON_NEGATIVE_INT,
    PATH,
    POSITIVE,
    SEED,
    add_accel_flags,
    show_progress,
)
from fastdiff.config_checks import no_clip
from fastdiff.errors import ConfigError


def _clip(value: str) -> float:
    """--clip C (x0 clamped to [-C, C]); none, off or inf for no clipping."""
    if no_clip(value):
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
    g = add_accel_flags(p)
    g.add_argument("--amp", choices=["fp32", "bf16", "fp16"], help="autocast for the model (default: bf16 on a GPU "
                   "and on a CPU with AMX or AVX-512 BF16, else fp32; `fastdiff env` shows the CPU's choice)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC activations (default: on a GPU; on the CPU as `fastdiff env` shows)")
    g.add_argument("--max-rows", type=NON_NEGATIVE_INT, help="the most rows one model call runs (guidance "
                   "doubles a batch's rows), 0 for no limit; larger calls run in chunks, with the same samples up "
                   "to rounding (default: on the CPU as `fastdiff env` shows, no limit on a GPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (denoising steps, with ETA) on stderr")


def sampling_overrides(args) -> dict:
    """The keyword overrides of `fastdiff.sampling.resolve_settings` from the flags of `add_sampling_args`."""
    keys = ("sampler", "steps", "eta", "guidance", "spacing", "clip", "batch_size", "amp", "channels_last",
            "compile", "cuda_graphs", "compile_mode", "max_rows")
    return {k: getattr(args, k) for k in keys}


def _add_run_flags(p, n_default):
    p.add_argument("--checkpoint", type=PATH, required=True,
                   help="run directory (its latest checkpoint), a checkpoint folder "
                   "or pretrained:NAME (required)")
    p.add_argument("--n", type=COUNT, default=n_default, help="number of samples")
    p.add_argument("--seed", type=SEED, default=0, help="sample i uses seed + i")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--refine", metavar="RUN_DIR", help="apply a refiner trained with `fastdiff train-refiner` "
                   "(default: none)")


def add_sample(sub):
    p = sub.add_parser("sample", help="draw samples from a trained run into a PNG grid (+ .npz)",
                       description="Draw --n samples from a run with its own sampling settings (or the flags') into "
                       "a PNG grid, the raw samples beside it as .npz; sample i depends only on its seed and label. "
                       "Prints a JSON summary as the last line.")
    _add_run_flags(p, 100)
    p.add_argument("--labels", type=int, nargs="+", help="class labels, repeated to fill --n (default: balanced "
                   "classes on a conditional model)")
    p.add_argument("--out", type=PATH, required=True, help="output PNG; raw samples go beside it as .npz (required)")
    p.add_argument("--trajectory", action="store_true", help="also write <out>_trajectory.png")
    p.add_argument("--trajectory-rows", type=COUNT, default=4, help="samples shown in the trajectory figure")
    p.add_argument("--save-images", type=PATH, metavar="DIR",
                   help="also write one PNG per sample into DIR, named by its seed "
                   "and label: seed000123-label7.png (seed000123.png unconditional); shards of one sampling (other "
                   "--seed, same checkpoint and settings) may share DIR, another sampling is refused (default: off)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    add_sampling_args(p)


def cmd_sample(args) -> int:
    from fastdiff.files import remove_stale_files
    from fastdiff.images import (
        check_images_folder,
        check_writable,
        class_columns,
        is_sample_file,
        save_grid_and_samples,
        save_images,
        save_trajectory,
    )
    from fastdiff.runtime import resolve_device
    from fastdiff.sampling import TrajectoryRecorder, labels_for, load_run, resolve_settings, sample, seeds_for

    out = Path(args.out)
    if out.suffix.lower() != ".png" or out.name.lower() == ".png":
        raise ConfigError(f"--out must be a .png file name, e.g. grid.png, got {out}")
    traj = out.with_name(out.stem + "_trajectory.png")
    # every output checked before the sampling, not after it (creating nothing: a refused run leaves no folders)
    files = ((out, "--out"), (out.with_suffix(".npz"), "the raw samples (beside --out)"),
             *([(traj, "the trajectory figure")] if args.trajectory else []))
    for path, what in files:
        check_writable(path, what=what)
    # a `fastdiff sample` killed while it wrote these files left its temporary files beside them
    remove_stale_files(out.parent, names={path.name for path, _ in files}.__contains__)
    if args.save_images:
        check_writable(args.save_images, folder=True, what="--save-images")
        for path, what in files:
            if Path(args.save_images).resolve() == path.resolve():
                raise ConfigError(f"--save-images {args.save_images} is also {what}'s file; give it a folder of "
                                  "its own")
            if Path(args.save_images).resolve() == path.parent.resolve():  # a tool reading every PNG counts them
                raise ConfigError(f"--save-images {args.save_images} would hold {what} {path} among the samples; "
                                  "give --out a file outside it")
    device = resolve_device(args.device)
    run = load_run(args.checkpoint, device, use_ema=not args.no_ema)
    settings = resolve_settings(run, device, refiner=args.refine, **sampling_overrides(args))
    if args.save_images:
        # what makes the samples of a seed (the weights themselves, wherever they were read from, and the
        # settings): shards of one sampling may share a --save-images folder, others not
        from fastdiff.checkpoint import resolve_checkpoint
        from fastdiff.sources import model_fingerprint, weights_fingerprint

        source = {"checkpoint": run.path, "weights": model_fingerprint(run.model),
                  "sampler": settings.sampler,
                  "steps": settings.steps, "eta": settings.eta, "guidance": settings.guidance,
                  "spacing": settings.spacing, "clip": settings.clip, "amp": settings.accel.amp,
                  "refiner": weights_fingerprint(resolve_checkpoint(settings.refiner)) if settings.refiner else None}
        check_images_folder(args.save_images, seeds_for(args.seed, args.n),
                            labels_for(args.labels, args.n, run.num_classes), source)
        remove_stale_files(Path(args.save_images), names=is_sample_file)
    recorder = TrajectoryRecorder(settings.steps, rows=min(args.n, args.trajectory_rows)) if args.trajectory else None
    res = sample(run, settings, n=args.n, seed=args.seed, labels=args.labels, callback=recorder,
                 callback_rows=recorder.rows if recorder is not None else 1, progress=show_progress(args))
    nrow = class_columns(args.n, run.num_classes) if res.labels is not None and args.labels is None else None
    grid, raw = save_grid_and_samples(res.images, res.labels, res.seeds, out, out.with_suffix(".npz"), nrow=nrow)
    result = {"grid": str(grid), "samples": str(raw), "n": args.n, "sampler": settings.sampler,
              "steps": settings.steps, "guidance": settings.guidance if res.labels is not None else None,
              "seconds": round(res.seconds + res.setup_s, 3), "images_per_sec": res.images_per_sec,
              "setup_seconds": round(res.setup_s, 3), "accel": settings.accel.describe(), "checkpoint": run.path,
              "refiner": args.refine}
    if args.save_images:
        save_images(res.images, res.seeds, res.labels, args.save_images, source)
        result["images"] = str(args.save_images)
    if recorder is not None:
        save_trajectory(recorder.frames, traj, title=f"{settings.sampler}, {settings.steps} steps")
        result["trajectory"] = str(traj)
    print(json.dumps(result))
    return 0


def add_eval(sub):
    from fastdiff.evaluate import CLASSIFIER_STEPS

    p = sub.add_parser("eval", help="FD_cls, its real-vs-real floor, and class-conditional accuracy",
                       description="Sample --n images from a run and score them against held-out real images with "
                       "a classifier trained on the dataset (cached): FD_cls, KID, precision and recall, each beside "
                       "its real-vs-real value, and class-conditional accuracy. JSON on the last line.")
    _add_run_flags(p, 1000)
    p.add_argument("--classifier-steps", type=COUNT, default=CLASSIFIER_STEPS,
                   help="training steps of the evaluation classifier when it is not cached yet")
    add_sampling_args(p)


def cmd_eval(args) -> int:
    from tqdm import tqdm

    from fastdiff.evaluate import evaluate_run

    result = evaluate_run(args.checkpoint, n=args.n, seed=args.seed, device=args.device,
                          classifier_steps=args.classifier_steps, log=lambda s: tqdm.write(s, file=sys.stderr),
                          refiner=args.refine, progress=show_progress(args), **sampling_overrides(args))
    floor = result["fd_cls_floor"]
    print(f"FD_cls {result['fd_cls']:.3f} (real-vs-real floor {floor:.3f}, ratio {result['fd_ratio']:.2f})")
    print(f"KID {result['kid']:.5f} (standard error {result['kid_std']:.5f}; real-vs-real {result['kid_floor']:.5f}, "
          f"standard error {result['kid_floor_std']:.5f})")
    print(f"precision {result['precision']:.3f}, recall {result['recall']:.3f} "
          f"(real-vs-real {result['precision_floor']:.3f}, {result['recall_floor']:.3f})")
    if "cond_accuracy" in result:
        print(f"class-conditional accuracy {100 * result['cond_accuracy']:.1f}% "
              f"(classifier on held-out real images: {100 * result['classifier_test_accuracy']:.1f}%)")
    print(json.dumps(result))
    return 0


def add_env(sub):
    sub.add_parser("env", help="versions, device, and which kernels are usable",
                   description="Print the Python, torch and triton versions, the device, and which kernels (Triton, "
                   "the native extension) are usable here; JSON on the last line.")


def cmd_env(args) -> int:
    from fastdiff.envinfo import collect

    info = collect()
    for key, value in info.items():
        if isinstance(value, dict):  # cpu_defaults: one line per setting
            print(f"{key:>18}:")
            for sub, v in value.items():
                print(f"{'':>20}{sub}: {v}")
        else:
            print(f"{key:>18}: {', '.join(value) if isinstance(value, list) else value}")
    print(json.dumps(info))
    return 0


def add_bench(sub):
    from fastdiff.bench.providers import PROVIDERS
    from fastdiff.bench.suite import GPU_PRESETS, PRESETS, SECTIONS

    p = sub.add_parser("bench", help="op, sampling and training benchmarks against the plain PyTorch reference",
                       description="Benchmark the op kernels and end-to-end sampling and training per provider; "
                       "print a table and write bench.json and bench.md.")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CI: under a minute on a CPU)")
    p.add_argument("--out", type=PATH, default="runs/bench",
                   help="folder for bench.json and bench.md (default: runs/bench)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS, help="benchmark sections to run")
    p.add_argument("--presets", nargs="+", help=f"keep the rows of these presets (default: all; the CPU runs "
                   f"{' '.join(PRESETS)}, a GPU {' '.join(GPU_PRESETS)})")
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, help="the sample and train rows' providers; the ops "
                   "rows time every path of each op (default: all, diffusers when installed)")
    p.add_argument("--budget-s", type=POSITIVE, help="time budget; later jobs are skipped (default 40 quick, 420 full)")
    p.add_argument("--rounds", type=COUNT, help="interleaved timing rounds per row (default 2 quick, 5 full)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (benchmark jobs, with ETA) on stderr")


def cmd_bench(args) -> int:
    from fastdiff.bench.report import report_paths
    from fastdiff.bench.suite import run_bench
    from fastdiff.runtime import resolve_device

    doc = run_bench(device=resolve_device(args.device), out=Path(args.out), quick=args.quick, sections=args.sections,
                    presets=args.presets, providers=args.providers, budget_s=args.budget_s, rounds=args.rounds,
                    progress=show_progress(args))
    errors = [r for r in doc["rows"] if str(r.get("status", "")).startswith("error")]
    for r in errors:
        print(f"fastdiff bench: {r.get('case') or r.get('op')} {r.get('provider', '')}: {r['status']}", file=sys.stderr)
    json_path, md_path = report_paths(args.out)  # the result, last on stdout as every command's
    print(json.dumps({"json": str(json_path), "md": str(md_path), "rows": len(doc["rows"]),
                      "errors": len(errors), "total_s": doc["total_s"],
                      "targets_met": sum(t.get("status") == "met" for t in doc.get("targets", []))}))
    return 1 if errors else 0


def add_export(sub):
    p = sub.add_parser("export", help="write a run as a diffusers pipeline folder (DDPMPipeline.from_pretrained)",
                       description="Write a run's UNet and schedule as a diffusers folder: model_index.json, "
                                   "unet/ (UNet2DModel) and scheduler/ (DDPMScheduler). diffusers' DDPMPipeline "
                                   "samples an unconditional model; a class-conditional one takes class_labels in a "
                                   "loop of one's own (README, \"Use it from Python\").")
    p.add_argument("--checkpoint", type=PATH, required=True,
                   help="run directory (its latest checkpoint), a checkpoint folder, pretrained:NAME or a diffusers "
                   "folder (required)")
    p.add_argument("--out", type=PATH, required=True,
                   help="the new folder, which must not exist or be empty (required)")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA weights")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="the weights' dtype in the file: fp16 or bf16 halve its size and load into float32 models "
                   "within their rounding (default: %(default)s)")


def cmd_export(args) -> int:
    from fastdiff.interop import export_run

    out = export_run(args.checkpoint, args.out, use_ema=not args.no_ema, dtype=args.dtype)
    print(json.dumps({"out": str(out), "checkpoint": args.checkpoint, "ema": not args.no_ema, "dtype": args.dtype}))
    return 0


def add_plot(sub):
    from fastdiff.plot import DEFAULT_KEYS

    p = sub.add_parser("plot", help="draw the training stats of one or more runs on one figure",
                       description="Draw the stats.jsonl of one or more runs on one PNG: one subplot per stat "
                       "against images seen (kimg), one line per run, the legend naming each run directory.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories written by fastdiff train or distill")
    p.add_argument("--out", type=PATH, required=True, help="output .png file (required)")
    p.add_argument("--keys", default=",".join(DEFAULT_KEYS),
                   help="comma-separated stats.jsonl fields, one subplot each, e.g. grad_norm, sec_per_kimg, "
                   "peak_mem_mb, or an ADD run's g_adv, distill, d_loss (default: %(default)s)")


def cmd_plot(args) -> int:
    from fastdiff.plot import plot_stats

    keys = [k.strip() for k in args.keys.split(",") if k.strip()]
    path = plot_stats(args.runs, args.out, keys)
    print(json.dumps({"plot": str(path), "runs": [str(r) for r in args.runs], "keys": keys}))
    return 0
