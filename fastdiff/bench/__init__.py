"""The benchmark suite behind `fastdiff bench` (timing, providers, reports)."""
