"""`fastdiff bench` pieces: telemetry, timing of long calls, ratios and reports, and a tiny end-to-end run."""

import json
import time
from pathlib import Path

import pytest
import torch

from fastdiff.bench import diffusers_ref
from fastdiff.bench.e2e import Job, SampleCase, provider_options, sample_rows, train_row
from fastdiff.bench.report import add_ratios, git_commit, render_markdown, write_reports
from fastdiff.bench.suite import Budget, plan
from fastdiff.bench.telemetry import TelemetrySampler
from fastdiff.bench.timing import time_calls
from fastdiff.cli import main
from fastdiff.config import PRESETS


def test_telemetry_samples_in_the_background_and_summarises():
    readings = iter(range(1000))

    def fake():
        k = next(readings)
        return {"power_w": 100.0 + k, "sm_clock_mhz": 1980.0, "util_pct": 50.0}

    with TelemetrySampler("cuda", interval_s=0.005, reader=fake) as tel:
        time.sleep(0.06)
    s = tel.summary()
    assert s["samples"] >= 3 and s["sm_clock_mhz_mean"] == 1980.0 and s["util_pct_max"] == 50.0
    assert s["power_w_max"] == 100.0 + s["samples"] - 1 and s["power_w_mean"] < s["power_w_max"]


def test_telemetry_is_absent_on_cpu():
    with TelemetrySampler("cpu") as tel:
        pass
    assert tel.summary() is None


def test_time_calls_counts_only_the_timed_region():
    calls, entered = [], []

    class Region:
        def __enter__(self):
            entered.append(len(calls))

        def __exit__(self, *exc):
            entered.append(len(calls))

    t = time_calls(lambda: (calls.append(1), time.sleep(0.003)), "cpu", warmup=2, reps=4, region=Region)
    assert len(calls) == 6 and entered == [2, 6] and t.reps == 4 and t.median_ms >= 2.5


def test_provider_options():
    cpu = torch.device("cpu")
    assert provider_options("torch-eager", "fp32", cpu).plain
    assert provider_options("torch-compile", "bf16", cpu).compile
    assert provider_options("fastdiff", "fp32", cpu).plain  # the CPU default of `fastdiff sample`
    gpu = provider_options("fastdiff", "bf16", torch.device("cuda"))
    assert gpu.compile and gpu.cuda_graphs and gpu.channels_last and gpu.amp == "bf16"


def test_ratios_are_taken_within_the_run():
    rows = [
        {"section": "train", "preset": "p", "batch": 8, "provider": "torch-eager", "dtype": "fp32", "images_per_s": 10},
        {"section": "train", "preset": "p", "batch": 8, "provider": "torch-compile", "dtype": "bf16",
         "images_per_s": 20},
        {"section": "train", "preset": "p", "batch": 8, "provider": "fastdiff", "dtype": "bf16", "images_per_s": 50},
        {"section": "train", "preset": "p", "batch": 16, "provider": "fastdiff", "dtype": "bf16", "images_per_s": 90},
        {"section": "train", "preset": "p", "batch": 8, "provider": "fastdiff", "dtype": "fp32", "status": "skipped"},
    ]
    add_ratios(rows)
    assert rows[0]["vs_torch_eager"] == 1.0 and rows[2]["vs_torch_eager"] == 5.0
    assert rows[2]["vs_torch_compile"] == 2.5 and rows[1]["vs_torch_compile"] == 1.0
    assert "vs_torch_eager" not in rows[3] and "vs_torch_eager" not in rows[4]


def test_reports_name_the_environment(tmp_path):
    doc = {"quick": True, "environment": {"torch": "2.x", "commit": "abc123", "dirty": False, "gpu": "H100"},
           "rows": [{"section": "sample", "preset": "mnist", "batch": 4, "sampler": "ddim-4", "timed_steps": 4,
                     "provider": "fastdiff", "dtype": "bf16", "median_ms": 1.5, "p20_ms": 1.4, "p80_ms": 1.7,
                     "images_per_s": 2666.7, "telemetry": {"power_w_mean": 300.0}, "status": "ok"}],
           "ops": {"status": "ok", "rows": [{"op": "sampler_step", "gbs": 1234.5}]}}
    json_path, md_path = write_reports(doc, tmp_path)
    assert json.loads(json_path.read_text())["rows"][0]["images_per_s"] == 2666.7
    md = md_path.read_text()
    assert "abc123" in md and "H100" in md and "| mnist | 4 | ddim-4 | 4 | fastdiff | bf16 |" in md
    assert "| 300 |" in md and "sampler_step" in md and "1234.5" in md
    assert render_markdown({**doc, "rows": []}).count("##") == 1


def test_git_commit_of_this_checkout():
    info = git_commit()
    if (Path(__file__).resolve().parents[1] / ".git").exists():  # a checkout (CI clones one), not an unpacked copy
        assert len(info["commit"]) == 40 and isinstance(info["dirty"], bool)
    else:
        assert info == {"commit": None, "dirty": None}


def test_plan_puts_the_targets_first():
    jobs = plan(torch.device("cuda"), quick=False)
    first = [(j.section, j.preset, j.batch, j.provider, j.dtype) for j in jobs[:3]]
    assert first == [("sample", "mnist", 64, "torch-eager", "fp32"), ("sample", "mnist", 64, "torch-compile", "bf16"),
                     ("sample", "mnist", 64, "fastdiff", "bf16")]
    assert ("train", "cifar10-ddpm", 128, "fastdiff", "bf16") in [(j.section, j.preset, j.batch, j.provider, j.dtype)
                                                                   for j in jobs[3:6]]
    assert jobs[0].cases[0].steps == 1000 and jobs[0].cases[0].timed_steps < 1000
    assert all(j.provider != "diffusers" for j in plan(torch.device("cpu"), True, providers=["fastdiff"]))


def test_budget_skips_what_does_not_fit():
    budget = Budget(0.0)
    job = Job("sample", "mnist", "torch-eager", "fp32", 2, [SampleCase("ddim", 4, 1)])
    rows = list(sample_rows(job, torch.device("cpu"), reps=1, budget=budget))
    assert rows == [{"sampler": "ddim-4", "timed_steps": 1, "status": "skipped: time budget"}]


@pytest.fixture
def tiny_preset(monkeypatch):
    """A digits-sized preset under a new name, so that the e2e code runs its real paths in a second."""
    monkeypatch.setitem(PRESETS, "bench-tiny", {
        "model": dict(image_size=8, in_channels=1, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                      attn_resolutions=(4,), dropout=0.1, num_groups=4, num_classes=10),
        "train": dict(batch_size=4), "sample": dict(guidance=2.0)})
    return "bench-tiny"


def test_sampling_and_training_rows(tiny_preset):
    cpu = torch.device("cpu")
    job = Job("sample", tiny_preset, "torch-eager", "fp32", 3, [SampleCase("ddpm", 1000, 2), SampleCase("ddim", 4, 1)])
    rows = list(sample_rows(job, cpu, reps=1, warmup=0))
    assert [r["sampler"] for r in rows] == ["ddpm-1000", "ddim-4"] and all(r["status"] == "ok" for r in rows)
    # images/s is extrapolated from the timed steps to the whole run.
    assert rows[0]["images_per_s"] == pytest.approx(3 / (rows[0]["median_ms"] / 1e3 * 500))
    assert rows[0]["peak_mem_mb"] is None and "telemetry" not in rows[0]
    row = train_row(Job("train", tiny_preset, "fastdiff", "fp32", 4), cpu, reps=1, warmup=0)
    assert row["status"] == "ok" and row["images_per_s"] > 0 and row["step"] == "TrainStep"


@pytest.mark.skipif(not diffusers_ref.available(), reason="diffusers is not installed")
def test_diffusers_provider_matches_the_architecture(tiny_preset):
    from fastdiff.config import preset_config
    from fastdiff.models import UNet

    for name in ("mnist", "cifar10-ddpm"):
        cfg = preset_config(name).model
        ours = sum(p.numel() for p in UNet(cfg).parameters())
        theirs = sum(p.numel() for p in diffusers_ref.unet(cfg).parameters())
        assert ours == theirs, name
    job = Job("sample", tiny_preset, "diffusers", "fp32", 2, [SampleCase("ddim", 4, 4)])
    assert next(sample_rows(job, torch.device("cpu"), reps=1))["status"] == "ok"


def test_bench_command_end_to_end(tiny_preset, tmp_path, capsys):
    code = main(["bench", "--quick", "--presets", tiny_preset, "--out", str(tmp_path), "--device", "cpu",
                 "--providers", "torch-eager", "torch-compile", "fastdiff"])
    out = capsys.readouterr().out
    assert code == 0, out
    doc = json.loads((tmp_path / "bench.json").read_text())
    statuses = {(r["section"], r["provider"], r.get("sampler")): r["status"] for r in doc["rows"]}
    assert statuses[("train", "fastdiff", None)] == "ok" and statuses[("sample", "torch-eager", "ddpm-1000")] == "ok"
    assert statuses[("sample", "torch-compile", "ddim-4")].startswith("skipped: --quick on the CPU")
    assert doc["ops"]["status"].startswith(("ok", "op benchmarks unavailable"))
    assert doc["environment"]["torch"] == torch.__version__ and "total_s" in doc
    assert "| bench-tiny |" in (tmp_path / "bench.md").read_text() and "wrote" in out
