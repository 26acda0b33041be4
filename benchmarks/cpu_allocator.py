"""What glibc's malloc state does to sampling and training, process against process: kept freed memory or not.

    python benchmarks/cpu_allocator.py --out benchmarks/results/DIR                  # sampling and training
    python benchmarks/cpu_allocator.py --only cl/fp32/native/2t,diffusers/fp32 ...   # candidates of cpu_defaults.py

A UNet's forward allocates and frees the same activations every call, and glibc hands large freed blocks back to the
OS (a block over its mmap threshold is unmapped, the heap's top is trimmed), so the next call faults its pages in
again. `keep` fixes the mmap threshold at glibc's maximum (32 MiB) and the trim threshold at 1 GiB before the models
are built, so freed memory stays for the next call; `default` leaves glibc's rules alone; `warm` leaves them alone
too, but first frees one block just under 32 MiB, which raises glibc's dynamic mmap threshold to that size, as
`fastdiff eval`'s loading of data and classifier does before its timed work (it ran level with and without keep:
benchmarks/cli_malloc.py). malloc's setting holds for a whole process, so the settings cannot alternate inside one:
every round runs one fresh process of each, in alternating order. Each process builds the candidates
(`cpu_defaults.build`: the same weights and settings), warms them up and times them interleaved for `--calls`
rounds; its per-candidate median is one sample, and a row gives the median and p20-p80 of those samples over the
processes, with the minor page faults per call and the process's peak RSS. diffusers runs in every kind of process.
`keep` is what every fastdiff command sets (`fastdiff.runtime.keep_freed_memory`); this script's processes are not
fastdiff commands, so `default` is glibc's own rules, as in a program that uses diffusers or fastdiff's Python API
(README, "CPU defaults").

    python benchmarks/cpu_allocator.py --sections sample --settings default --apart \
        --only cl/fp32/native/2t,cl/fp32/native/2t/r64                                # candidates apart

`--apart` runs each candidate in a process of its own, so that candidates do not share malloc's state: how the
sampling calls chunked to 64 rows (`AccelOptions.max_rows`, cpu_defaults.py's .../r64) compare with one call.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_defaults  # noqa: E402 - the candidates and their callables

from fastdiff import runtime  # noqa: E402
from fastdiff.bench.report import new_doc, write_reports  # noqa: E402
from fastdiff.bench.timing import measure, median_p20_p80  # noqa: E402
from fastdiff.config import preset_config  # noqa: E402
from fastdiff.ops import native  # noqa: E402
from fastdiff.runtime import MMAP_THRESHOLD, TRIM_THRESHOLD, cpu_choice  # noqa: E402

SETTINGS = ("keep", "default", "warm")
WARM_BLOCK = 31 * 2**20  # under glibc's 32 MiB ceiling for its dynamic mmap threshold


def keep_freed_memory() -> str:
    """`runtime.keep_freed_memory` (what every fastdiff command sets), or exit where it cannot be set."""
    setting = runtime.keep_freed_memory()
    if setting is None:
        raise SystemExit("keep needs glibc's malloc (mallopt), which this process does not have or refused it")
    return setting


def warm_malloc() -> str:
    """glibc's own rules after one freed block just under its 32 MiB ceiling, as a command's loading leaves them:
    glibc mapped the block, and freeing it raised the dynamic mmap threshold to its size (and the trim threshold
    to twice that), so smaller activations are reused from then on."""
    block = torch.ones(WARM_BLOCK // 4)  # float32, every page touched
    del block
    return f"glibc default after one freed {WARM_BLOCK >> 20} MiB block"


def default_candidates() -> str:
    """fastdiff's default on this CPU (`cpu_choice`, native ops where built) and diffusers at its precision."""
    c = cpu_choice()
    ops = "native" if native.available() else "torch"
    layout = "cl" if c.sample_channels_last else "nchw"
    return f"{layout}/{c.sample_amp}/{ops}/{torch.get_num_threads()}t,diffusers/{c.sample_amp}"


def split_label(label: str, batch: int) -> tuple[str, int]:
    """"cl/fp32/native/2t@32" -> (the cpu_defaults candidate, batch 32); without "@", the --batch."""
    name, _, at = label.partition("@")
    return name, int(at) if at else batch


def candidate_grid(only: list[str], batch: int) -> dict[str, dict]:
    """cpu_defaults' candidates by name, with the chunked (.../rN) ones that `only` names."""
    rows = sorted({m.group(1) for label in only if (m := re.search(r"/r(\d+)$", split_label(label, batch)[0]))})
    return {cpu_defaults.name(c): c for c in cpu_defaults.with_rows(
        cpu_defaults.candidates(True, False, torch.get_num_threads()), ",".join(rows))}


def child(setting: str, section: str, only: list[str], args) -> dict:
    """One process: the candidates timed interleaved; per candidate the median ms, page faults per call, and the
    process's peak RSS (of both candidates together)."""
    malloc = {"keep": keep_freed_memory, "warm": warm_malloc}.get(setting, lambda: "glibc default")()
    cfg = preset_config(args.preset)
    grid = candidate_grid(only, args.batch)
    faults: dict[str, list[int]] = {}

    def counted(label, fn):
        def call():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            fn()
            faults[label].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        return call

    fns = {}
    for label in only:
        faults[label] = []
        name, batch = split_label(label, args.batch)
        fns[label] = counted(label, cpu_defaults.build(section, grid[name], cfg, batch, args.timed_steps))
    timings = measure(fns, cpu_defaults.DEVICE, rounds=args.calls, warmup=args.warmup)
    out = {"malloc": malloc, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    for label, t in timings.items():
        timed = faults[label][args.warmup:]
        out[label] = t if isinstance(t, str) else {"median_ms": t.median_ms,
                                                   "faults_per_call": sorted(timed)[len(timed) // 2]}
    return out


def run_process(setting: str, section: str, args, only: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", section, "--setting", setting, "--only", ",".join(only),
           "--preset", args.preset, "--batch", str(args.batch), "--calls", str(args.calls),
           "--warmup", str(args.warmup), "--timed-steps", str(args.timed_steps)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"the {setting} process failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_round(setting: str, section: str, args, only: list[str], r: int) -> dict:
    """One round's processes of `setting`: one with every candidate, or with --apart one per candidate (in
    alternating order), merged into one result whose peak_rss_mib is the largest process's."""
    if not args.apart:
        return run_process(setting, section, args, only)
    merged: dict = {"peak_rss_mib": 0.0}
    for label in only if r % 2 == 0 else only[::-1]:
        res = run_process(setting, section, args, [label])
        own = res[label]
        merged[label] = dict(own, peak_rss_mib=res["peak_rss_mib"]) if isinstance(own, dict) else own
        merged["malloc"] = res["malloc"]
        merged["peak_rss_mib"] = max(merged["peak_rss_mib"], res["peak_rss_mib"])
    return merged


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mnist5k")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--sections", default="sample,train")
    p.add_argument("--rounds", type=int, default=8, help="processes per setting")
    p.add_argument("--calls", type=int, default=5, help="timed rounds of the candidates inside each process")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timed-steps", type=int, default=2, help="DDIM steps per timed sampling call")
    p.add_argument("--only", default=None, help="comma-separated cpu_defaults.py candidates, NAME@BATCH for a "
                                                "batch other than --batch (default: fastdiff's default here "
                                                "and diffusers)")
    p.add_argument("--batches", help="comma-separated batch sizes: every --only candidate at each")
    p.add_argument("--settings", default=",".join(SETTINGS),
                   help="comma-separated malloc settings to compare: keep, default, warm (default: all)")
    p.add_argument("--apart", action="store_true", help="each candidate in a process of its own, so that no two "
                   "share malloc's state (e.g. cpu_defaults' .../rN candidates against the unchunked one)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=Path("runs/cpu-allocator"))
    args = p.parse_args(argv)
    args.only = args.only or default_candidates()
    if args.batches:
        args.only = ",".join(f"{c}@{b}" for c in args.only.split(",") for b in args.batches.split(","))
    only = args.only.split(",")
    settings = tuple(s for s in SETTINGS if s in args.settings.split(","))
    if not settings:
        p.error(f"--settings {args.settings} names none of {', '.join(SETTINGS)}")
    cpu_defaults.check_timed_steps(p, args.timed_steps)
    grid = candidate_grid(only, args.batch)
    unknown = [x for x in only if split_label(x, args.batch)[0] not in grid]
    if unknown:
        p.error(f"--only names no candidate of cpu_defaults.py: {', '.join(unknown)} (names as in its reports, "
                "e.g. cl/bf16/native/2t/r64)")
    if args.child:
        print(json.dumps(child(args.setting, args.child, only, args)))
        return 0
    doc = new_doc(cpu_defaults.DEVICE, title=f"fastdiff malloc setting ({args.preset}, batch {args.batch})",
                  preset=args.preset, notes=[
                      f"{args.rounds} processes per setting, alternating; in each, {args.calls} interleaved rounds "
                      "of the candidates after warm-up; rows: median and p20-p80 of the per-process medians",
                      f"keep: mallopt mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold "
                      f"{TRIM_THRESHOLD >> 30} GiB, set before the candidates are built; default: glibc's own rules",
                      "peak_rss_mib: the candidate's own process with --apart, else the whole process's (all "
                      "candidates in it)" + (" (--apart: one process per candidate)" if args.apart else ""),
                      "sample: DDIM-20 with guidance, images/s extrapolated from the timed steps; train: one step",
                      "vs_*: ratios of images/s (NAME@BATCH: that candidate at that batch)"])
    for section in args.sections.split(","):
        runs: dict[str, list[dict]] = {s: [] for s in settings}
        load0 = os.getloadavg()
        for r in range(args.rounds):
            for setting in settings if r % 2 == 0 else settings[::-1]:
                runs[setting].append(run_round(setting, section, args, only, r))
                print(f"{section} round {r + 1}/{args.rounds} {setting}: "
                      + ", ".join(f"{k} {v['median_ms']:.0f} ms" for k, v in runs[setting][-1].items()
                                  if isinstance(v, dict)), flush=True)
        scale = 20 / args.timed_steps if section == "sample" else 1.0
        med = {}
        for setting in settings:
            for label in only:
                samples = [run[label]["median_ms"] for run in runs[setting] if isinstance(run[label], dict)]
                if not samples:
                    doc["rows"].append(dict(section=section, provider=f"{label} {setting}",
                                            status=runs[setting][0][label]))
                    continue
                m, p20, p80 = median_p20_p80(samples)
                med[(setting, label)] = split_label(label, args.batch)[1] / m  # images per ms: batches compare
                faults = [run[label]["faults_per_call"] for run in runs[setting] if isinstance(run[label], dict)]
                doc["rows"].append(dict(
                    section=section, case=f"{section} {args.preset}", batch=split_label(label, args.batch)[1],
                    provider=f"{label} {setting}",
                    malloc=setting, median_ms=m, p20_ms=p20, p80_ms=p80, processes=len(samples),
                    images_per_s=split_label(label, args.batch)[1] / (m / 1e3 * scale),
                    faults_per_call=median_p20_p80(faults)[0],
                    peak_rss_mib=median_p20_p80([run[label].get("peak_rss_mib", run["peak_rss_mib"])
                                                 for run in runs[setting] if isinstance(run[label], dict)])[0],
                    status="ok"))
        for row in doc["rows"]:
            if row["section"] != section or "median_ms" not in row:
                continue
            label, setting = row["provider"].rsplit(" ", 1)
            rate = med[(setting, label)]  # the ratios are of images/s
            base = med.get(("default", label))
            row["vs_same_default"] = rate / base if base else None
            # against diffusers, and with --apart against the first candidate too
            for ref in [x for x in only if x.startswith("diffusers")] + ([only[0]] if args.apart else []):
                for ref_setting in settings:
                    r = med.get((ref_setting, ref))
                    row[f"vs_{ref}_{ref_setting}"] = rate / r if r else None
        doc.setdefault("load_avg", {})[section] = [round(x, 2) for x in load0 + os.getloadavg()]
        write_reports(doc, args.out, stem="cpu_allocator")
    print((args.out / "cpu_allocator.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
