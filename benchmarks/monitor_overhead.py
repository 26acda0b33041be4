"""What the training monitors cost: short `fastdiff train` runs with and without them, alternated.

    python benchmarks/monitor_overhead.py --out runs/monitor-overhead

"on": EMA sample grids at every checkpoint, stats.png at the logging intervals (redrawn at most every
`fastdiff.train.monitor.PLOT_MIN_INTERVAL_S` seconds) and --tensorboard; "off": --sample-every 0, no TensorBoard,
and stats.png disabled by making its redraw interval infinite. The runs alternate (off, on, off, on, ...) so the
machine's drift hits both alike. Reported per run: the wall time of the whole command and the median images/s
of its logging intervals (stats.jsonl, which times the training steps only), then the medians over runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

OFF_ENV = "FASTDIFF_BENCH_NO_PLOT"  # read by the child below only: the product code has no such switch


def child(argv: list[str]) -> int:
    """One `fastdiff train`, with stats.png switched off when OFF_ENV is set."""
    if os.environ.get(OFF_ENV):
        from fastdiff.train import monitor

        monitor.PLOT_MIN_INTERVAL_S = float("inf")
        monitor.plot_stats = lambda *a, **k: None
    from fastdiff.cli import main

    return main(argv)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mnist5k")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("runs/monitor-overhead"))
    p.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        return child(args.child)
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    results: dict[str, list[dict]] = {"off": [], "on": []}
    for i in range(args.pairs):
        for mode in ("off", "on"):
            run = args.out / f"{mode}-{i}"
            flags = ["train", "--preset", args.preset, "--out", str(run), "--steps", str(args.steps),
                     "--log-every", "10", "--ckpt-every", str(max(args.steps // 2, 1)), "--no-progress"]
            flags += ["--tensorboard"] if mode == "on" else ["--sample-every", "0"]
            env = {**os.environ, **({OFF_ENV: "1"} if mode == "off" else {})}
            t0 = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--child", *flags], env=env, check=True, capture_output=True)
            wall = time.perf_counter() - t0
            stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
            ips = statistics.median(r["images_per_sec"] for r in stats[1:])  # the first interval holds warm-up
            results[mode].append({"wall_s": round(wall, 2), "images_per_sec": round(ips, 1),
                                  "grids": len(list((run / "samples").glob("*.png"))) if mode == "on" else 0})
            print(mode, i, results[mode][-1], flush=True)
    summary = {mode: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "images_per_sec")}
               for mode, rs in results.items()}
    summary["on_vs_off_images_per_sec"] = summary["on"]["images_per_sec"] / summary["off"]["images_per_sec"]
    summary["on_vs_off_wall"] = summary["on"]["wall_s"] / summary["off"]["wall_s"]
    doc = {"preset": args.preset, "steps": args.steps, "load_avg": os.getloadavg(), "runs": results,
           "summary": summary}
    (args.out / "monitor_overhead.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
