"""`fastdiff bench`: the op micro-benchmarks, end-to-end sampling and training, one report.

Jobs run in priority order (the issue's targets first) inside a time budget; a job that would start after the
budget is spent is recorded as skipped. The JSON and markdown reports are rewritten after every row.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastdiff.bench import diffusers_ref
from fastdiff.bench.e2e import Job, SampleCase, sample_rows, train_row
from fastdiff.bench.report import SAMPLE_COLUMNS, TRAIN_COLUMNS, environment, markdown_table, write_reports
from fastdiff.config import PRESETS
from fastdiff.errors import ConfigError

SECTIONS = ("ops", "sample", "train")
DEFAULT_PRESETS = ("mnist", "cifar10-ddpm")


@dataclass
class Budget:
    seconds: float
    start: float = 0.0

    def __post_init__(self):
        self.start = time.perf_counter()

    def used(self) -> float:
        return time.perf_counter() - self.start

    def exhausted(self) -> bool:
        return self.used() >= self.seconds


def _cases(device: torch.device, quick: bool) -> list[SampleCase]:
    if quick:  # one timed step each, extrapolated
        return [SampleCase("ddpm", 1000, 1), SampleCase("ddim", 4, 1)]
    timed = 20 if device.type == "cuda" else 2
    return [SampleCase("ddpm", 1000, timed), SampleCase("ddim", 50, 50), SampleCase("ddim", 4, 4)]


def plan(device: torch.device, quick: bool, presets=DEFAULT_PRESETS, providers=None) -> list[Job]:
    """The jobs in the order they run. On a GPU: the targets (mnist sampling at batch 64, cifar10-ddpm training
    at batch 128 and sampling at batch 1024, bf16 against torch-eager fp32 and torch-compile bf16), then the
    diffusers rows, the other preset/batch/dtype combinations. On the CPU: small batches, fp32."""
    cuda = device.type == "cuda"
    fast_dtype = "bf16" if cuda else "fp32"
    trio = [("torch-eager", "fp32"), ("torch-compile", fast_dtype), ("fastdiff", fast_dtype)]
    cases = _cases(device, quick)
    jobs: list[Job] = []

    def sample(preset, batch, combos):
        jobs.extend(Job("sample", preset, p, d, batch, cases) for p, d in combos if preset in presets)

    def train(preset, batch, combos):
        jobs.extend(Job("train", preset, p, d, batch) for p, d in combos if preset in presets)

    if cuda and not quick:
        sample("mnist", 64, trio)
        train("cifar10-ddpm", 128, trio)
        sample("cifar10-ddpm", 1024, trio)
        sample("mnist", 64, [("diffusers", "fp32")])
        train("cifar10-ddpm", 128, [("diffusers", "fp32"), ("diffusers", "bf16")])
        sample("cifar10-ddpm", 1024, [("diffusers", "fp32")])
        train("mnist", 128, trio + [("diffusers", "fp32")])
        train("cifar10-ddpm", 128, [("torch-eager", "bf16"), ("torch-compile", "fp32"), ("fastdiff", "fp32")])
        sample("cifar10-ddpm", 64, trio)
        sample("mnist", 1024, trio)
        sample("cifar10-ddpm", 1024, [("fastdiff", "fp32")])
        train("cifar10-ddpm", 256, trio)
    else:
        batch = 2 if quick or not cuda else 16
        for preset in presets:
            sample(preset, batch, trio + [("diffusers", "fp32")])
            train(preset, batch, trio + [("diffusers", "fp32")])
    if providers:
        jobs = [j for j in jobs if j.provider in providers]
    if not diffusers_ref.available():
        jobs = [j for j in jobs if j.provider != "diffusers"]
    return jobs


def _job_fields(job: Job) -> dict:
    return {"section": job.section, "preset": job.preset, "batch": job.batch, "provider": job.provider,
            "dtype": job.dtype}


def _skip_reason(job: Job, device: torch.device, quick: bool) -> str | None:
    if job.provider == "torch-compile" and device.type == "cpu" and quick:
        return "skipped: --quick on the CPU (Inductor's C++ compile takes minutes on a small CPU)"
    return None


def run_job(job: Job, device, *, quick: bool, reps: int, budget: Budget):
    """Yield the rows of one job; an exception becomes an error row (the other jobs still run)."""
    base = _job_fields(job)
    reason = _skip_reason(job, device, quick) or ("skipped: time budget" if budget.exhausted() else None)
    if reason:
        labels = [c.label for c in job.cases] if job.section == "sample" else [None]
        for label in labels:
            yield {**base, **({"sampler": label} if label else {}), "status": reason}
        return
    warmup = 0 if quick else 1  # quick: the first call is the only warm-up
    try:
        if job.section == "sample":
            for row in sample_rows(job, device, reps=reps, warmup=warmup, budget=budget):
                yield {**base, **row}
        else:
            # A training step is short next to a sampling run: more of them for the same confidence.
            yield {**base, **train_row(job, device, reps=reps if quick else 3 * reps, warmup=warmup)}
    except Exception as e:  # noqa: BLE001 - one broken provider must not lose the rest of the report
        yield {**base, "status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    finally:
        torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_ops(device, quick: bool) -> dict:
    """The op micro-benchmarks of `fastdiff.bench.ops`, when that module exists on this branch."""
    try:
        from fastdiff.bench import ops as op_bench
    except ImportError:
        return {"status": "op benchmarks unavailable (fastdiff.bench.ops is not installed)", "rows": []}
    try:
        return {"status": "ok", "rows": op_bench.run_op_benchmarks(device, quick)}
    except Exception as e:  # noqa: BLE001 - reported, like any provider failure
        return {"status": f"error: {type(e).__name__}: {e}", "rows": []}


def run_bench(*, device, out: Path, quick: bool = False, sections=SECTIONS, presets=None, providers=None,
              budget_s: float | None = None, reps: int | None = None, echo=print) -> dict:
    """Run the suite and write out/bench.json and out/bench.md; returns the report document.

    presets default to mnist and cifar10-ddpm (mnist alone with --quick on the CPU, to finish within a minute).
    """
    device = torch.device(device)
    if presets is None:
        presets = ("mnist",) if quick and device.type == "cpu" else DEFAULT_PRESETS
    missing = [p for p in presets if p not in PRESETS]
    if missing:
        raise ConfigError(f"unknown preset(s) {missing}; choose from {', '.join(PRESETS)}")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"unknown bench section(s) {sorted(unknown)}; use {', '.join(SECTIONS)}")
    budget = Budget(budget_s if budget_s is not None else (35.0 if quick else 420.0))
    reps = reps or (2 if quick else 5)
    doc = {"quick": quick, "environment": environment(device), "rows": [], "budget_s": budget.seconds,
           "note": ("images/s of the 1000-step DDPM sampler is extrapolated from the timed steps "
                    "(every step does the same work); training uses a fixed synthetic batch")}
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    write_reports(doc, out)
    jobs = [j for j in plan(device, quick, presets, providers) if j.section in sections]
    ops_after = 3 if device.type == "cuda" and not quick else 0  # after the first target jobs
    for index, job in enumerate(jobs + [None]):
        if "ops" in sections and index == min(ops_after, len(jobs)) and "ops" not in doc:
            doc["ops"] = run_ops(device, quick)
            echo(f"ops: {doc['ops']['status']} ({len(doc['ops']['rows'])} rows)")
            write_reports(doc, out)
        if job is None:
            break
        for row in run_job(job, device, quick=quick, reps=reps, budget=budget):
            doc["rows"].append(row)
            echo(_one_line(row))
            write_reports(doc, out)
    doc["total_s"] = round(budget.used(), 1)
    json_path, md_path = write_reports(doc, out)
    for section, columns in (("sample", SAMPLE_COLUMNS), ("train", TRAIN_COLUMNS)):
        rows = [r for r in doc["rows"] if r.get("section") == section]
        if rows:
            echo(f"\n{section}\n" + markdown_table(rows, columns))
    echo(f"\nwrote {json_path} and {md_path} in {doc['total_s']} s")
    return doc


def _one_line(row: dict) -> str:
    what = (f"{row['section']} {row['preset']} b{row['batch']} {row.get('sampler') or '-'} "
            f"{row['provider']} {row['dtype']}")
    if row.get("status") != "ok":
        return f"{what}: {row.get('status')}"
    return f"{what}: {row['images_per_s']:.4g} img/s ({row['median_ms']:.4g} ms/call, setup {row.get('setup_s', 0)} s)"
