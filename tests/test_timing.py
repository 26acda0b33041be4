import time

import pytest
import torch

from fastdiff.bench.timing import STOPPED, _quantile, copy_bandwidth_gbs, measure


def test_quantiles():
    assert _quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert _quantile([1.0, 2.0], 0.2) == 1.2


def test_cpu_timing_measures_sleep():
    t = measure({"sleep": lambda: time.sleep(0.002)}, "cpu", rounds=5)["sleep"]
    assert 1.9 <= t.median_ms < 20 and t.p20_ms <= t.median_ms <= t.p80_ms and t.rounds >= 5


def test_a_stop_skips_the_providers_not_yet_warm():
    asked = []
    out = measure({"a": lambda: None, "b": lambda: None, "c": lambda: None}, "cpu", rounds=2,
                  stop=lambda: asked.append(1) or True)
    assert out["a"].rounds == 2 and out["b"] == out["c"] == STOPPED and len(asked) == 2  # the first always runs


def test_copy_bandwidth_positive():
    assert copy_bandwidth_gbs(1 << 20, "cpu") > 0


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_timing_measures_work_on_a_device_that_is_not_current():
    torch.cuda.set_device(0)

    def spin():  # about 5 ms of GPU time on cuda:1's stream (torch.cuda._sleep spins for a count of cycles)
        with torch.cuda.device(1):
            torch.cuda._sleep(10_000_000)

    t = measure({"spin": spin}, "cuda:1", rounds=3)["spin"]
    assert t.median_ms > 1.0, t  # events recorded on cuda:0's stream would see next to nothing


def test_rounds_rotate_and_reverse_the_providers_order():
    # A B C in every round put A first and B after A always (inheriting A's caches and allocator state); each
    # round now starts one later and odd rounds run backwards.
    order = []
    fns = {k: (lambda k=k: order.append(k)) for k in "ABC"}
    measure(fns, "cpu", rounds=6, warmup=0)
    rounds = ["".join(order[i:i + 3]) for i in range(0, 18, 3)]
    assert rounds == ["ABC", "ACB", "CAB", "CBA", "BCA", "BAC"]
    assert sorted(r[0] for r in rounds) == ["A", "A", "B", "B", "C", "C"]
