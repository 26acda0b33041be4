"""Eager sampling with and without padding a batch to its power-of-two bucket, interleaved in one process.

    python benchmarks/eager_padding.py [--checkpoint pretrained:mnist] [--n 100] [--rounds 4]

FastSampler pads a batch to a bucket only when it is compiled or graphed (one specialisation or capture per
bucket); eager, the CPU's default path, runs each batch at its own size. "pad" runs the same eager sampler with
the bucket size forced, as every fast path did before; --n 100 at batch 64 is a batch of 64 and one of 36 (run as
64 when padded). Prints the median seconds of each and their ratio as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import fastdiff.sampling.fast as fast
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

    seconds = {"pad": [], "no-pad": []}
    load = os.getloadavg()
    for _ in range(args.rounds):
        for key, bucket in (("pad", padded), ("no-pad", own)):
            fast.FastSampler._bucket = bucket
            den.fast_samplers.clear()
            t0 = time.perf_counter()
            sample(den, settings, n=args.n, seed=0)
            seconds[key].append(time.perf_counter() - t0)
    fast.FastSampler._bucket = own
    med = {k: statistics.median(v) for k, v in seconds.items()}
    print(json.dumps({"checkpoint": args.checkpoint, "n": args.n, "batch_size": settings.batch_size,
                      "accel": settings.accel.describe(), "load_avg": load, "seconds": seconds, "median_s": med,
                      "ratio": med["pad"] / med["no-pad"]}))


if __name__ == "__main__":
    main()
