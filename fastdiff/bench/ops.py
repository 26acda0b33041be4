"""Micro-benchmarks of the fused ops: torch-eager, torch-compile, fastdiff-triton and fastdiff-native side by side
in one run.

Every row names the op, provider, shape, dtype, median time (and the 0.2/0.8 quantiles), the bytes the op must
move by a stated formula, the GB/s that makes, the fraction of the device's copy bandwidth measured in the same
run (`timing.copy_bandwidth_gbs`, read + write), and the speed ratio to torch-eager and torch-compile
(`vs_torch_eager` = eager time / this time). torch-eager is the plain PyTorch reference of `fastdiff.reference`.

`run_op_benchmarks(device, quick)` is what `fastdiff bench` calls. On a GPU the full run uses tensors of 64 MB or
more; `quick` uses small shapes and, on the CPU, torch-eager alone (compiling and the Triton interpreter take far
longer than the few seconds a quick run may use), so it only checks that the harness works there. fastdiff-native
(the kernels of the optional extension fastdiff._C, for group_norm_silu and sampler_step) runs wherever it is
built, quick runs included; where it is not built its rows say why they were skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

import torch

from fastdiff import reference
from fastdiff.bench.report import git_commit
from fastdiff.bench.timing import copy_bandwidth_gbs, time_fn

PROVIDERS = ("torch-eager", "torch-compile", "fastdiff-triton", "fastdiff-native")
OPS = ("group_norm_silu", "group_norm_silu_fwd_bwd", "sampler_step", "timestep_embedding")


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


def _triton_usable(device: torch.device) -> bool:
    from fastdiff.ops.dispatch import triton_available, triton_interpreting

    return triton_available() and (device.type == "cuda" or triton_interpreting())


def _providers(eager, triton_fn, device, quick, native_fn=None) -> dict:
    """eager/compile/triton/native callables; compile and triton only where they can run in the time allowed,
    native where the extension is built for the device (see `_native_skipped`)."""
    out = {"torch-eager": eager}
    if not (quick and device.type == "cpu"):
        out["torch-compile"] = torch.compile(eager)
        if _triton_usable(device):
            out["fastdiff-triton"] = triton_fn
    if native_fn is not None and not _native_skipped(device):
        out["fastdiff-native"] = native_fn
    return out


def _native_skipped(device) -> dict[str, str]:
    """{"fastdiff-native": why} when the native kernels cannot run on `device`, else {}."""
    from fastdiff.ops import native

    reason = native.unavailable_reason(device)
    return {"fastdiff-native": f"skipped: {reason}"} if reason else {}


def group_norm_silu_case(device, shape, dtype, groups=32, channels_last=False, backward=False, quick=False) -> Case:
    from fastdiff.ops.group_norm_silu import _group_norm_silu_fwd_op  # noqa: F401 - registers torch.ops.fastdiff

    x = torch.randn(shape, device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    C = shape[1]
    w = torch.randn(C, device=device, dtype=dtype)
    b = torch.randn(C, device=device, dtype=dtype)
    numel, item = x.numel(), x.element_size()

    def triton_fn(x, num_groups, w, b):
        return torch.ops.fastdiff.group_norm_silu_fwd(x, w, b, num_groups, 1e-5)[0]

    def native_fn(x, num_groups, w, b):
        from fastdiff.ops import native

        return native.group_norm_silu(x, num_groups, w, b)

    note = "channels_last" if channels_last else ""
    if not backward:
        eager = lambda: reference.group_norm_silu(x, groups, w, b)  # noqa: E731
        providers = _providers(eager, lambda: triton_fn(x, groups, w, b), device, quick,
                               lambda: native_fn(x, groups, w, b))
        return Case("group_norm_silu", shape, dtype, 2 * numel * item, "2 * numel * itemsize (read x, write y)",
                    providers, note, _native_skipped(device))
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    dy = torch.randn_like(x)

    def fwd_bwd(fn):
        return lambda: torch.autograd.grad(fn(x, groups, w, b), (x, w, b), dy)

    providers = {"torch-eager": fwd_bwd(reference.group_norm_silu)}
    if not (quick and device.type == "cpu"):
        providers["torch-compile"] = fwd_bwd(torch.compile(reference.group_norm_silu))
        if _triton_usable(device):
            providers["fastdiff-triton"] = fwd_bwd(triton_fn)
    if not _native_skipped(device):
        providers["fastdiff-native"] = fwd_bwd(native_fn)
    return Case("group_norm_silu_fwd_bwd", shape, dtype, 5 * numel * item,
                "5 * numel * itemsize (fwd: read x, write y; bwd: read x, dy, write dx)", providers, note,
                _native_skipped(device))


def sampler_step_case(device, shape, dtype, quick=False) -> Case:
    from fastdiff.ops.sampler_step import _sampler_step_op  # noqa: F401 - registers torch.ops.fastdiff

    n = shape[0]
    x = torch.randn(shape, device=device, dtype=dtype)
    out = torch.randn(shape, device=device, dtype=dtype)
    p, q, A, B, sigma = (torch.rand(n, device=device) + 0.1 for _ in range(5))
    seeds = torch.arange(n, device=device)
    step = torch.tensor(7, device=device)
    args = (x, out, p, q, A, B, sigma, seeds)
    eager = lambda: reference.sampler_step(*args, step)  # noqa: E731
    triton_fn = lambda: torch.ops.fastdiff.sampler_step(*args, step, 0, None, False)  # noqa: E731

    def native_fn():
        from fastdiff.ops import native

        return native.sampler_step(*args, step)

    return Case("sampler_step", shape, dtype, 3 * x.numel() * x.element_size(),
                "3 * numel * itemsize (read x, model_out; write x_prev; noise drawn in-kernel)",
                _providers(eager, triton_fn, device, quick, native_fn), "sigma > 0, step from a device tensor",
                _native_skipped(device))


def timestep_embedding_case(device, batch, dim, quick=False) -> Case:
    from fastdiff.ops.timestep_embedding import _timestep_embedding_op  # noqa: F401 - registers the op

    t = torch.randint(0, 1000, (batch,), device=device)
    eager = lambda: reference.timestep_embedding(t, dim)  # noqa: E731
    triton_fn = lambda: torch.ops.fastdiff.timestep_embedding(t, dim, 10000.0)  # noqa: E731
    return Case("timestep_embedding", (batch, dim), torch.float32, batch * dim * 4 + batch * t.element_size(),
                "batch * dim * 4 + batch * 8 (read t, write the float32 table)",
                _providers(eager, triton_fn, device, quick))


def default_cases(device: torch.device, quick: bool, ops=OPS) -> list[Callable[[], Case]]:
    """Case builders (lazy, so one case's tensors are freed before the next is built)."""
    bf16, fp32 = torch.bfloat16, torch.float32
    if quick:
        gn = [((4, 64, 16, 16), fp32, False)]
        steps = [((16, 3, 32, 32), fp32)]
        temb = [(256, 128)]
    else:  # >= 64 MB per activation tensor
        gn = [((32, 256, 64, 64), bf16, False), ((32, 256, 64, 64), bf16, True), ((32, 256, 64, 64), fp32, False),
              ((128, 128, 32, 32), bf16, False), ((8, 128, 256, 256), bf16, False)]
        steps = [((512, 3, 128, 128), fp32), ((512, 3, 128, 128), bf16), ((1024, 4, 64, 64), fp32)]
        temb = [(65536, 256), (1024, 128)]
    builders = []
    for op in ops:
        if op in ("group_norm_silu", "group_norm_silu_fwd_bwd"):
            for shape, dtype, cl in gn:
                builders.append(lambda s=shape, d=dtype, cl=cl, bw=op.endswith("bwd"):
                                group_norm_silu_case(device, s, d, channels_last=cl, backward=bw, quick=quick))
        elif op == "sampler_step":
            builders += [lambda s=s, d=d: sampler_step_case(device, s, d, quick=quick) for s, d in steps]
        elif op == "timestep_embedding":
            builders += [lambda b=b, d=d: timestep_embedding_case(device, b, d, quick=quick) for b, d in temb]
        else:
            raise ValueError(f"unknown op {op!r}; choose from {', '.join(OPS)}")
    return builders


def measure_case(case: Case, device: torch.device, copy_gbs: float, quick: bool) -> list[dict]:
    """Time every provider of one case and fill in GB/s and the ratios measured in this same run."""
    kw = {"rep_s": 0.05, "warmup": 1, "min_reps": 3} if device.type == "cpu" and quick else {}
    rows = []
    for name, fn in case.providers.items():
        row = {"op": case.op, "provider": name, "shape": list(case.shape), "dtype": str(case.dtype).split(".")[-1],
               "bytes": case.nbytes, "byte_formula": case.byte_formula, "note": case.note, "device": device.type}
        try:
            t = time_fn(fn, device, **kw)
        except Exception as e:  # noqa: BLE001 - one provider failing (e.g. a compile error) must not end the run
            row.update(status=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            rows.append(row)
            continue
        gbs = case.nbytes / (t.median_ms * 1e-3) / 1e9
        row.update(t.to_dict(), status="ok", gbps=gbs, frac_copy_bw=gbs / copy_gbs if copy_gbs else None)
        rows.append(row)
    for name, status in case.skipped.items():
        rows.append({"op": case.op, "provider": name, "shape": list(case.shape),
                     "dtype": str(case.dtype).split(".")[-1], "note": case.note, "device": device.type,
                     "status": status})
    times = {r["provider"]: r["median_ms"] for r in rows if r["status"] == "ok"}
    for r in rows:
        if r["status"] == "ok":
            for base, key in (("torch-eager", "vs_torch_eager"), ("torch-compile", "vs_torch_compile")):
                r[key] = times[base] / r["median_ms"] if base in times else None
    return rows


def run_op_benchmarks(device, quick: bool = False, ops=OPS) -> list[dict]:
    """Benchmark the fused ops on `device`; returns one dict per (case, provider). See the module docstring."""
    device = torch.device(device)
    copy_bytes = (8 if quick else 512) * 2**20
    copy_gbs = copy_bandwidth_gbs(copy_bytes, device)
    rows = []
    for build in default_cases(device, quick, ops):
        case = build()
        rows += measure_case(case, device, copy_gbs, quick)
        for r in rows[-(len(case.providers) + len(case.skipped)):]:
            r["copy_gbps"] = copy_gbs
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


COLUMNS = [("op", "op"), ("provider", "provider"), ("shape", "shape"), ("dtype", "dtype"), ("note", "note"),
           ("median_ms", "ms"), ("gbps", "GB/s"), ("frac_copy_bw", "of copy"), ("vs_torch_eager", "vs eager"),
           ("vs_torch_compile", "vs compile"), ("status", "status")]


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    if isinstance(v, list):
        return "x".join(str(d) for d in v)
    return str(v)


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table of benchmark rows."""
    cells = [[h for _, h in COLUMNS]] + [[_cell(r.get(k)) for k, _ in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])


def main(ops, argv=None) -> dict:
    """The command line of the thin `benchmarks/bench_<op>.py` scripts: a table, then a JSON document."""
    import argparse

    from fastdiff.envinfo import collect

    ap = argparse.ArgumentParser(description=f"Benchmark {', '.join(ops)}: torch-eager, torch-compile, triton, native")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small shapes (a few seconds on the CPU)")
    args = ap.parse_args(argv)
    rows = run_op_benchmarks(args.device, quick=args.quick, ops=ops)
    print(format_table(rows))
    doc = {"benchmark": list(ops), "quick": args.quick, "environment": collect(), "git": git_commit()["commit"],
           "rows": rows}
    print(json.dumps(doc, default=str))
    return doc
