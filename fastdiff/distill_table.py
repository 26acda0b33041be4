"""The teacher-vs-student table of `make distill-demo`: FD_cls, class-conditional accuracy and images/s of a
teacher (DDIM 50 and 4 steps) and its ADD student (1, 2 and 4 steps by its own sampler, 2 and 4 by DDIM with eta,
for a student of four timesteps; `compare` says which rows another gets), each without and with a refiner.

Every row is scored with the same evaluation classifier (the teacher's, cached in its run directory) against
the same held-out images. A refined row reuses its unrefined row's samples; its images/s counts the sampling
and the refiner's time. Run: python -m fastdiff.distill_table --teacher RUN --student RUN [--refiner RUN].
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import warnings
from pathlib import Path

import torch

from fastdiff.checkpoint import write_json_atomic
from fastdiff.cli import HelpFormatter, add_sampling_args, sampling_overrides
from fastdiff.cli.args import show_progress
from fastdiff.errors import ConfigError, FastdiffError, FastdiffWarning
from fastdiff.evaluate import (
    classifier_cache_dir,
    evaluation_sets,
    load_or_train_classifier,
    real_reference,
    score_samples,
)
from fastdiff.runtime import resolve_device
from fastdiff.sampling import load_run, resolve_settings, sample
from fastdiff.sampling.settings import student_grid_steps

STUDENT_ETA = 0.7  # DDIM eta of the student's DDIM rows (README, "Few-step students": 0, 0.5, 0.6, 0.7 and 1 measured)


@contextlib.contextmanager
def _student_refiner(who: str):
    """The teacher's refined rows run the student's refiner on the teacher's samples on purpose (how much of the
    refiner's gain is the student's own): its warning that it was trained on other weights' samples is silenced
    for them, and for them alone."""
    with warnings.catch_warnings():
        if who == "teacher":
            warnings.filterwarnings("ignore", message=".*was trained on the samples of other weights",
                                    category=FastdiffWarning)
        yield


def _rows(teacher_steps, student_steps, student_ddim_steps):
    return ([("teacher", "ddim", s) for s in teacher_steps] + [("student", "student", s) for s in student_steps]
            + [("student", "ddim", s) for s in student_ddim_steps])


def student_rows(student, steps=None, ddim_steps=None, spacing: str | None = None) -> tuple[list, list]:
    """The student's rows: (its own sampler's step counts, DDIM's), each as given, or by default 1, 2 and 4 steps and
    all its timesteps, of as many as it has; and DDIM at every count above 1 that runs on its timesteps alone with
    `spacing` (None: the run's; `student_grid_steps`)."""
    trained = len(student.student_timesteps)
    if steps is None:
        steps = sorted({k for k in (1, 2, 4) if k <= trained} | {trained})
    if ddim_steps is None:
        ddim_steps = [k for k in student_grid_steps(student, spacing or student.defaults.spacing) if k > 1]
    return list(steps), list(ddim_steps)


def compare(teacher, student, refiner=None, *, n: int = 1000, seed: int = 0, teacher_steps=(50, 4),
            student_steps=None, student_ddim_steps=None, student_eta: float = STUDENT_ETA, device="cpu",
            log=None, progress: bool = False, **sampling) -> list[dict]:
    """One record per (model, sampler, steps, refined) row; progress: each row's sampling progress bar on stderr.

    The student is sampled by its own sampler (ADD's: x0, re-noised with fresh noise) and by DDIM with eta
    `student_eta` on its own timesteps (2 and 4 steps of trailing spacing are 999, 499 and 999, 749, 499, 249).
    student_steps and student_ddim_steps: its rows (None: `student_rows`' defaults, which fit its timesteps).
    sampling: overrides of `fastdiff.sampling.resolve_settings` for every row (batch_size, eta, guidance, clip,
    acceleration keys); each row's sampler and steps are the table's, and the student's DDIM rows take
    `student_eta`.
    """
    device = torch.device(device)
    runs = {"teacher": load_run(teacher, device), "student": load_run(student, device)}
    if not runs["student"].config.is_student or runs["teacher"].config.is_student:
        raise ConfigError("--teacher must be a DDPM run and --student an ADD student run")
    student_steps, student_ddim_steps = student_rows(runs["student"], student_steps, student_ddim_steps,
                                                    sampling.get("spacing"))

    def row_settings(who, sampler, steps):
        over = {**sampling, "eta": student_eta} if (who, sampler) == ("student", "ddim") else sampling
        if sampler == "student":  # --spacing and --eta are the DDIM rows'; the student sampler reads neither
            over = {k: v for k, v in over.items() if k not in ("spacing", "eta")}
        with _student_refiner(who):
            return resolve_settings(runs[who], device, sampler=sampler, steps=steps, refiner=refiner, **over)

    settings = {row: row_settings(*row) for row in _rows(teacher_steps, student_steps, student_ddim_steps)}
    cfg = runs["teacher"].config
    train, test = evaluation_sets(cfg, n)
    cache = classifier_cache_dir(runs["teacher"].path, cfg)
    classifier = load_or_train_classifier(train, cache, device, log)
    reference = real_reference(classifier, train, test, n, device)
    records = []
    for (who, sampler, steps), st in settings.items():
        # With a refiner, one run gives both rows: the samples before the refiner and after it.
        with _student_refiner(who):
            res = sample(runs[who], st, n=n, seed=seed, progress=progress)
        base = {"model": who, "sampler": sampler, "steps": steps, "guidance": st.guidance, "eta": st.eta, "n": n,
                "accel": st.accel.describe()}
        plain = res.unrefined if refiner else res.images
        records.append({**base, "refined": False, **score_samples(classifier, plain, res.labels, reference, device),
                        "images_per_sec": n / max(res.seconds - res.refine_s, 1e-9)})
        if refiner:
            records.append({**base, "refined": True,
                            **score_samples(classifier, res.images, res.labels, reference, device),
                            "images_per_sec": res.images_per_sec})
        if log:
            r = records[-1]
            log(f"{who} {sampler} {steps} steps: FD_cls {records[-1 - bool(refiner)]['fd_cls']:.3f}"
                + (f", refined {r['fd_cls']:.3f}" if refiner else ""))
    return records


def markdown(records: list[dict]) -> str:
    lines = ["| model | sampler | steps | refiner | FD_cls | FD_cls / floor | accuracy | images/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        acc = f"{100 * r['cond_accuracy']:.1f}%" if "cond_accuracy" in r else "-"
        extra = [f"guidance {r['guidance']:g}"] if r["guidance"] != 1 else []
        extra += [f"eta {r['eta']:g}"] if r.get("eta") else []
        sampler = f"{r['sampler']} ({', '.join(extra)})" if extra else r["sampler"]
        lines.append(f"| {r['model']} | {sampler} | {r['steps']} | {'yes' if r['refined'] else 'no'} | "
                     f"{r['fd_cls']:.3f} | {r['fd_ratio']:.2f} | {acc} | {r['images_per_sec']:.0f} |")
    floor = records[0]["fd_cls_floor"]
    lines.append(f"\nFD_cls real-vs-real floor: {floor:.3f} ({records[0]['n']} samples per row).")
    return "\n".join(lines)


def targets(records: list[dict]) -> dict:
    """Issue 11's acceptance checks against the teacher's unrefined DDIM-50: the student at 4 steps within 1.3x its
    FD_cls and at 1 step within 1.5x, each with at least 97% accuracy; for each of the student's samplers in the
    table, unrefined and, where the table has them, refined."""
    rows = {(r["model"], r["sampler"], r["steps"], r["refined"]): r for r in records}
    t50 = rows[("teacher", "ddim", 50, False)]["fd_cls"]
    checks = {}
    for refined in (False, True):
        for sampler in ("student", "ddim"):
            for steps, limit in ((4, 1.3), (1, 1.5)):
                r = rows.get(("student", sampler, steps, refined))
                if r is not None:
                    key = f"student{steps}_{sampler}_within_{limit}x_teacher50_acc97{'_refined' if refined else ''}"
                    checks[key] = r["fd_cls"] <= limit * t50 and r.get("cond_accuracy", 0.0) >= 0.97
    return checks


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastdiff.distill_table", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--teacher", required=True, help="the DDPM teacher's run directory (required)")
    p.add_argument("--student", required=True, help="its ADD student's run directory (required)")
    p.add_argument("--refiner", help="a refiner run (fastdiff train-refiner) to add refined rows (default: none)")
    p.add_argument("--n", type=int, default=1000, help="samples per row")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--student-eta", type=float, default=STUDENT_ETA, help="DDIM eta of the student's DDIM rows "
                   "(2 and 4 steps for a student of four timesteps)")
    p.add_argument("--out", help="write the table (markdown) here and the records beside it as .json (default: "
                   "print the records as JSON)")
    add_sampling_args(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    overrides = sampling_overrides(args)
    given = [k for k in ("sampler", "steps") if overrides.pop(k) is not None]
    try:
        if given:
            raise ConfigError(f"--{given[0]} is set per row by the table; drop it")
        records = compare(args.teacher, args.student, args.refiner, n=args.n, seed=args.seed,
                          student_eta=args.student_eta,
                          device=resolve_device(args.device), log=lambda s: print(s, file=sys.stderr),
                          progress=show_progress(args), **overrides)
    except FastdiffError as e:
        print(f"distill_table: error: {e}", file=sys.stderr)
        return 2
    table = markdown(records)
    checks = targets(records)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or
            platform.machine(), "targets": checks}
    print(table)
    print("targets: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in checks.items()))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")
        write_json_atomic(out.with_suffix(".json"), {"rows": records, **meta})
    else:
        print(json.dumps({"rows": records, **meta}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
