import time

from fastdiff.bench.timing import _quantile, copy_bandwidth_gbs, time_fn


def test_quantiles():
    assert _quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert _quantile([1.0, 2.0], 0.2) == 1.2


def test_cpu_timing_measures_sleep():
    t = time_fn(lambda: time.sleep(0.002), "cpu", rep_s=0.05, min_reps=5)
    assert 1.9 <= t.median_ms < 20 and t.p20_ms <= t.median_ms <= t.p80_ms and t.reps >= 5


def test_copy_bandwidth_positive():
    assert copy_bandwidth_gbs(1 << 20, "cpu") > 0
