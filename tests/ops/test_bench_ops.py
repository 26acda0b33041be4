"""The op benchmark harness behind `fastdiff bench` and benchmarks/bench_*.py (quick mode on the CPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdiff.bench import ops as bench_ops
from fastdiff.bench.ops import Case, default_cases, measure_case, op_names, run_op_benchmarks
from fastdiff.bench.report import table
from fastdiff.ops import dispatch, native


def test_quick_run_on_cpu_reports_every_op():
    rows = run_op_benchmarks("cpu", quick=True)
    assert {r["op"] for r in rows} == {"group_norm_silu", "group_norm_silu_fwd_bwd", "sampler_step",
                                       "timestep_embedding"}
    # torch-eager alone on the CPU, and the native kernels (timed where fastdiff._C is built, else skipped with
    # the reason) for the ops they implement.
    assert {r["provider"] for r in rows if r["op"] == "timestep_embedding"} == {"torch-eager"}
    for r in rows:
        if r["provider"] == "fastdiff-native":
            assert r["op"] != "timestep_embedding"
            assert r["status"] == "ok" if native.available() else r["status"].startswith("skipped: ")
            continue
        assert r["status"] == "ok" and r["provider"] == "torch-eager"
        assert r["median_ms"] > 0 and r["gb_per_s"] == pytest.approx(r["bytes"] / r["median_ms"] / 1e6)
        assert r["vs_torch_eager"] == pytest.approx(1.0) and r["frac_copy_bw"] > 0
    assert "GB/s" in table(rows).splitlines()[0]


def test_headline_cases_lead():
    # The GPU suite's bandwidth rows come first: the GroupNorm+SiLU forward in NCHW (the target) and in
    # channels_last (the layout the GPU's sampling and training run), and the sampler step.
    cpu = torch.device("cpu")
    assert [build().op for build in default_cases(cpu, quick=True, part="headline")] == ["group_norm_silu",
                                                                                          "sampler_step"]
    declared = bench_ops._declared(quick=False)
    headline = [(name, c.shape, c.dtype, c.note) for name, cases in declared.items() for _, c in cases if c.headline]
    assert headline == [("group_norm_silu", (32, 256, 64, 64), torch.bfloat16, ""),
                        ("group_norm_silu", (32, 256, 64, 64), torch.bfloat16, "channels_last"),
                        ("sampler_step", (512, 3, 128, 128), torch.float32, "sigma > 0, step from a device tensor"),
                        ("sampler_step", (512, 3, 128, 128), torch.bfloat16, "sigma > 0, step from a device tensor")]
    assert len(default_cases(cpu, quick=False, part="rest")) + 4 == len(default_cases(cpu, quick=False))


def test_every_op_target_is_a_headline_case():
    # The 5-minute GPU suite reaches the other op rows last, if at all: a target's row there reads "not measured"
    from fastdiff.bench.targets import targets_for

    declared = bench_ops._declared(quick=False)
    headline = [(name, list(c.shape), str(c.dtype).removeprefix("torch."), c.note)
                for name, cases in declared.items() for _, c in cases if c.headline]
    for target in targets_for("cuda"):
        row = target.row
        if row["section"] == "op":
            assert any((name, shape, dtype) == (row["op"], row["shape"], row["dtype"])
                       and row.get("note", note) == note for name, shape, dtype, note in headline), (
                target.what)


def test_a_registered_op_is_benchmarked_from_its_own_declaration(monkeypatch):
    # A new op declares its cases beside its kernel (@op(..., bench=...)); the harness needs no edit for it.
    def cases(quick):
        inputs = lambda device: (torch.ones(8, device=device), 2.0)  # noqa: E731
        return [dispatch.BenchCase((8,), torch.float32, inputs, 64, "2 * numel * 4"),
                dispatch.BenchCase((8,), torch.float32, inputs, 96, "3 * numel * 4", backward=True)]

    spec = dispatch.Op("scale", torch.mul, torch.mul, bench=cases)
    monkeypatch.setitem(dispatch.REGISTRY, "scale", spec)
    assert op_names()[-2:] == ("scale", "scale_fwd_bwd")
    fwd, bwd = (build() for build in default_cases(torch.device("cpu"), quick=True, ops=("scale", "scale_fwd_bwd")))
    assert (fwd.op, fwd.nbytes, fwd.skipped) == ("scale", 64, {}) and fwd.providers["torch-eager"]()[0] == 2.0
    grads = bwd.providers["torch-eager"]()  # autograd.grad over the tensor arguments (x; not the factor 2.0)
    assert bwd.op == "scale_fwd_bwd" and len(grads) == 1 and grads[0].shape == (8,)
    with pytest.raises(ValueError, match="unknown op"):
        default_cases(torch.device("cpu"), quick=True, ops=("scal",))


def test_op_rows_come_case_by_case_past_the_recompile_limit(monkeypatch):
    """Each case compiles the same reference at a new size: past torch's recompile limit a fullgraph compile fails,
    so Dynamo starts afresh per case. Rows come as each case ends, and a stop skips the remaining cases."""
    import functools

    from fastdiff.bench import ops as bench_ops
    from fastdiff.runtime import AccelOptions

    def cases(quick):
        def inputs(n):
            return lambda device: (torch.ones(n, device=device), 2.0)

        return [dispatch.BenchCase((n,), torch.float32, inputs(n), 8 * n, "2 * numel * 4") for n in (3, 5, 7)]

    monkeypatch.setitem(dispatch.REGISTRY, "scale", dispatch.Op("scale", torch.mul, torch.mul, bench=cases))
    monkeypatch.setattr(bench_ops, "AccelOptions", functools.partial(AccelOptions, compile_backend="eager"))
    monkeypatch.setattr(bench_ops, "copy_bandwidth_gbs", lambda nbytes, device: 1.0)  # not 512 MiB of copies
    with torch._dynamo.config.patch(recompile_limit=2):  # torch's is 8; a GPU run has 9 cases of one reference
        rows = bench_ops.run_op_benchmarks("cpu", quick=False, ops=("scale",))
    compiled = [r for r in rows if r["provider"] == "torch-compile"]
    assert [r["shape"] for r in compiled] == [[3], [5], [7]] and {r["status"] for r in compiled} == {"ok"}
    seen = []
    rows = bench_ops.iter_op_benchmarks("cpu", quick=True, ops=("scale",), stop=lambda: len(seen) > 0)
    for row in rows:
        seen.append(row)
    assert [r["shape"] for r in seen[:-1]] == [[3]] and seen[-1] == {
        "section": "op", "op": "all op rows (2 cases left)", "status": "skipped: time budget"}


def test_ratios_come_from_the_same_run():
    x = torch.zeros(1024)
    slow = lambda: [x.add(1) for _ in range(20)]  # noqa: E731
    fast = lambda: x.add(1)  # noqa: E731
    broken = lambda: 1 / 0  # noqa: E731
    case = Case("demo", (1024,), torch.float32, 8192, "2 * 4096", {"torch-eager": slow, "fastdiff": fast,
                                                                  "torch-compile": broken})
    rows = {r["provider"]: r for r in measure_case(case, torch.device("cpu"), 10.0, quick=True)}
    assert rows["torch-compile"]["status"].startswith("error: ZeroDivisionError")
    assert rows["fastdiff"]["vs_torch_eager"] == pytest.approx(
        rows["torch-eager"]["median_ms"] / rows["fastdiff"]["median_ms"])
    assert "vs_torch_compile" not in rows["fastdiff"]


def test_script_prints_a_table_then_json():
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_timestep_embedding.py"
    out = subprocess.run([sys.executable, str(script), "--quick", "--device", "cpu"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    doc = json.loads(lines[-1])
    assert doc["rows"] and doc["rows"][0]["op"] == "timestep_embedding" and "provider" in lines[0]


def test_path_variants_are_providers_of_their_own(monkeypatch):
    # GroupNorm+SiLU's headline case also times the paths the default does not take, each inside its context.
    import importlib

    gn = importlib.import_module("fastdiff.ops.group_norm_silu")  # the module (fastdiff.ops exports the function)

    monkeypatch.setattr(bench_ops, "triton_interpreting", lambda: True)
    headline = next(c for spec, c in bench_ops._declared(quick=False)["group_norm_silu"] if c.headline)
    other = "looped" if gn.SPLIT_BY_DEFAULT else "split"
    assert list(headline.variants) == [other]
    out = bench_ops._providers(torch.neg, lambda: gn._forced, torch.device("cpu"), False,
                               variants=headline.variants)
    assert list(out) == ["torch-eager", "torch-compile", "fastdiff", f"fastdiff[{other}]"]
    assert out["fastdiff"]() is None and out[f"fastdiff[{other}]"]() == other and gn._forced is None
    # a case whose groups fit one program has no variants
    assert not gn._path_variants((128, 128, 32, 32), 32, False)
    assert list(gn._path_variants((32, 256, 64, 64), 32, True)) == [other]
