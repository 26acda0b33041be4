"""Eager sampling with and without padding a batch to its power-of-two bucket, interleaved in one process.

    python benchmarks/eager_padding.py [--checkpoint pretrained:mnist] [--n 100] [--rounds 4]

FastSampler pads a batch to a bucket only when it is compiled or graphed (one specialisation or capture per
bucket); eager, the CPU's default path, runs each batch at its own size. "pad" runs the same eager sampler with
the bucket size forced, as every fast path did before; --n 100 at batch 64 is a batch of 64 and one of 36 (run as
64 when padded). Timed round by round in alternation
(`fastdiff.bench.timing.measure`); prints the median and p20-p80 seconds of each and their ratio as JSON.
"""

from __future__ import annotations

import argparse
import json
import os

import fastdiff.sampling.fast as fast
from fastdiff.bench.timing import measure
from fastdiff.sampling import load_run, sample
from fastdiff.sampling.settings import resolve_settings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="pretrained:mnist")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    den = load_run(args.checkpoint, "cpu")
    settings = resolve_settings(den, steps=args.steps)
    own = fast.FastSampler._bucket

    def padded(self, n, steps):  # the bucket of the padded size: the batch is loaded into it with zero rows
        return own(self, fast.bucket_size(n), steps)

    def run(bucket):
        def call():
            fast.FastSampler._bucket = bucket
            den.fast_samplers.clear()
            try:
                sample(den, settings, n=args.n, seed=0)
            finally:
                fast.FastSampler._bucket = own
        return call

    load = os.getloadavg()
    timings = measure({"pad": run(padded), "no-pad": run(own)}, "cpu", rounds=args.rounds, warmup=0)
    med = {k: t.median_ms / 1e3 for k, t in timings.items()}
    print(json.dumps({"checkpoint": args.checkpoint, "n": args.n, "batch_size": settings.batch_size,
                      "accel": settings.accel.describe(), "load_avg": load, "rounds": args.rounds,
                      "p20_p80_s": {k: [t.p20_ms / 1e3, t.p80_ms / 1e3] for k, t in timings.items()},
                      "median_s": med, "ratio": med["pad"] / med["no-pad"]}))


if __name__ == "__main__":
    main()
