"""The evidence for fastdiff's CPU defaults: every candidate fast path of a preset's UNet, interleaved in one process.

    python benchmarks/cpu_defaults.py --out benchmarks/results/DIR            # sampling and training, A/B
    python benchmarks/cpu_defaults.py --memory --out DIR                      # peak RSS, one process per candidate
    python benchmarks/cpu_defaults.py --compile --out DIR                     # adds torch.compile (Inductor C++)

A candidate is a layout (nchw | cl: channels_last), a precision (fp32 | bf16 autocast), an op backend (torch: the
reference ops | native: fastdiff._C, where built) and a thread count; `diffusers` is UNet2DModel on the same weights
(`fastdiff.bench.diffusers_ref.twin`) at the same sampler settings. Sampling is DDIM-20 with the preset's guidance
(each timed call runs `--timed-steps` steps; images/s is extrapolated to 20), training one full optimisation step
(loss, backward, clip, AdamW, LR schedule, EMA) on a fixed batch. Every candidate is timed round by round in
alternation (`fastdiff.bench.timing.measure`), so the machine's drift hits all alike; the rows give the median and
p20-p80 of wall time and, as a cross-check that other processes inflate less, of the process's CPU time per call.
The chosen default (`fastdiff.runtime.cpu_choice`) is named in the report.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from fastdiff.bench.e2e import SampleCase, SampleInputs, base_unet, sampler_for, train_batch, train_step_for
from fastdiff.bench.report import new_doc, write_reports
from fastdiff.bench.timing import measure, median_p20_p80
from fastdiff.config import preset_config
from fastdiff.ops import native, use_backend
from fastdiff.runtime import AccelOptions, cpu_choice

DEVICE = torch.device("cpu")


def candidates(with_native: bool, with_compile: bool, threads: int) -> list[dict]:
    """The A/B grid: layout x precision x op backend at `threads`, the plain path at 1 thread, diffusers."""
    grid = []
    for ops in ("torch", "native") if with_native else ("torch",):
        for amp in ("fp32", "bf16"):
            for layout in ("nchw", "cl"):
                grid.append(dict(layout=layout, amp=amp, ops=ops, threads=threads, compile=False))
    if threads > 1:
        grid.append(dict(layout="nchw", amp="fp32", ops="torch", threads=1, compile=False))
    if with_compile:
        grid += [dict(layout=layout, amp=amp, ops=ops, threads=threads, compile=True)
                 for ops in (("torch", "native") if with_native else ("torch",))
                 for layout in ("nchw", "cl") for amp in ("fp32", "bf16")]
    grid += [dict(layout="nchw", amp=amp, ops="diffusers", threads=threads, compile=False) for amp in ("fp32", "bf16")]
    return grid


def with_rows(grid: list[dict], rows: str | None) -> list[dict]:
    """The grid plus each fastdiff candidate with its sampling calls chunked to each of `rows` (comma-separated)."""
    extra = [int(r) for r in rows.split(",")] if rows else []
    return grid + [dict(c, rows=r) for c in grid if c["ops"] != "diffusers" for r in extra]


def name(c: dict) -> str:
    batch = f"/b{c['batch']}" if "batch" in c else ""
    if c["ops"] == "diffusers":
        return f"diffusers/{c['amp']}{batch}"
    rows = f"/r{c['rows']}" if c.get("rows") else ""
    return f"{c['layout']}/{c['amp']}/{c['ops']}{'/compile' if c['compile'] else ''}/{c['threads']}t{rows}{batch}"


def _options(c: dict) -> AccelOptions:
    return AccelOptions(channels_last=c["layout"] == "cl", amp=c["amp"], compile=c["compile"],
                        max_rows=c.get("rows", 0))


def build(section: str, c: dict, cfg, batch: int, timed_steps: int):
    """The callable of one timed call of candidate c."""
    base = base_unet(cfg)
    provider = "diffusers" if c["ops"] == "diffusers" else "fastdiff"
    if section == "sample":
        inputs = SampleInputs(cfg, DEVICE, batch)
        case = SampleCase("ddim", 20, timed_steps)
        fn = sampler_for(provider, c["amp"], base, inputs, None if provider == "diffusers" else _options(c))(case)
    else:
        x0, labels = train_batch(cfg, batch, DEVICE)
        fn, _ = train_step_for(provider, c["amp"], base, cfg, DEVICE, x0, labels,
                               None if provider == "diffusers" else _options(c), channels_last=c["layout"] == "cl")
    backend = "torch" if c["ops"] in ("torch", "diffusers") else "native"
    cpu_ms: list[float] = []

    def call():
        torch.set_num_threads(c["threads"])
        t0 = time.process_time()
        with use_backend(backend):
            fn()
        cpu_ms.append((time.process_time() - t0) * 1e3)

    call.cpu_ms = cpu_ms
    return call


def check_timed_steps(p: argparse.ArgumentParser, steps: int) -> None:
    """--timed-steps within DDIM-20's steps: more doubled images/s (the scale is 20 / steps), 0 divided by zero
    after all the timing."""
    if not 1 <= steps <= 20:
        p.error(f"--timed-steps {steps} must be in [1, 20] (steps of the DDIM-20 run)")


def ab(section: str, cfg, args, grid: list[dict], doc: dict, out: Path) -> None:
    fns = {name(c): build(section, c, cfg, c.get("batch", args.batch), args.timed_steps) for c in grid}
    load0 = os.getloadavg()
    timings = measure(fns, DEVICE, rounds=args.rounds, warmup=args.warmup)
    threads = max(c["threads"] for c in grid)
    torch.set_num_threads(threads)
    scale = 20 / args.timed_steps if section == "sample" else 1.0  # seconds of a whole DDIM-20 run per timed call
    for c in grid:
        key, t = name(c), timings[name(c)]
        at = f"/b{c['batch']}" if "batch" in c else ""  # --batches: the references at the row's own batch
        ref = {amp: timings.get(f"diffusers/{amp}{at}") for amp in ("fp32", "bf16")}
        plain = timings.get(f"nchw/fp32/torch/{threads}t{at}")
        batch = c.get("batch", args.batch)
        row = dict(section=section, preset=args.preset, batch=batch, case=f"{section} {args.preset}",
                   provider=key, layout=c["layout"], dtype=c["amp"], threads=c["threads"])
        if isinstance(t, str):
            doc["rows"].append({**row, "status": t})
            continue
        cpu = fns[key].cpu_ms[args.warmup:]  # the warm-up calls come first
        cpu_med, cpu20, cpu80 = median_p20_p80(cpu)
        row.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, rounds=t.rounds, warmup_s=t.warmup_s,
                   images_per_s=batch / (t.median_ms / 1e3 * scale), cpu_ms=cpu_med,
                   cpu_spread=f"{cpu20:.4g}-{cpu80:.4g}", status="ok")
        if not isinstance(plain, str) and plain is not None:
            row["vs_plain"] = plain.median_ms / t.median_ms
        for amp, r in ref.items():
            if r is not None and not isinstance(r, str):
                row[f"vs_diffusers_{amp}"] = r.median_ms / t.median_ms
        doc["rows"].append(row)
    doc.setdefault("load_avg", {})[section] = [round(x, 2) for x in load0 + os.getloadavg()]
    write_reports(doc, out, stem="cpu_defaults")


def memory(section: str, args, grid: list[dict]) -> dict[str, float]:
    """Peak RSS (MiB) of each candidate, each in a fresh process (diffusers imported in every one, so the
    baselines match), running warm-up + 3 calls."""
    peaks = {}
    for c in grid:
        cmd = [sys.executable, __file__, "--one", name(c), "--section", section, "--preset", args.preset,
               "--batch", str(args.batch), "--timed-steps", str(args.timed_steps)] + (
                   ["--rows", args.rows] if args.rows else [])
        res = subprocess.run(cmd, capture_output=True, text=True)
        lines = res.stdout.strip().splitlines()
        peaks[name(c)] = float(lines[-1]) if res.returncode == 0 and lines else float("nan")
    return peaks


def run_one(label: str, section: str, cfg, args) -> None:
    import diffusers  # noqa: F401 - every memory process imports it, so that baselines match

    grid = {name(c): c for c in with_rows(candidates(True, True, torch.get_num_threads()), args.rows)}
    fn = build(section, grid[label], cfg, args.batch, args.timed_steps)
    for _ in range(4):
        fn()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mnist5k")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--sections", default="sample,train")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timed-steps", type=int, default=2, help="DDIM steps per timed sampling call")
    p.add_argument("--compile", action="store_true", help="add torch.compile candidates (minutes of compiling)")
    p.add_argument("--no-native", action="store_true")
    p.add_argument("--batches", help="comma-separated batch sizes: every candidate at each (images/s compares them)")
    p.add_argument("--rows", help="comma-separated AccelOptions.max_rows values: each fastdiff candidate also with "
                   "its sampling calls chunked to that many model rows (named .../rN)")
    p.add_argument("--only", help="comma-separated candidate names to keep (as in the report's provider column)")
    p.add_argument("--memory", action="store_true", help="peak RSS per candidate instead of timing")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--section", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=Path("runs/cpu-defaults"))
    args = p.parse_args(argv)
    cfg = preset_config(args.preset)
    if args.one:
        run_one(args.one, args.section, cfg, args)
        return 0
    grid = with_rows(candidates(native.available() and not args.no_native, args.compile, torch.get_num_threads()),
                     args.rows)
    if args.only:
        keep = args.only.split(",")
        grid = [c for c in grid if name(c) in keep]
        if not grid:
            p.error(f"--only {args.only} names no candidate")
    check_timed_steps(p, args.timed_steps)
    if args.batches and args.memory:
        p.error("--memory measures at --batch only; run it once per batch instead of --batches")
    if args.batches:
        grid = [dict(c, batch=int(b)) for c in grid for b in args.batches.split(",")]
    doc = new_doc(DEVICE, title=f"fastdiff CPU defaults ({args.preset}, batch {args.batch})", preset=args.preset,
                  chosen=cpu_choice().to_dict(), notes=[
                      "candidates timed interleaved, round by round, in one process; median and p20-p80 over rounds",
                      "sample: DDIM-20 with the preset's guidance (classifier-free: two model rows per image), "
                      f"{args.timed_steps} steps timed per call, images/s extrapolated to 20 steps",
                      "cpu_ms: CPU time of the whole process per call (all threads), the cross-check of wall time",
                      "diffusers: UNet2DModel + DDIMScheduler on the same weights and settings"])
    for section in args.sections.split(","):
        if args.memory:
            peaks = doc.setdefault("peak_rss_mib", {})[section] = memory(section, args, grid)
            doc["rows"] += [dict(section=section, preset=args.preset, batch=args.batch, provider=key,
                                 layout=c["layout"], dtype=c["amp"], peak_rss_mib=peaks[key],
                                 status="failed" if math.isnan(peaks[key]) else "ok")
                            for c in grid for key in [name(c)]]
            write_reports(doc, args.out, stem="cpu_defaults")
        else:
            ab(section, cfg, args, grid, doc, args.out)
    print((args.out / "cpu_defaults.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
