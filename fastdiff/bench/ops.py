"""Micro-benchmarks of the fused ops: torch-eager, torch-compile, fastdiff (the Triton kernel) and fastdiff-native
side by side, interleaved round by round (`timing.measure`, L2 flushed before every call on a GPU).

Every row names the op, provider, shape, dtype, median time (and the 0.2/0.8 quantiles), the bytes the op must
move by a stated formula, the GB/s that makes, and the share of the device's copy bandwidth measured in the same
run (read + write); `report.add_ratios` adds the speed ratios to torch-eager and torch-compile of the same case.

`run_op_benchmarks(device, quick, part)` is what `fastdiff bench` calls; part "headline" is the GroupNorm+SiLU
forward and the sampler step at one GPU-filling size each, "rest" everything else. On a GPU the full run uses
tensors of 64 MB or more; `quick` uses small shapes and, on the CPU, torch-eager alone (compiling and the Triton
interpreter take far longer than a quick run may use), so it only checks that the harness works there.
fastdiff-native runs wherever the extension is built; elsewhere its rows say why they were skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

import fastdiff.ops  # noqa: F401 - registers the torch.ops.fastdiff ops the Triton providers call
from fastdiff import reference
from fastdiff.bench.report import add_ratios, emit, new_doc
from fastdiff.bench.timing import copy_bandwidth_gbs, measure
from fastdiff.ops import native
from fastdiff.ops.dispatch import triton_available, triton_interpreting

OPS = ("group_norm_silu", "group_norm_silu_fwd_bwd", "sampler_step", "timestep_embedding")
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


def _providers(eager, triton_fn, device, quick, native_fn=None, wrap=lambda f: f) -> dict:
    """eager/compile/fastdiff/native callables (each through `wrap`); compile and the Triton kernel only where
    they can run in the time allowed, native where the extension is built for the device."""
    out = {"torch-eager": wrap(eager)}
    if not (quick and device.type == "cpu"):
        out["torch-compile"] = wrap(torch.compile(eager))
        if triton_available() and (device.type == "cuda" or triton_interpreting()):
            out["fastdiff"] = wrap(triton_fn)
    if native_fn is not None and not _native_skipped(device):
        out["fastdiff-native"] = wrap(native_fn)
    return out


def group_norm_silu_case(device, shape, dtype, groups=32, channels_last=False, backward=False, quick=False) -> Case:
    x = torch.randn(shape, device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.randn(shape[1], device=device, dtype=dtype), torch.randn(shape[1], device=device, dtype=dtype)
    numel, item = x.numel(), x.element_size()

    def triton_fn(x, num_groups, w, b):
        return torch.ops.fastdiff.group_norm_silu_fwd(x, w, b, num_groups, 1e-5)[0]

    note = "channels_last" if channels_last else ""
    if not backward:
        return Case("group_norm_silu", shape, dtype, 2 * numel * item, "2 * numel * itemsize (read x, write y)",
                    _providers(reference.group_norm_silu, triton_fn, device, quick, native.group_norm_silu,
                               wrap=lambda f: lambda: f(x, groups, w, b)), note, _native_skipped(device))
    for t in (x, w, b):
        t.requires_grad_()
    dy = torch.randn_like(x)

    def fwd_bwd(fn):
        return lambda: torch.autograd.grad(fn(x, groups, w, b), (x, w, b), dy)

    return Case("group_norm_silu_fwd_bwd", shape, dtype, 5 * numel * item,
                "5 * numel * itemsize (fwd: read x, write y; bwd: read x, dy, write dx)",
                _providers(reference.group_norm_silu, triton_fn, device, quick, native.group_norm_silu, wrap=fwd_bwd),
                note, _native_skipped(device))


def sampler_step_case(device, shape, dtype, quick=False) -> Case:
    n = shape[0]
    x, out = torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype)
    p, q, A, B, sigma = (torch.rand(n, device=device) + 0.1 for _ in range(5))
    args = (x, out, p, q, A, B, sigma, torch.arange(n, device=device), torch.tensor(7, device=device))
    return Case("sampler_step", shape, dtype, 3 * x.numel() * x.element_size(),
                "3 * numel * itemsize (read x, model_out; write x_prev; noise drawn in-kernel)",
                _providers(lambda: reference.sampler_step(*args), lambda: torch.ops.fastdiff.sampler_step(
                    *args, 0, None, False), device, quick, lambda: native.sampler_step(*args)),
                "sigma > 0, step from a device tensor", _native_skipped(device))


def timestep_embedding_case(device, batch, dim, quick=False) -> Case:
    t = torch.randint(0, 1000, (batch,), device=device)
    return Case("timestep_embedding", (batch, dim), torch.float32, batch * dim * 4 + batch * t.element_size(),
                "batch * dim * 4 + batch * 8 (read t, write the float32 table)",
                _providers(lambda: reference.timestep_embedding(t, dim),
                           lambda: torch.ops.fastdiff.timestep_embedding(t, dim, 10000.0), device, quick))


def default_cases(device: torch.device, quick: bool, ops=OPS, part: str = "all") -> list[Callable[[], Case]]:
    """Case builders (lazy, so one case's tensors are freed before the next is built), headline cases first."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    bf16, fp32 = torch.bfloat16, torch.float32
    if quick:
        gn, steps, temb = [((4, 64, 16, 16), fp32, False)], [((16, 3, 32, 32), fp32)], [(256, 128)]
    else:  # >= 64 MB per activation tensor
        gn = [((32, 256, 64, 64), bf16, False), ((32, 256, 64, 64), bf16, True), ((32, 256, 64, 64), fp32, False),
              ((128, 128, 32, 32), bf16, False), ((8, 128, 256, 256), bf16, False)]
        steps = [((512, 3, 128, 128), fp32), ((512, 3, 128, 128), bf16), ((1024, 4, 64, 64), fp32)]
        temb = [(65536, 256), (1024, 128)]
    unknown = set(ops) - set(OPS)
    if unknown:
        raise ValueError(f"unknown op(s) {sorted(unknown)}; choose from {', '.join(OPS)}")
    headline, rest = [], []
    for op in ops:
        if op.startswith("group_norm_silu"):
            builders = [lambda s=s, d=d, cl=cl, bw=op.endswith("bwd"):
                        group_norm_silu_case(device, s, d, channels_last=cl, backward=bw, quick=quick)
                        for s, d, cl in gn]
        elif op == "sampler_step":
            builders = [lambda s=s, d=d: sampler_step_case(device, s, d, quick=quick) for s, d in steps]
        else:
            builders = [lambda b=b, d=d: timestep_embedding_case(device, b, d, quick=quick) for b, d in temb]
        first = op in ("group_norm_silu", "sampler_step")  # the bandwidth rows the GPU suite leads with
        headline += builders[:1] if first else []
        rest += builders[1:] if first else builders
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


def run_op_benchmarks(device, quick: bool = False, ops=OPS, part: str = "all") -> list[dict]:
    """Benchmark the fused ops on `device`; one row per (case, provider). See the module docstring."""
    device = torch.device(device)
    copy_gbs = copy_bandwidth_gbs((8 if quick else 512) * 2**20, device)
    rows = []
    for build in default_cases(device, quick, ops, part):
        case = build()
        rows += measure_case(case, device, copy_gbs, quick)
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


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
