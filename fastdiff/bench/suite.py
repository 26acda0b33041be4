"""`fastdiff bench`: the op micro-benchmarks, end-to-end sampling and training, one report.

Jobs run in the order of `plan` inside a time budget; a job that would start after the budget is spent is
recorded as skipped. The JSON and markdown reports are rewritten after every row.
"""

from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from fastdiff.bench import PRESETS
from fastdiff.bench.e2e import Job, SampleCase, sample_rows, train_rows
from fastdiff.bench.ops import iter_op_benchmarks
from fastdiff.bench.report import TARGET_COLUMNS, add_ratios, new_doc, table, write_reports
from fastdiff.bench.targets import evaluate
from fastdiff.bench.timing import error_status
from fastdiff.config import PRESETS as ALL_PRESETS
from fastdiff.config_checks import count, number
from fastdiff.errors import ConfigError
from fastdiff.images import check_writable
from fastdiff.runtime import AccelOptions, resolve_device, train_defaults

SECTIONS = ("ops", "sample", "train")
GPU_PRESETS = ("mnist", "cifar10-ddpm")  # the GPU run's headline rows


@dataclass(frozen=True)
class OpsJob:
    part: str  # headline | rest | all (see fastdiff.bench.ops)
    section: str = "ops"


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


def plan(device: torch.device, quick: bool, presets=None, providers=None) -> list:
    """The jobs in the order they run.

    GPU (full): the headline rows fastest first -- the headline op rows (GroupNorm+SiLU in both layouts, each of its
    paths, and the sampler step against copy bandwidth: seconds, with no model to compile), mnist DDIM-20 sampling at
    batch 64 (the CUDA-graph gain), cifar10-ddpm training at batch 128, DDPM-1000 sampling at batch 1024 (20 timed
    steps, extrapolated), each torch-eager fp32 / fastdiff bf16 / torch-compile bf16 interleaved; diffusers at the same
    settings, interleaved with fastdiff bf16 again (ratios compare rows of one job); then the other op rows and
    combinations. A job's rows come once its providers are compiled and timed, so the cheap op rows first are not
    lost to a model job cut short by the suite's time limit; a job whose budget runs out between two compiles skips
    the rest and times what it compiled.
    CPU (and --quick anywhere): for each of PRESETS, DDIM-20
    and DDPM-1000 sampling and a training step, every provider interleaved at fp32 (batch 64, or 2 with --quick),
    and fastdiff and diffusers at the CPU's default precision where it is not fp32 (`runtime.cpu_choice`).
    """
    cuda = device.type == "cuda" and not quick
    # fastdiff before torch-compile: where the budget ends inside a job, the compile still to come is skipped
    # (`timing.measure`'s stop), and the baseline's is the one to lose, not the headline's
    trio = (("torch-eager", "fp32"), ("fastdiff", "bf16"), ("torch-compile", "bf16"))
    ddim20 = SampleCase("ddim", 20, 2 if quick else 20)
    ddpm = SampleCase("ddpm", 1000, 20 if cuda else 1 if quick else 2)
    if cuda:
        both, fast = (("diffusers", "fp32"), ("diffusers", "bf16")), (("fastdiff", "bf16"),)
        jobs = [OpsJob("headline"), Job("sample", "mnist", 64, trio, (ddim20,)),
                Job("train", "cifar10-ddpm", 128, trio), Job("sample", "cifar10-ddpm", 1024, trio, (ddpm,)),
                # diffusers beside fastdiff again (its compiles are cached by then): ratios are within a job
                Job("sample", "mnist", 64, fast + both, (ddim20,)), Job("train", "cifar10-ddpm", 128, fast + both),
                Job("sample", "cifar10-ddpm", 1024, fast + both[1:], (ddpm,)), OpsJob("rest"),
                Job("sample", "mnist", 64, (("fastdiff-native", "fp32"),), (ddim20,)),
                Job("train", "mnist", 128, trio + both),
                Job("train", "cifar10-ddpm", 128, (("torch-eager", "bf16"), ("torch-compile", "fp32"),
                                                   ("fastdiff", "fp32"))),
                Job("sample", "mnist", 64, trio + both, (ddpm,)),
                Job("sample", "cifar10-ddpm", 64, trio, (ddim20, ddpm)), Job("sample", "mnist", 1024, trio, (ddim20,)),
                Job("train", "cifar10-ddpm", 256, trio)]
    else:
        batch = 2 if quick else 64
        fp32 = tuple((p, "fp32") for p in ("torch-eager", "torch-compile", "fastdiff", "fastdiff-native", "diffusers"))
        # Where the CPU's default precision is not fp32 (bf16 with AMX), fastdiff and diffusers at it too.
        amp = {"sample": AccelOptions.for_device(device).amp, "train": train_defaults(device)[0]}
        at = {k: ((("fastdiff", a), ("diffusers", a)) if a != "fp32" else ()) for k, a in amp.items()}
        jobs = [OpsJob("all")]
        for preset in PRESETS:
            jobs += [Job("sample", preset, batch, fp32 + at["sample"], (ddim20, ddpm)),
                     Job("train", preset, batch, tuple(k for k in fp32 if k[0] != "fastdiff-native") + at["train"])]
    if presets is not None:
        jobs = [j for j in jobs if isinstance(j, OpsJob) or j.preset in presets]
    if providers is not None:
        jobs = [j if isinstance(j, OpsJob) else Job(j.section, j.preset, j.batch,
                                                    tuple(k for k in j.providers if k[0] in providers), j.cases)
                for j in jobs]
        jobs = [j for j in jobs if isinstance(j, OpsJob) or j.providers]
    return jobs


def run_job(job, device, *, quick: bool, rounds: int, budget: Budget, log=None):
    """Yield the rows of one job; an exception outside a provider's own calls becomes error rows. log: a line as
    each model provider's warm-up ends."""
    if isinstance(job, OpsJob):
        try:
            yield from iter_op_benchmarks(device, quick, part=job.part, stop=budget.exhausted)
        except Exception as e:  # noqa: BLE001 - one broken section must not lose the rest of the report
            yield {"section": "op", "op": f"{job.part} op rows", "status": error_status(e)}
        return
    rows = sample_rows if job.section == "sample" else train_rows
    try:
        yield from rows(job, device, rounds=rounds, quick=quick, budget=budget, log=log)
    except Exception as e:  # noqa: BLE001 - as above
        yield from (job.row(p, d, case, status=error_status(e)) for case in job.cases or (None,)
                    for p, d in job.providers)
    finally:
        torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_bench(*, device, out: Path, quick: bool = False, sections=SECTIONS, presets=None, providers=None,
              budget_s: float | None = None, rounds: int | None = None, echo=print, progress: bool = False) -> dict:
    """Run the suite and write out/bench.json and out/bench.md; returns the report document.

    progress: a tqdm bar of the jobs, with ETA, on stderr (the echoed rows are written around it)."""
    from fastdiff.bench.providers import PROVIDERS

    device = resolve_device(device)
    if out is None:
        raise ConfigError("out is the folder for bench.json and bench.md; give one")
    for name, given, known in (("section", sections, SECTIONS), ("preset", presets, ALL_PRESETS),
                               ("provider", providers, PROVIDERS)):
        if isinstance(given, str):  # one name: split into letters, it named none
            raise ConfigError(f"{name}s={given!r} must be a list of names, e.g. [{given!r}]")
        unknown = sorted(set(given or ()) - set(known))
        if unknown:
            raise ConfigError(f"unknown bench {name}(s) {unknown}; choose from {', '.join(known)}")
    if budget_s is None:
        budget_s = 40.0 if quick else 420.0
    budget = Budget(number("budget_s", budget_s, lo=0, lo_open=True, allowed="seconds above 0"))
    rounds = count("rounds", (2 if quick else 5) if rounds is None else rounds)
    doc = new_doc(device, title=f"fastdiff bench{' --quick' if quick else ''}", quick=quick, budget_s=budget.seconds,
                  rounds=rounds, complete=False, notes=[
                      "providers of a row group are timed interleaved, round by round, in one process; median and "
                      "p20-p80 over rounds, warm-up (compile, capture) excluded and reported as warm-up s",
                      "a sampling case ddpm-1000 timed on fewer steps is extrapolated to 1000 (every step does the "
                      "same work); training uses a fixed synthetic batch",
                      "diffusers rows: UNet2DModel + DDIM/DDPMScheduler at fastdiff's settings "
                      "(use_clipped_model_output=True, clip_sample=True, trailing timesteps)"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    def save():
        add_ratios(doc["rows"])
        try:
            doc["targets"] = evaluate(doc["rows"], device)
        except Exception as e:  # noqa: BLE001 - a report without its targets beats a bench stopped by them
            doc["targets"] = [{"target": "all", "status": f"not evaluated: {error_status(e)}"}]
        return write_reports(doc, out)

    check_writable(out, folder=True, what="--out")  # now, not after the first job; and an earlier report in it
    # stays until this run has a row to replace it with
    jobs = [job for job in plan(device, quick, presets, providers) if job.section in sections]
    models = sorted({"sample", "train"} & set(sections))
    if (presets or providers) and models and not any(isinstance(j, Job) for j in jobs):  # it ran nothing, "complete"
        every = [j for j in plan(device, quick) if isinstance(j, Job) and j.section in models]
        asked = " and ".join(f"{what} {', '.join(names)}" for what, names in (("preset(s)", presets),
                                                                                ("provider(s)", providers)) if names)
        where = f"{device.type}{', --quick' if quick else ''}"
        raise ConfigError(f"no {'/'.join(models)} bench job on this device ({where}) runs {asked}; its jobs run "
                          f"preset(s) {', '.join(sorted({j.preset for j in every}))} with provider(s) "
                          f"{', '.join(sorted({p for j in every for p, _ in j.providers}))}")
    def log(line):
        with tqdm.external_write_mode():
            echo(f"[{budget.used():.0f} s] {line}")

    for index, job in enumerate(tqdm(jobs, desc="bench", unit="job", disable=not progress, file=sys.stderr,
                                     dynamic_ncols=True)):
        for row in run_job(job, device, quick=quick, rounds=rounds, budget=budget, log=log):
            doc["rows"].append({**row, "job": index})  # ratios compare rows of one job (`add_ratios`)
            with tqdm.external_write_mode():
                echo(_one_line(row))
            save()
    doc["total_s"], doc["complete"] = round(budget.used(), 1), True  # (reports saved before this say False)
    json_path, md_path = save()
    for section in ("sample", "train"):
        rows = [r for r in doc["rows"] if r.get("section") == section]
        if rows:
            echo(f"\n{section}\n" + table(rows))
    echo("\ntargets\n" + table(doc["targets"], TARGET_COLUMNS))
    echo(f"\nwrote {json_path} and {md_path} in {doc['total_s']} s")
    return doc


def _one_line(row: dict) -> str:
    what = " ".join(str(row[k]) for k in ("section", "preset", "op", "shape", "batch", "sampler", "provider", "dtype")
                    if row.get(k) is not None)
    if row.get("status") != "ok":
        return f"{what}: {row.get('status')}"
    speed = f"{row['images_per_s']:.4g} img/s" if "images_per_s" in row else f"{row['gb_per_s']:.4g} GB/s"
    return f"{what}: {speed} ({row['median_ms']:.4g} ms/call, warm-up {row['warmup_s']} s)"
