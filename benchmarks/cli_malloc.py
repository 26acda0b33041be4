"""A fastdiff command as a user runs it, keeping freed memory (as every command does) and with glibc's own rules.

    python benchmarks/cli_malloc.py --out DIR -- eval --checkpoint pretrained:mnist --n 1000 --no-progress
    python benchmarks/cli_malloc.py --fresh runs/tmp-train --out DIR -- train --preset mnist5k --steps 200 \
        --out runs/tmp-train --no-progress
    python benchmarks/cli_malloc.py --vs "--max-rows 64" --out DIR -- eval --checkpoint pretrained:mnist --n 1000

Every `fastdiff` command first has glibc's malloc keep freed memory (`fastdiff.runtime.keep_freed_memory`): `keep`
runs the command as it ships, `default` with FASTDIFF_MALLOC=default, which leaves glibc's own rules (glibc's
MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ are removed from both environments). The command runs `--rounds`
times in each setting, in alternating order, each run a fresh process. A row gives the median and p20-p80 of the
images/s the command reports (its JSON's `images_per_sec`: sampling only, or training's last logged window), of its
wall time, and of its peak RSS (the process's own, from wait4). `same_output` says whether the commands printed the
same results apart from timings and memory (the setting must not change a sample or a loss).

With `--vs ARGS`, the command as typed runs against the command with ARGS added, both as they ship (malloc kept),
in the same alternation: a CLI default against a flag that overrides it. `same_output` then compares the results
apart from timings and the options ARGS set (`accel`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fastdiff.bench.report import new_doc, write_reports
from fastdiff.bench.timing import median_p20_p80
from fastdiff.runtime import MMAP_THRESHOLD, TRIM_THRESHOLD

SETTINGS = ("keep", "default")
GLIBC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "FASTDIFF_MALLOC")
# the fields of a command's JSON that may differ between runs (timings, memory, the clock, `fastdiff env`'s malloc)
VARYING = ("seconds", "images_per_sec", "setup_seconds", "sec_per_kimg", "peak_mem_mb", "time", "malloc")


def run_once(setting: str, command: list[str], fresh: Path | None = None) -> dict:
    """One fresh process of the command: its wall time, reported images/s, JSON result and own peak RSS.
    `fresh`: a folder removed first (a training run's --out)."""
    if fresh is not None:
        shutil.rmtree(fresh, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k not in GLIBC_VARIABLES}
    if setting == "default":
        env["FASTDIFF_MALLOC"] = "default"
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "fastdiff", *command], env=env, stdout=out, stderr=err,
                                text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage (its peak RSS)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise SystemExit(f"fastdiff {' '.join(command)} failed ({setting}):\n{err.read()[-2000:]}")
        result = json.loads(out.read().strip().splitlines()[-1])
    return {"wall_s": wall, "images_per_s": result.get("images_per_sec"), "result": result,
            "peak_rss_mib": usage.ru_maxrss / 1024}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="runs per setting")
    p.add_argument("--out", type=Path, default=Path("runs/cli-malloc"))
    p.add_argument("--fresh", type=Path, help="a folder to remove before each run (the --out of a train command)")
    p.add_argument("--vs", help="extra arguments: the command as typed against the command with these added, "
                   "both keeping freed memory, instead of kept malloc against glibc's rules")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the fastdiff command and its arguments")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("name the fastdiff command after --")
    if args.vs is not None and not args.vs.split():
        p.error("--vs needs the arguments to add, e.g. --vs \"--max-rows 64\"")
    # each setting: (malloc setting, arguments added to the command)
    settings = ({"as typed": ("keep", []), f"with {args.vs}": ("keep", args.vs.split())} if args.vs else
                {s: (s, []) for s in SETTINGS})
    title = f"as typed against with {args.vs}" if args.vs else "malloc kept against glibc's rules"
    doc = new_doc("cpu", title=f"fastdiff {command[0]}: {title}", notes=[
        f"{args.rounds} fresh processes per setting, alternating; rows: median and p20-p80 over them",
        f"keep: the command as it ships (mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold "
        f"{TRIM_THRESHOLD >> 30} GiB); default: FASTDIFF_MALLOC=default, glibc's own rules",
        "images_per_s: the command's own figure (sampling time only); wall_s: the whole process"])
    names = list(settings)
    runs: dict[str, list[dict]] = {s: [] for s in names}
    load0 = os.getloadavg()
    for r in range(args.rounds):
        for setting in names if r % 2 == 0 else names[::-1]:
            malloc, extra = settings[setting]
            runs[setting].append(run_once(malloc, command + extra, args.fresh))
            last = runs[setting][-1]
            print(f"round {r + 1}/{args.rounds} {setting}: {last['wall_s']:.1f} s, {last['images_per_s']} images/s",
                  flush=True)
    varying = VARYING + (("accel",) if args.vs else ())
    strip = lambda res: {k: v for k, v in res.items() if k not in varying}  # noqa: E731
    same = all(strip(x["result"]) == strip(runs[names[0]][0]["result"]) for s in names for x in runs[s])
    rates = {}
    for setting in names:
        row = {"section": command[0], "case": " ".join(command + settings[setting][1]),
               "provider": f"fastdiff {setting}", "malloc": settings[setting][0], "processes": len(runs[setting]),
               "same_output": same, "status": "ok"}
        for key in ("images_per_s", "wall_s", "peak_rss_mib"):
            values = [x[key] for x in runs[setting] if x[key] is not None]
            if values:
                m, p20, p80 = median_p20_p80(values)
                row.update({key: m, f"{key}_p20_p80": f"{p20:.4g}-{p80:.4g}"})
        rates[setting] = row.get("images_per_s")
        doc["rows"].append(row)
    first, second = names
    if rates[first] and rates[second]:
        doc["rows"][0][f"{first}_vs_{second}".replace(" ", "_")] = rates[first] / rates[second]
    doc["load_avg"] = [round(x, 2) for x in load0 + os.getloadavg()]
    doc["last_result"] = runs[first][-1]["result"]
    write_reports(doc, args.out, stem="cli_malloc")
    print((args.out / "cli_malloc.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
