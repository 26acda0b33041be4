"""Native extension vs torch-eager on the CPU: sampling images/s for the digits and mnist presets, and op rows.

    python benchmarks/bench_native_cpu.py                      # both presets, batch 64, DDIM 10 steps
    python benchmarks/bench_native_cpu.py --threads 1 --clock thread   # kernel efficiency on a busy machine
    python benchmarks/bench_native_cpu.py --layouts nchw channels_last --etas 1   # channels_last models too

Needs the extension (`make ext`). Prints a table, then a JSON document (environment: CPU model, load, commit) as
the last line; --out also writes bench.json and bench.md there. See fastdiff/bench/native.py for what each row
measures.
"""

from __future__ import annotations

import argparse

import torch

from fastdiff.bench.native import PRESETS, run_native_benchmarks
from fastdiff.bench.report import emit, new_doc
from fastdiff.errors import FastdiffError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", choices=list(PRESETS), default=list(PRESETS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps of the e2e rows")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds per provider")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall",
                        help="thread: CPU time of the calling thread (use with --threads 1 on a shared machine)")
    parser.add_argument("--etas", nargs="+", type=float, default=[0.0, 1.0], help="DDIM eta of the e2e rows")
    parser.add_argument("--layouts", nargs="+", choices=["nchw", "channels_last"], default=["nchw"],
                        help="memory formats of the e2e and UNet-forward rows (nchw is the baseline)")
    parser.add_argument("--no-op-rows", action="store_true", help="e2e rows only")
    parser.add_argument("--quick", action="store_true", help="digits only, batch 4, one step, one round (seconds)")
    parser.add_argument("--out", help="also write bench.json and bench.md into this folder")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    doc = new_doc("cpu", title="fastdiff native extension vs torch-eager (CPU)", threads=torch.get_num_threads(),
                  clock=args.clock)
    try:
        doc["rows"] = run_native_benchmarks("cpu", args.quick, presets=args.presets, batch=args.batch,
                                            steps=args.steps, rounds=args.rounds, clock=args.clock,
                                            etas=tuple(args.etas), layouts=tuple(args.layouts),
                                            op_rows=not args.no_op_rows)
    except FastdiffError as e:  # bad options (layouts without nchw, no extension): one line, no traceback
        parser.error(" ".join(str(e).split()))
    emit(doc, args.out)


if __name__ == "__main__":
    main()
