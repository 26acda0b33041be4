"""Benchmark group_norm_silu: torch-eager, torch-compile and fastdiff-triton in one run (see fastdiff/bench/ops.py).

    python benchmarks/bench_group_norm_silu.py [--quick] [--device cuda]

Prints a table, then a JSON document (environment, git commit, one row per provider and shape) as the last line.
"""

from fastdiff.bench.ops import main

if __name__ == "__main__":
    main(("group_norm_silu", "group_norm_silu_fwd_bwd"))
