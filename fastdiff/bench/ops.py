"""Micro-benchmarks of the fused ops: torch-eager, torch-compile, fastdiff (the Triton kernel) and fastdiff-native
side by side, interleaved round by round (`timing.measure`, L2 flushed before every call on a GPU).

Every row names the op, provider, shape, dtype, median time (and the 0.2/0.8 quantiles), the bytes the op must
move by a stated formula, the GB/s that makes, and the share of the device's copy bandwidth measured in the same
run (read + write); `report.add_ratios` adds the speed ratios to torch-eager and torch-compile of the same case.

The cases are declared beside each op's kernel (`@op(..., bench=...)`, `fastdiff.ops.dispatch.BenchCase`) and read from
the op registry, so a new op needs no edit here. `run_op_benchmarks(device, quick, part)` is what `fastdiff bench`
calls; part "headline" is the cases marked so (the GroupNorm+SiLU forward at one GPU-filling size in NCHW and
channels_last, and the sampler step at one), "rest" everything else. On a GPU the full run uses tensors of 64 MB or
more; `quick` uses small shapes and, on the CPU, torch-eager alone (compiling and the Triton interpreter take far longer
than a quick run may use), so it only checks that the harness works there.
fastdiff-native runs wherever the extension is built; elsewhere its rows say why they were skipped. A case may
declare variants, other ways of running the Triton path (GroupNorm+SiLU's "looped" path where the default
splits a group into chunks): each is a provider of its own, `fastdiff[<name>]`, timed in the same rounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

import fastdiff.ops  # noqa: F401 - registers every op (REGISTRY) and the torch.ops.fastdiff ops they call
from fastdiff.bench.report import add_ratios, emit, new_doc
from fastdiff.bench.timing import copy_bandwidth_gbs, measure
from fastdiff.ops import native
from fastdiff.ops.dispatch import REGISTRY, BenchCase, Op, triton_available, triton_interpreting
from fastdiff.runtime import AccelOptions, compile_fn

PARTS = ("all", "headline", "rest")


@dataclass
class Case:
    """One op at one shape: a callable per provider and the bytes one call must move."""

    op: str
    shape: tuple
    dtype: torch.dtype
    nbytes: int
    byte_formula: str
    providers: dict[str, Callable[[], object]]
    note: str = ""
    skipped: dict[str, str] = field(default_factory=dict)  # provider -> why it has no callable here


def _native_skipped(device) -> dict[str, str]:
    reason = native.unavailable_reason(device)
    return {"fastdiff-native": f"skipped: {reason}"} if reason else {}


def _within(context, fn):
    def call():
        with context():
            return fn()
    return call


def _providers(eager, triton_fn, device, quick, native_fn=None, wrap=lambda f: f, variants=None) -> dict:
    """eager/compile/fastdiff/native callables (each through `wrap`); compile and the Triton kernel only where
    they can run in the time allowed, native where the extension is built for the device. variants: name ->
    context selecting another way of running the Triton path, each a provider `fastdiff[<name>]` after fastdiff."""
    out = {"torch-eager": wrap(eager)}
    if not (quick and device.type == "cpu"):
        # As the e2e rows compile (`runtime.compile_fn`): static shapes, so that each case's size gets kernels of
        # its own instead of the dynamic-shape ones torch.compile turns to once one function has seen two sizes.
        out["torch-compile"] = wrap(compile_fn(eager, AccelOptions(compile=True)))
        if triton_available() and (device.type == "cuda" or triton_interpreting()):
            out["fastdiff"] = wrap(triton_fn)
            out.update({f"fastdiff[{name}]": _within(context, wrap(triton_fn))
                        for name, context in (variants or {}).items()})
    if native_fn is not None and not _native_skipped(device):
        out["fastdiff-native"] = wrap(native_fn)
    return out


def _build(spec: Op, declared: BenchCase, device, quick) -> Case:
    """The timed case of one declared case: the op's reference (eager and compiled), its Triton path and its native
    kernel on the declared inputs, through autograd when the case times the backward."""
    args = declared.inputs(device)
    if declared.backward:
        leaves = [a.requires_grad_() for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
        dy = torch.randn_like(args[0])

        def wrap(fn):
            return lambda: torch.autograd.grad(fn(*args), leaves, dy)
    else:
        def wrap(fn):
            return lambda: fn(*args)

    native_fn = getattr(native, spec.native) if spec.native else None
    name = spec.name + ("_fwd_bwd" if declared.backward else "")
    providers = _providers(spec.reference, spec.triton, device, quick, native_fn, wrap, declared.variants)
    return Case(name, declared.shape, declared.dtype, declared.nbytes, declared.byte_formula, providers,
                declared.note, _native_skipped(device) if spec.native else {})


def _declared(quick: bool) -> dict[str, list[tuple[Op, BenchCase]]]:
    """Every registered op's declared cases by row name (`<op>` and `<op>_fwd_bwd`), in registration order."""
    out: dict[str, list[tuple[Op, BenchCase]]] = {}
    for spec in REGISTRY.values():
        for declared in spec.bench(quick) if spec.bench else ():
            out.setdefault(spec.name + ("_fwd_bwd" if declared.backward else ""), []).append((spec, declared))
    return out


def op_names() -> tuple[str, ...]:
    """The names `ops` may hold: every registered op with benchmark cases (and `<op>_fwd_bwd` where declared)."""
    return tuple(_declared(quick=True))


def default_cases(device: torch.device, quick: bool, ops=None, part: str = "all") -> list[Callable[[], Case]]:
    """Case builders (lazy, so one case's tensors are freed before the next is built), headline cases first. The
    cases are the ones each op declares beside its kernel (`@op(..., bench=...)`); ops: a subset of `op_names()`."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    declared = _declared(quick)
    ops = tuple(declared) if ops is None else ops
    unknown = set(ops) - set(declared)
    if unknown:
        raise ValueError(f"unknown op(s) {sorted(unknown)}; choose from {', '.join(declared)}")
    headline, rest = [], []
    for name in ops:
        for spec, case in declared[name]:
            (headline if case.headline else rest).append(lambda s=spec, c=case: _build(s, c, device, quick))
    return {"all": headline + rest, "headline": headline, "rest": rest}[part]


def measure_case(case: Case, device: torch.device, copy_gbs: float, quick: bool) -> list[dict]:
    """Time every provider of one case, interleaved; GB/s, the copy share and the ratios from this same run."""
    dtype = str(case.dtype).split(".")[-1]
    base = {"section": "op", "op": case.op, "shape": list(case.shape), "dtype": dtype, "note": case.note,
            "device": device.type, "case": f"{case.op} {list(case.shape)} {dtype} {case.note}".strip()}
    timings = measure(case.providers, device, rounds=3 if quick else 10, reps=None, flush_l2=True)
    rows = []
    for name, t in timings.items():
        row = {**base, "provider": name, "bytes": case.nbytes, "byte_formula": case.byte_formula}
        if isinstance(t, str):
            rows.append({**row, "status": t})
            continue
        gbs = case.nbytes / (t.median_ms * 1e-3) / 1e9
        rows.append({**row, **t.to_dict(), "gb_per_s": gbs, "frac_copy_bw": gbs / copy_gbs if copy_gbs else None,
                     "copy_gb_per_s": copy_gbs, "status": "ok"})
    rows += [{**base, "provider": name, "status": status} for name, status in case.skipped.items()]
    add_ratios(rows)
    return rows


def iter_op_benchmarks(device, quick: bool = False, ops=None, part: str = "all", stop=lambda: False):
    """Yield the rows of each case as soon as it is timed (a report rewritten per row keeps them when a time limit
    ends the run); `stop()` is asked before each case, and once it says so the rest yield one skipped row.

    Dynamo is reset after every case: each case compiles the same reference function at a new size, and from
    the ninth (torch's recompile limit) a fullgraph compile would fail instead of compiling again. (FastSampler
    raises the limit around its calls instead, see `fastdiff.sampling.fast.RECOMPILE_LIMIT`; here that would add
    its cost to every call of the torch-compile baseline.) The copy bandwidth is measured before the first case
    that runs."""
    device = torch.device(device)
    copy_gbs = None
    builders = default_cases(device, quick, ops, part)
    for k, build in enumerate(builders):
        if stop():
            yield {"section": "op", "op": f"{part} op rows ({len(builders) - k} cases left)",
                   "status": "skipped: time budget"}
            return
        if copy_gbs is None:
            copy_gbs = copy_bandwidth_gbs((8 if quick else 512) * 2**20, device)
        case = build()
        try:
            yield from measure_case(case, device, copy_gbs, quick)
        finally:
            del case
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()


def run_op_benchmarks(device, quick: bool = False, ops=None, part: str = "all") -> list[dict]:
    """Benchmark the fused ops on `device`; one row per (case, provider). See the module docstring."""
    return list(iter_op_benchmarks(device, quick, ops, part))


def main(ops, argv=None) -> dict:
    """The command line of the thin `benchmarks/bench_<op>.py` scripts: a table, then a JSON document."""
    import argparse

    ap = argparse.ArgumentParser(description=f"Benchmark {', '.join(ops)}: torch-eager, torch-compile, fastdiff "
                                             "(Triton), fastdiff-native")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small shapes (a few seconds on the CPU)")
    ap.add_argument("--out", help="also write bench.json and bench.md into this folder")
    args = ap.parse_args(argv)
    doc = new_doc(args.device, title=f"fastdiff op benchmark: {', '.join(ops)}", benchmark=list(ops),
                  quick=args.quick)
    doc["rows"] = run_op_benchmarks(args.device, quick=args.quick, ops=ops)
    emit(doc, args.out)
    return doc
