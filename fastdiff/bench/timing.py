"""The one timer of every fastdiff benchmark: providers measured round by round, in alternation.

On a shared or throttling machine the load drifts during a benchmark; alternating the providers exposes each to
the same drift, so their ratio stays meaningful where back-to-back blocks would not. Each round starts one provider
later than the last and odd rounds run backwards (A B C, C B A, B C A, B A C, ...), so that no provider always
runs first or always after the same one (whose caches, allocator state and clocks it would inherit). Warm-up
calls (compilation and CUDA-graph capture included) are timed apart and never enter the statistics. On a GPU
each call is bracketed by CUDA events (optionally after flushing the L2 cache, outside the timed region, for
memory-bound kernels); on the CPU by perf_counter, or by the calling thread's CPU time (clock="thread", immune to
other processes taking the core, meaningful only for work on that thread alone). A provider's time per round is
the mean of its `reps` calls; its summary is the median and the 0.2/0.8 quantiles over rounds, in milliseconds.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Hashable

import torch

from fastdiff.runtime import synchronize

CLOCKS = ("wall", "thread")
ROUND_MS = 20.0  # reps=None: calls per round sized so that one provider's round takes about this long
STOPPED = "skipped: time budget (before its warm-up)"


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    rounds: int
    reps: int  # calls per round
    warmup_s: float  # wall time of the warm-up calls (compile and capture included)
    peak_mem_mb: float | None = None  # CUDA: peak memory the warm-up calls allocated above what was allocated before

    def to_dict(self) -> dict:
        return asdict(self)


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median_p20_p80(xs: list[float]) -> tuple[float, float, float]:
    """The median and the 20th and 80th percentiles (interpolated) of a benchmark's samples."""
    return statistics.median(xs), _quantile(xs, 0.2), _quantile(xs, 0.8)


_L2_FLUSH: dict[torch.device, torch.Tensor] = {}


def _flush_buffer(device: torch.device) -> torch.Tensor:
    if device not in _L2_FLUSH:
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 * 2**20)
        _L2_FLUSH[device] = torch.empty(max(2 * l2, 256 * 2**20) // 4, dtype=torch.int32, device=device)
    return _L2_FLUSH[device]


def _round_ms(fn: Callable[[], object], device: torch.device, reps: int, now, flush) -> float:
    """Mean milliseconds of `reps` calls of fn()."""
    if device.type != "cuda":
        t0 = now()
        for _ in range(reps):
            fn()
        return (now() - t0) * 1e3 / reps
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    stream = torch.cuda.current_stream(device)  # the stream fn's work goes to (record() alone: the current GPU's)
    torch.cuda.synchronize(device)
    for start, end in events:
        if flush is not None:
            flush.zero_()
        start.record(stream)
        fn()
        end.record(stream)
    torch.cuda.synchronize(device)
    return statistics.fmean(start.elapsed_time(end) for start, end in events)


def _warm_up(fn: Callable[[], object], device: torch.device, warmup: int) -> tuple[float, float | None]:
    cuda = device.type == "cuda"
    resident = 0
    if cuda:  # what is allocated already (the other providers' models and state, the L2 flush buffer) is not fn's
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    synchronize(device)
    peak = round((torch.cuda.max_memory_allocated(device) - resident) / 2**20, 1) if cuda and warmup else None
    return time.perf_counter() - t0, peak


def error_status(e: BaseException) -> str:
    """The status of a row whose provider raised: one line, the exception's type and first line."""
    return f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def measure(fns: dict[Hashable, Callable[[], object]], device, *, rounds: int = 5, warmup: int = 1,
            reps: int | None = 1, flush_l2: bool = False, clock: str = "wall",
            telemetry: contextlib.AbstractContextManager | None = None,
            on_warm: Callable[[Hashable, float], None] | None = None,
            stop: Callable[[], bool] | None = None) -> dict[Hashable, Timing | str]:
    """Time every fn of `fns` (name -> callable) in alternation; see the module docstring.

    reps=None sizes each provider's calls per round from one call after its warm-up (about ROUND_MS a round).
    `telemetry` is entered around the rounds only; where it has a `tag` attribute, that is set to the name of
    the provider being timed (so its readings can be told apart). `on_warm(name, seconds)` is called as each
    provider's warm-up ends (a log line as it happens: a run killed later still shows where its time went).
    `stop()` is asked before each provider's warm-up but the first: once it says so, the providers not yet warm
    are skipped (STOPPED) and the warm ones are timed, so a time limit costs a job its remaining compiles, not
    the rows it has already paid for. A provider that raises is dropped from the remaining rounds and gets
    `error_status` instead of a Timing: one broken provider must not lose the others.
    """
    device = torch.device(device)
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    if device.type == "cuda" and clock == "thread":
        raise ValueError("clock='thread' measures CPU work; use clock='wall' on a GPU")
    now = time.thread_time if clock == "thread" else time.perf_counter
    flush = _flush_buffer(device) if flush_l2 and device.type == "cuda" else None
    failed: dict[Hashable, str] = {}
    warm, per_round = {}, {}
    for k, (name, fn) in enumerate(fns.items()):
        if k > 0 and stop is not None and stop():
            failed[name] = STOPPED
            continue
        try:
            warm[name] = _warm_up(fn, device, warmup)
            if on_warm is not None:
                on_warm(name, warm[name][0])
            per_round[name] = reps or max(1, min(1000, int(ROUND_MS / max(_round_ms(fn, device, 1, now, flush),
                                                                          1e-3))))
        except Exception as e:  # noqa: BLE001 - reported in the provider's row
            failed[name] = error_status(e)
    times: dict[Hashable, list[float]] = {name: [] for name in fns if name not in failed}
    with telemetry if telemetry is not None else contextlib.nullcontext():
        for r in range(rounds):
            names = list(times)
            names = names[r % len(names):] + names[:r % len(names)] if names else names
            for name in [n for n in (names[::-1] if r % 2 else names) if n not in failed]:
                if hasattr(telemetry, "tag"):
                    telemetry.tag = name
                try:
                    times[name].append(_round_ms(fns[name], device, per_round[name], now, flush))
                except Exception as e:  # noqa: BLE001 - as above
                    failed[name] = error_status(e)
            if hasattr(telemetry, "tag"):
                telemetry.tag = None
    out: dict[Hashable, Timing | str] = {}
    for name in fns:
        if name in failed:
            out[name] = failed[name]
            continue
        ts = times[name]
        out[name] = Timing(*median_p20_p80(ts), rounds, per_round[name],
                           round(warm[name][0], 3), warm[name][1])
    return out


def copy_bandwidth_gbs(nbytes: int, device, rounds: int = 5) -> float:
    """Measured device copy bandwidth in GB/s, counting the bytes read plus the bytes written."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = measure({"copy": lambda: dst.copy_(src)}, device, rounds=rounds, reps=None)["copy"]
    return 2 * src.numel() * 4 / (t.median_ms * 1e-3) / 1e9
