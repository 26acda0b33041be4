import time

from fastdiff.bench.timing import _quantile, copy_bandwidth_gbs, measure


def test_quantiles():
    assert _quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert _quantile([1.0, 2.0], 0.2) == 1.2


def test_cpu_timing_measures_sleep():
    t = measure({"sleep": lambda: time.sleep(0.002)}, "cpu", rounds=5)["sleep"]
    assert 1.9 <= t.median_ms < 20 and t.p20_ms <= t.median_ms <= t.p80_ms and t.rounds >= 5


def test_copy_bandwidth_positive():
    assert copy_bandwidth_gbs(1 << 20, "cpu") > 0
