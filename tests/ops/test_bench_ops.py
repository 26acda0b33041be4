"""The op benchmark harness behind `fastdiff bench` and benchmarks/bench_*.py (quick mode on the CPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdiff.bench.ops import Case, format_table, measure_case, run_op_benchmarks


def test_quick_run_on_cpu_reports_every_op():
    rows = run_op_benchmarks("cpu", quick=True)
    assert {r["op"] for r in rows} == {"group_norm_silu", "group_norm_silu_fwd_bwd", "sampler_step",
                                       "timestep_embedding"}
    for r in rows:
        assert r["status"] == "ok" and r["provider"] == "torch-eager"
        assert r["median_ms"] > 0 and r["gbps"] == pytest.approx(r["bytes"] / r["median_ms"] / 1e6)
        assert r["vs_torch_eager"] == pytest.approx(1.0) and r["frac_copy_bw"] > 0
    assert "GB/s" in format_table(rows).splitlines()[0]


def test_ratios_come_from_the_same_run():
    x = torch.zeros(1024)
    slow = lambda: [x.add(1) for _ in range(20)]  # noqa: E731
    fast = lambda: x.add(1)  # noqa: E731
    broken = lambda: 1 / 0  # noqa: E731
    case = Case("demo", (1024,), torch.float32, 8192, "2 * 4096", {"torch-eager": slow, "fastdiff-triton": fast,
                                                                  "torch-compile": broken})
    rows = {r["provider"]: r for r in measure_case(case, torch.device("cpu"), 10.0, quick=True)}
    assert rows["torch-compile"]["status"].startswith("failed: ZeroDivisionError")
    assert rows["fastdiff-triton"]["vs_torch_eager"] == pytest.approx(
        rows["torch-eager"]["median_ms"] / rows["fastdiff-triton"]["median_ms"])
    assert rows["fastdiff-triton"]["vs_torch_compile"] is None


def test_script_prints_a_table_then_json():
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_timestep_embedding.py"
    out = subprocess.run([sys.executable, str(script), "--quick", "--device", "cpu"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    doc = json.loads(lines[-1])
    assert doc["rows"] and doc["rows"][0]["op"] == "timestep_embedding" and "provider" in lines[0]
