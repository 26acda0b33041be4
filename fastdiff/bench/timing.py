"""Timing that every fastdiff benchmark shares.

GPU: CUDA events around each call after warm-up, the L2 cache flushed before every call for memory-bound
kernels (a write of a buffer larger than L2, outside the timed region), median and the 0.2/0.8 quantiles.
CPU: perf_counter around each call, same statistics. Times are in milliseconds.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int

    def to_dict(self) -> dict:
        return asdict(self)


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _summary(times: list[float]) -> Timing:
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), len(times))


_L2_FLUSH: dict[torch.device, torch.Tensor] = {}


def _flush_buffer(device: torch.device) -> torch.Tensor:
    if device not in _L2_FLUSH:
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 * 2**20)
        _L2_FLUSH[device] = torch.empty(max(2 * l2, 256 * 2**20) // 4, dtype=torch.int32, device=device)
    return _L2_FLUSH[device]


def time_cuda(fn: Callable[[], object], *, warmup_ms: float = 25, rep_ms: float = 100, min_reps: int = 10,
              max_reps: int = 1000, flush_l2: bool = True, device=None) -> Timing:
    device = torch.device(device or "cuda")
    fn()
    torch.cuda.synchronize(device)
    # Estimate one call to size the warm-up and the repetitions.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    est = max(start.elapsed_time(end) / 3, 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        fn()
    reps = int(min(max_reps, max(min_reps, rep_ms / est)))
    buf = _flush_buffer(device) if flush_l2 else None
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if buf is not None:
            buf.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    return _summary([s.elapsed_time(e) for s, e in zip(starts, ends)])


def time_cpu(fn: Callable[[], object], *, warmup: int = 2, rep_s: float = 1.0, min_reps: int = 3,
             max_reps: int = 200) -> Timing:
    for _ in range(warmup):
        fn()
    times: list[float] = []
    budget_end = time.perf_counter() + rep_s
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() < budget_end):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _summary(times)


def time_fn(fn: Callable[[], object], device, **kw) -> Timing:
    """Median-of-many time of fn() on `device` (CUDA events on a GPU, wall clock on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return time_cuda(fn, device=device, **{k: v for k, v in kw.items() if k in _CUDA_KW})
    return time_cpu(fn, **{k: v for k, v in kw.items() if k in _CPU_KW})


def time_calls(fn: Callable[[], object], device, *, warmup: int = 1, reps: int = 5,
               region: Callable[[], contextlib.AbstractContextManager] | None = None) -> Timing:
    """Median-of-`reps` time of long calls (end-to-end sampling or training steps), after `warmup` calls.

    No L2 flush (each call moves far more than L2). On a GPU each call is bracketed by CUDA events; on the CPU by
    perf_counter. `region()` is entered around the timed calls only (telemetry sampling).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    times: list[float] = []
    with region() if region is not None else contextlib.nullcontext():
        if cuda:
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
            for start, end in events:
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize(device)
            times = [start.elapsed_time(end) for start, end in events]
        else:
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
    return _summary(times)


_CUDA_KW = {"warmup_ms", "rep_ms", "min_reps", "max_reps", "flush_l2"}
_CPU_KW = {"warmup", "rep_s", "min_reps", "max_reps"}


def copy_bandwidth_gbs(nbytes: int, device) -> float:
    """Measured device copy bandwidth in GB/s, counting the bytes read plus the bytes written."""
    device = torch.device(device)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / (t.median_ms * 1e-3) / 1e9
