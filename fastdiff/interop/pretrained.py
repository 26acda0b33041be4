"""`make pretrained`: the weights that ship inside the package, under fastdiff/pretrained/.

Each model is a folder NAME/ with model.safetensors (the run's EMA weights in fp16) and config.json, which
`fastdiff.load("pretrained:NAME")`, `fastdiff sample --checkpoint pretrained:NAME` and `fastdiff eval` read like
any checkpoint folder. The evaluation classifier of the teacher's dataset is copied beside them, so that eval
scores the shipped models without training it and without writing into the installed package.

A refiner (`fastdiff train-refiner`) of the shipped student ships as NAME-student-refiner: its weights in fp16
and its config.json, read by `fastdiff sample --checkpoint pretrained:NAME-student --refine
pretrained:NAME-student-refiner`.

Run: python -m fastdiff.interop.pretrained [--teacher RUN] [--student RUN] [--refiner RUN] [--name mnist]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from fastdiff import checkpoint as ckpt
from fastdiff.config import load_config
from fastdiff.errors import ConfigError, FastdiffError
from fastdiff.evaluate import evaluate_run

PRETRAINED_DIR = ckpt.PRETRAINED_DIR
# The quality check of each shipped model: `make pretrained` scores it with these settings and writes eval.json
# beside it; tests/test_pretrained.py samples it again with the same settings and compares (n, seed fixed).
CHECK = {"": dict(sampler="ddim", steps=4), "-student": dict(sampler="student", steps=1),
         "-student-refiner": dict(sampler="student", steps=1)}
CHECK_N, CHECK_SEED = 500, 0
REFINER = "-student-refiner"


def check_of(name: str) -> tuple[str, dict]:
    """(checkpoint, evaluate_run settings) that score the shipped model NAME: a refiner refines its student."""
    if name.endswith(REFINER):
        return f"pretrained:{name[: -len(REFINER)]}-student", dict(CHECK[REFINER], refiner=f"pretrained:{name}")
    return f"pretrained:{name}", CHECK["-student" if name.endswith("-student") else ""]


def write_pretrained(run, name: str, out_root: Path = PRETRAINED_DIR, *, teacher_name: str | None = None) -> Path:
    """NAME/{model.safetensors (fp16 EMA weights), config.json} from a run directory or checkpoint folder.

    A student's config names its teacher as `pretrained:<teacher_name>` instead of a local run directory.
    """
    path = ckpt.resolve_checkpoint(run)
    cfg = load_config(path / "config.json")
    if cfg.is_student and teacher_name:
        cfg.distill.teacher = f"pretrained:{teacher_name}"
    return _ship(ckpt.load_tensors(path, "ema"), cfg.to_dict(), Path(out_root) / name)


def _ship(tensors: dict, config: dict, out: Path) -> Path:
    """out/{model.safetensors (the tensors, floating ones in fp16), config.json}."""
    out.mkdir(parents=True, exist_ok=True)
    ckpt.save_tensors(out / "model.safetensors",
                      {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in tensors.items()})
    ckpt.write_json_atomic(out / "config.json", config)
    return out


def write_refiner(run, name: str, out_root: Path = PRETRAINED_DIR) -> Path:
    """NAME/{model.safetensors (fp16 weights), config.json} from a refiner run (its generator must be the shipped
    student it refines)."""
    path = ckpt.resolve_checkpoint(run)
    config = ckpt.load_json(path, "config")
    student = f"pretrained:{name[: -len(REFINER)]}-student"
    if config.get("kind") != "refiner" or config.get("refiner", {}).get("generator") != student:
        raise FastdiffError(f"{run} is not a refiner of {student}; train one with `fastdiff train-refiner "
                            f"--checkpoint {student}`")
    return _ship(ckpt.load_tensors(path, "model"), config, Path(out_root) / name)


def copy_classifier(run, out_root: Path = PRETRAINED_DIR) -> list[Path]:
    """The run's cached evaluation classifier(s) (classifier-*.safetensors + .json), copied into out_root. A run
    evaluated with the shipped classifier has none of its own: out_root's then stays."""
    run_dir = ckpt.resolve_checkpoint(run).parent.parent
    files = sorted(run_dir.glob("classifier-*.safetensors"))
    dataset = ckpt.read_json(run_dir / "config.json")["data"]["dataset"]
    if not files and any(Path(out_root).glob(f"classifier-{dataset}-*.safetensors")):
        return []
    if not files:
        raise FastdiffError(f"{run_dir} has no cached evaluation classifier; run `fastdiff eval --checkpoint "
                            f"{run_dir}` first")
    copied = []
    for f in files:
        for src in (f, f.with_suffix(".json")):
            shutil.copyfile(src, Path(out_root) / src.name)
            copied.append(Path(out_root) / src.name)
    return copied


def score_pretrained(folder: Path) -> dict:
    """Score a shipped model with its CHECK settings (CPU, n = CHECK_N, seed CHECK_SEED) into folder/eval.json."""
    checkpoint, settings = check_of(folder.name)
    result = evaluate_run(checkpoint, n=CHECK_N, seed=CHECK_SEED, device="cpu", **settings)
    record = {k: result[k] for k in ("n", "sampler", "steps", "guidance", "fd_cls", "fd_cls_floor", "fd_ratio",
                                     "kid", "precision", "recall", "cond_accuracy")}
    ckpt.write_json_atomic(folder / "eval.json", record)
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastdiff.interop.pretrained", description=__doc__.splitlines()[0])
    p.add_argument("--teacher", help="the DDPM run to ship as NAME")
    p.add_argument("--student", help="an ADD student of it, shipped as NAME-student (of --teacher, or else of the "
                   "shipped NAME)")
    p.add_argument("--refiner", help="a refiner of the shipped NAME-student, shipped as NAME-student-refiner")
    p.add_argument("--name", default="mnist", help="the pretrained name (default: mnist)")
    p.add_argument("--out", type=Path, default=PRETRAINED_DIR, help="folder of the pretrained models")
    args = p.parse_args(argv)
    if not (args.teacher or args.student or args.refiner):
        p.error("pass --teacher RUN, --student RUN and/or --refiner RUN")
    try:
        if args.student and not args.teacher:  # a new student of the teacher already shipped
            dc = load_config(ckpt.resolve_checkpoint(args.student) / "config.json").distill
            teacher = dc.teacher if dc is not None else "no teacher (it is not an ADD student)"
            if teacher != f"pretrained:{args.name}":
                raise ConfigError(f"{args.student} distils {teacher}, not pretrained:{args.name}; ship its teacher "
                                  "with it (--teacher RUN)")
        models = []
        if args.teacher:
            models.append(write_pretrained(args.teacher, args.name, args.out))
        if args.student:
            models.append(write_pretrained(args.student, f"{args.name}-student", args.out, teacher_name=args.name))
        if args.refiner:  # after the student: it refines the shipped one
            models.append(write_refiner(args.refiner, f"{args.name}{REFINER}", args.out))
        written = models + (copy_classifier(args.teacher, args.out) if args.teacher else [])
        for folder in models:
            score_pretrained(folder)
    except FastdiffError as e:
        print(f"pretrained: error: {e}", file=sys.stderr)
        return 2
    sizes = {str(f): f.stat().st_size for w in written for f in ([w] if w.is_file() else sorted(w.iterdir()))}
    print(json.dumps({"files": sizes, "total_bytes": sum(sizes.values())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
