"""`fastdiff bench` pieces: telemetry, the timer, ratios and reports, the diffusers provider's settings, and a tiny
end-to-end run."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch

import fastdiff
from fastdiff import runtime
from fastdiff.bench import diffusers_ref, e2e, report
from fastdiff.bench.e2e import Job, SampleCase, sample_rows, train_rows
from fastdiff.bench.providers import provider_options
from fastdiff.bench.report import add_ratios, environment, git_commit, render_markdown, write_reports
from fastdiff.bench.suite import Budget, OpsJob, plan
from fastdiff.bench.telemetry import TelemetrySampler
from fastdiff.bench.timing import measure
from fastdiff.cli import main
from fastdiff.config import PRESETS, UNetConfig, preset_config
from fastdiff.diffusion import NoiseSchedule, initial_noise, run_table, seeds_for
from fastdiff.models import UNet
from fastdiff.runtime import AccelOptions
from fastdiff.sampling import sampler_table

requires_diffusers = pytest.mark.skipif(not diffusers_ref.available(), reason="diffusers is not installed")


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


def test_timer_tags_telemetry_per_provider():
    tel = TelemetrySampler("cuda", interval_s=0.002, reader=lambda: {"power_w": 1.0})
    measure({"a": lambda: time.sleep(0.01), "b": lambda: time.sleep(0.01)}, "cpu", rounds=3, telemetry=tel)
    a, b = tel.summary("a"), tel.summary("b")
    assert a["samples"] >= 3 and b["samples"] >= 3 and tel.summary()["samples"] >= a["samples"] + b["samples"]


def test_timer_excludes_the_warm_up_and_interleaves():
    calls, entered = [], []

    class Region:
        def __enter__(self):
            entered.append(len(calls))

        def __exit__(self, *exc):
            entered.append(len(calls))

    t = measure({"a": lambda: (calls.append("a"), time.sleep(0.003)), "b": lambda: calls.append("b")}, "cpu",
                warmup=2, rounds=4, telemetry=Region())
    assert entered == [4, 12] and calls[4:] == ["a", "b"] * 4  # warm-ups first, then a b a b ...
    assert t["a"].rounds == 4 and t["a"].reps == 1 and t["a"].median_ms >= 2.5 and t["b"].median_ms < 2.5
    assert t["a"].warmup_s >= 0.005 and t["a"].peak_mem_mb is None


def test_timer_reports_a_failing_provider_and_times_the_others():
    t = measure({"ok": lambda: None, "broken": lambda: 1 / 0}, "cpu", rounds=2)
    assert t["broken"].startswith("error: ZeroDivisionError") and t["ok"].rounds == 2


def test_provider_options():
    cpu = torch.device("cpu")
    assert provider_options("torch-eager", "fp32", cpu).plain
    assert provider_options("torch-compile", "bf16", cpu).compile
    # the CPU default of `fastdiff sample` (runtime.cpu_choice's layout) at the row's dtype
    assert provider_options("fastdiff", "fp32", cpu) == AccelOptions.for_device(cpu, amp="fp32")
    gpu = provider_options("fastdiff", "bf16", torch.device("cuda"))
    assert gpu.compile and gpu.cuda_graphs and gpu.channels_last and gpu.amp == "bf16"


def test_ratios_are_taken_within_the_case():
    def row(provider, dtype, ms, case="train p b8"):
        return {"case": case, "provider": provider, "dtype": dtype, "median_ms": ms}

    rows = [row("torch-eager", "fp32", 100.0), row("torch-compile", "bf16", 50.0), row("fastdiff", "bf16", 20.0),
            row("fastdiff", "bf16", 10.0, case="train p b16"), {**row("fastdiff", "fp32", None), "status": "skipped"},
            row("diffusers", "bf16", 40.0), row("fastdiff", "fp32", 25.0)]
    add_ratios(rows)
    assert rows[0]["vs_torch_eager"] == 1.0 and rows[2]["vs_torch_eager"] == 5.0
    assert rows[2]["vs_torch_compile"] == 2.5 and rows[1]["vs_torch_compile"] == 1.0
    assert rows[2]["vs_diffusers"] == 2.0 and "vs_diffusers" not in rows[6]  # same dtype only
    assert "vs_torch_compile" not in rows[6] and rows[6]["vs_torch_eager"] == 4.0
    assert "vs_torch_eager" not in rows[3] and "vs_torch_eager" not in rows[4]
    # An eager bf16 row that a later job adds to an end-to-end case leaves the bf16 rows' baseline at eager fp32;
    # an op row's baseline is eager at its own dtype.
    e2e = [{**r, "section": "train"} for r in rows[:3]] + [{**row("torch-eager", "bf16", 40.0), "section": "train"}]
    ops = [{**r, "section": "op", "case": "op gn"} for r in e2e]
    add_ratios(e2e + ops)
    assert e2e[2]["vs_torch_eager"] == 5.0 and e2e[3]["vs_torch_eager"] == 2.5
    assert ops[2]["vs_torch_eager"] == 2.0 and ops[3]["vs_torch_eager"] == 1.0


def test_reports_name_the_environment(tmp_path):
    env = {**environment("cpu"), "commit": "abc123", "dirty": False, "gpu": "H100", "driver": "570.1"}
    assert env["cpu_model"] and env["cpu_count"] >= 1 and len(env["load_avg"]) == 3
    doc = {"quick": True, "environment": env,
           "rows": [{"section": "sample", "preset": "mnist", "batch": 4, "sampler": "ddim-4", "timed_steps": 4,
                     "provider": "fastdiff", "dtype": "bf16", "median_ms": 1.5, "p20_ms": 1.4, "p80_ms": 1.7,
                     "images_per_s": 2666.7, "telemetry": {"power_w_mean": 300.0}, "status": "ok"},
                    {"section": "op", "op": "sampler_step", "provider": "fastdiff", "gb_per_s": 1234.5}]}
    json_path, md_path = write_reports(doc, tmp_path)
    assert json.loads(json_path.read_text())["rows"][0]["images_per_s"] == 2666.7
    md = md_path.read_text()
    assert "abc123" in md and "H100" in md and "570.1" in md and env["cpu_model"] in md and "load " in md
    assert "| mnist | 4 | ddim-4 | 4 | fastdiff | bf16 |" in md
    assert "| 300 |" in md and "sampler_step" in md and "1234.5" in md
    assert render_markdown({**doc, "rows": []}).count("##") == 0
    assert "command:" not in md  # a document without one says nothing of it


def test_reports_name_the_command_that_made_them():
    assert runtime.command_line(["/venv/bin/fastdiff", "bench", "--out", "a b"]) == "fastdiff bench --out 'a b'"
    assert (runtime.command_line(["benchmarks/cpu_defaults.py", "--rows", "64"])
            == "benchmarks/cpu_defaults.py --rows 64")
    assert runtime.command_line(["/src/fastdiff/__main__.py", "bench"]) == "python -m fastdiff bench"  # python -m
    cli_main = str(Path(fastdiff.__file__).parent / "cli" / "__main__.py")  # torchrun -m fastdiff.cli: 'cli' before
    assert runtime.command_line([cli_main, "train"]) == "python -m fastdiff.cli train"
    doc = report.new_doc("cpu", title="t")
    assert doc["command"] == runtime.command_line()
    assert f"- command: `{doc['command']}`" in render_markdown(doc)


def test_git_commit_of_this_checkout():
    info = git_commit()
    if (Path(__file__).resolve().parents[1] / ".git").exists():  # a checkout (CI clones one), not an unpacked copy
        assert len(info["commit"]) == 40 and isinstance(info["dirty"], bool)
    else:
        assert info == {"commit": os.environ.get("FASTDIFF_COMMIT") or None, "dirty": None}


def test_git_commit_outside_git_is_the_one_the_sender_names(tmp_path, monkeypatch):
    # a GPU machine gets a copy of the working tree without .git: the suite's caller names the commit
    monkeypatch.delenv("FASTDIFF_COMMIT", raising=False)
    assert git_commit(tmp_path) == {"commit": None, "dirty": None}
    monkeypatch.setenv("FASTDIFF_COMMIT", "f" * 40)
    assert git_commit(tmp_path) == {"commit": "f" * 40, "dirty": None}
    # and its report says that uncommitted changes cannot be ruled out; the load at the last write is named too
    doc = {"environment": {**environment("cpu"), "commit": "f" * 40, "dirty": None}, "rows": []}
    _, md = write_reports(doc, tmp_path)
    assert "(no .git: uncommitted changes unknown)" in md.read_text() and "at the last write" in md.read_text()


def test_git_commit_counts_a_new_source_file_not_a_new_result(tmp_path):
    # A run importing a module not yet added was recorded as of a clean commit (untracked files were not looked
    # at); a new result folder is no change to the code.
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "a")
    (tmp_path / "results" / "run").mkdir(parents=True)
    (tmp_path / "results" / "run" / "bench.json").write_text("{}")
    assert git_commit(tmp_path)["dirty"] is False
    (tmp_path / "benchmarks" / "results" / "run").mkdir(parents=True)  # a results folder's text files too
    (tmp_path / "benchmarks" / "results" / "run" / "lscpu.txt").write_text("Model name: x\n")
    assert git_commit(tmp_path)["dirty"] is False
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "new.py").write_text("y = 2\n")
    assert git_commit(tmp_path)["dirty"] is True


def test_plan_puts_the_headline_rows_first():
    jobs = plan(torch.device("cuda"), quick=False)
    trio = (("torch-eager", "fp32"), ("fastdiff", "bf16"), ("torch-compile", "bf16"))  # the baseline's compile last
    assert jobs[0] == OpsJob("headline")  # no model to compile: seconds
    assert (jobs[1].section, jobs[1].preset, jobs[1].batch, jobs[1].providers) == ("sample", "mnist", 64, trio)
    assert (jobs[2].section, jobs[2].preset, jobs[2].batch, jobs[2].providers) == ("train", "cifar10-ddpm", 128, trio)
    assert (jobs[3].preset, jobs[3].batch) == ("cifar10-ddpm", 1024)
    assert jobs[3].cases[0].steps == 1000 and jobs[3].cases[0].timed_steps < 1000
    assert "diffusers" in dict(jobs[4].providers)
    cpu = plan(torch.device("cpu"), True)
    assert {j.preset for j in cpu if isinstance(j, Job)} == {"digits", "mnist5k"}
    assert [c.label for c in cpu[1].cases] == ["ddim-20", "ddpm-1000"] and "diffusers" in dict(cpu[2].providers)
    assert all("diffusers" not in dict(j.providers) for j in plan(torch.device("cpu"), True, providers=["fastdiff"])
               if isinstance(j, Job))


def test_cpu_plan_adds_the_default_precision_where_it_is_not_fp32(monkeypatch):
    for flags, extra in ((frozenset({"avx512f", "amx_bf16"}), {("fastdiff", "bf16"), ("diffusers", "bf16")}),
                         (frozenset({"avx512_bf16"}), {("fastdiff", "bf16"), ("diffusers", "bf16")}),
                         (frozenset({"avx2"}), set())):
        monkeypatch.setattr(runtime, "cpu_flags", lambda flags=flags: flags)
        for job in (j for j in plan(torch.device("cpu"), True) if isinstance(j, Job)):
            assert {k for k in job.providers if k[1] != "fp32"} == extra, (flags, job)


def test_budget_skips_what_does_not_fit():
    job = Job("sample", "digits", 2, (("torch-eager", "fp32"),), (SampleCase("ddim", 4, 1),))
    rows = list(sample_rows(job, torch.device("cpu"), rounds=1, budget=Budget(0.0)))
    assert [(r["sampler"], r["timed_steps"], r["status"]) for r in rows] == [("ddim-4", 1, "skipped: time budget")]
    # a spent budget builds no model (on a GPU each costs seconds of a short slot)
    with mock.patch.object(e2e, "base_unet", side_effect=AssertionError("built a model")):
        assert len(list(sample_rows(job, torch.device("cpu"), rounds=1, budget=Budget(0.0)))) == 1
        assert len(list(train_rows(Job("train", "digits", 2, job.providers), torch.device("cpu"), rounds=1,
                                   budget=Budget(0.0)))) == 1


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
    job = Job("sample", tiny_preset, 3, (("torch-eager", "fp32"), ("fastdiff", "fp32")),
              (SampleCase("ddpm", 1000, 2), SampleCase("ddim", 4, 1)))
    rows = list(sample_rows(job, cpu, rounds=1, warmup=0))
    assert [(r["sampler"], r["provider"]) for r in rows] == [("ddpm-1000", "torch-eager"), ("ddpm-1000", "fastdiff"),
                                                             ("ddim-4", "torch-eager"), ("ddim-4", "fastdiff")]
    assert all(r["status"] == "ok" for r in rows) and rows[0]["extrapolated"] and rows[0]["case"] == rows[1]["case"]
    # images/s is extrapolated from the timed steps to the whole run.
    assert rows[0]["images_per_s"] == pytest.approx(3 / (rows[0]["median_ms"] / 1e3 * 500))
    assert rows[0]["peak_mem_mb"] is None and "telemetry" not in rows[0]
    lines = []  # a line as each warm-up ends: a run killed later still shows where its time went
    (row,) = train_rows(Job("train", tiny_preset, 4, (("fastdiff", "fp32"),)), cpu, rounds=1, warmup=1,
                        log=lines.append)
    assert row["status"] == "ok" and row["images_per_s"] > 0 and row["step"] == "TrainStep"
    assert len(lines) == 1 and lines[0].startswith(f"train {tiny_preset} b4 fastdiff fp32: warm-up (compile, capture) ")


def test_a_budget_spent_inside_a_job_skips_the_compiles_still_to_come(tiny_preset):
    # the job starts inside the budget; by the second provider's warm-up it is spent: the first is still timed
    class SpentAfterTheStart:
        calls = 0

        def exhausted(self):
            self.calls += 1
            return self.calls > 1

    job = Job("train", tiny_preset, 4, (("torch-eager", "fp32"), ("fastdiff", "fp32")))
    first, second = train_rows(job, torch.device("cpu"), rounds=1, warmup=1, budget=SpentAfterTheStart())
    assert first["provider"] == "torch-eager" and first["status"] == "ok" and first["images_per_s"] > 0
    assert second["provider"] == "fastdiff" and second["status"] == "skipped: time budget (before its warm-up)"


@pytest.mark.parametrize("train_channels_last", [False, True])
def test_fastdiff_training_row_trains_in_the_layout_of_fastdiff_train(tiny_preset, monkeypatch, train_channels_last):
    # The preset leaves channels_last to the device (None); the row must resolve it as `fastdiff train` does
    # (TrainConfig.for_device), while the other providers stay NCHW.
    import fastdiff.bench.e2e as e2e
    import fastdiff.config as config

    monkeypatch.setattr(config, "train_defaults", lambda device: ("fp32", train_channels_last))
    cfg = config.preset_config(tiny_preset)
    assert cfg.train.channels_last is None
    built = []
    model_of = e2e._model
    monkeypatch.setattr(e2e, "_model", lambda *a: built.append(model_of(*a)) or built[-1])
    x0, labels = e2e.train_batch(cfg, 4, "cpu")
    fns = [e2e.train_step_for(provider, "fp32", e2e.base_unet(cfg), cfg, "cpu", x0, labels)[0]
           for provider in ("fastdiff", "torch-eager")]
    fastdiff_model, eager_model = built
    # the rows name the training layout and no sampling row limit (they showed the sampling options)
    assert ("channels_last" in fns[0].options) == train_channels_last and "rows<=" not in fns[0].options
    assert "channels_last" not in fns[1].options and "rows<=" not in fns[1].options
    # conv_out's weight [1, 16, 3, 3] is contiguous in one layout only (conv_in's, with 1 input channel, in both).
    assert fastdiff_model.conv_out.weight.is_contiguous(memory_format=torch.channels_last) == train_channels_last
    assert not eager_model.conv_out.weight.is_contiguous(memory_format=torch.channels_last)


def _tiny_unet():
    cfg = UNetConfig(image_size=8, in_channels=1, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                     attn_resolutions=(4,), dropout=0.0, num_groups=4, num_classes=10)
    torch.manual_seed(0)
    return UNet(cfg).eval().requires_grad_(False)


@requires_diffusers
@pytest.mark.parametrize("preset", ["digits", "mnist5k", "digits-v"])
def test_diffusers_ddim_loop_is_fastdiffs_clipped_ddim(preset):
    # The same denoiser through both loops: diffusers' DDIMScheduler with use_clipped_model_output=True and
    # clip_sample=True takes exactly fastdiff's clipped DDIM steps (guided, trailing timesteps, eta 0), for each
    # preset's prediction and schedule (mnist5k's v-prediction was stepped as eps by the bench's diffusers rows).
    dc = preset_config(preset).diffusion
    model, schedule = _tiny_unet(), NoiseSchedule.from_config(dc)
    seeds = seeds_for(0, 3)
    x, labels = initial_noise(seeds, (1, 8, 8)) * 1.5, torch.tensor([1, 4, 9])  # * 1.5: clipping is exercised
    table = sampler_table(schedule, "ddim", 10, prediction=dc.prediction)
    with torch.no_grad():
        ours = run_table(model, x, table, seeds=seeds, labels=labels, guidance=2.0, null_label=10, clip=1.0)
    sched = diffusers_ref.scheduler("ddim", dc, clip=1.0)
    theirs = diffusers_ref.sample(model, sched, x, steps=10, labels=labels, guidance=2.0, null_label=10)
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=1e-4)
    unclipped = diffusers_ref.scheduler("ddim", dc, clip=None)
    assert not torch.allclose(diffusers_ref.sample(model, unclipped, x, steps=10, labels=labels, guidance=2.0,
                                                   null_label=10), ours, atol=1e-3)


@requires_diffusers
def test_diffusers_ddpm_step_is_fastdiffs_ddpm_step():
    # Fixed-small DDPM: diffusers' posterior mean and standard deviation equal fastdiff's (A, B, sigma) per step.
    schedule = NoiseSchedule("linear", 1000)
    table = sampler_table(schedule, "ddpm", 1000)
    sched = diffusers_ref.scheduler("ddpm", _diffusion_cfg(), clip=1.0)
    sched.set_timesteps(1000)
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 1, 4, 4, generator=g) * 1.5, torch.randn(2, 1, 4, 4, generator=g)
    for i in (0, 1, 500, 998, 999):
        t = sched.timesteps[i]
        assert int(t) == int(table.timesteps[i])
        p, q, A, B, sigma = table.coefs[i].tolist()
        mean = A * (p * x + q * out).clamp(-1, 1) + B * x
        step = sched.step(out, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
        std = float(sched._get_variance(t)) ** 0.5 if t > 0 else 0.0
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(step - std * noise, mean, atol=1e-5, rtol=1e-4)
        assert sigma == pytest.approx(std, rel=1e-4, abs=1e-7)


def _diffusion_cfg():
    return preset_config("digits").diffusion


@requires_diffusers
def test_diffusers_provider_matches_the_architecture(tiny_preset):
    for name in ("mnist", "cifar10-ddpm"):
        cfg = preset_config(name).model
        ours = sum(p.numel() for p in UNet(cfg).parameters())
        theirs = sum(p.numel() for p in diffusers_ref.unet(cfg).parameters())
        assert ours == theirs, name
    job = Job("sample", tiny_preset, 2, (("diffusers", "fp32"),), (SampleCase("ddim", 4, 4),))
    (row,) = sample_rows(job, torch.device("cpu"), rounds=1)
    assert row["status"] == "ok" and row["weights"] == diffusers_ref.WEIGHTS
    (row,) = train_rows(Job("train", tiny_preset, 2, (("diffusers", "fp32"),)), torch.device("cpu"), rounds=1)
    assert row["status"] == "ok" and row["options"] == "fp32+UNet2DModel"


def test_bench_command_end_to_end(tiny_preset, tmp_path, capsys, monkeypatch):
    import fastdiff.bench.suite as suite

    monkeypatch.setattr(suite, "PRESETS", (tiny_preset,))
    code = main(["bench", "--quick", "--out", str(tmp_path), "--device", "cpu", "--sections", "sample", "train",
                 "--providers", "torch-eager", "torch-compile", "fastdiff"])
    out = capsys.readouterr().out
    assert code == 0, out
    doc = json.loads((tmp_path / "bench.json").read_text())
    statuses = {(r["section"], r["provider"], r.get("sampler")): r["status"] for r in doc["rows"]}
    assert statuses[("train", "fastdiff", None)] == "ok" and statuses[("sample", "torch-eager", "ddpm-1000")] == "ok"
    assert statuses[("sample", "torch-compile", "ddim-20")].startswith("skipped: --quick on the CPU")
    assert doc["environment"]["torch"] == torch.__version__ and "total_s" in doc
    assert "| bench-tiny |" in (tmp_path / "bench.md").read_text() and "wrote" in out
    # a quick run on a tiny preset measures none of the CPU targets (mnist5k at batch 64), and says so
    assert doc["targets"] and all(t["status"].startswith("not measured: ") for t in doc["targets"])
    assert (tmp_path / "bench.md").read_text().split("## ")[-1].startswith("Targets") and "\ntargets\n" in out


def test_bench_refuses_bad_input_before_it_starts_and_keeps_an_earlier_report(tmp_path, capsys):
    (tmp_path / "bfile").write_text("x")
    for out in (tmp_path / "bfile", tmp_path / "bfile" / "sub"):  # they were tracebacks
        assert main(["bench", "--quick", "--device", "cpu", "--out", str(out)]) == 2
        assert "Traceback" not in capsys.readouterr().err
    # a preset that no job of this device runs: one error, not an empty report with exit 0
    assert main(["bench", "--quick", "--device", "cpu", "--sections", "sample", "--presets", "cifar10-ddpm",
                 "--out", str(tmp_path / "b")]) == 2
    assert "runs preset(s) cifar10-ddpm; its jobs run preset(s) digits, mnist5k with provider(s)" in \
        capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    # a provider that no job of the sections runs: it ran nothing and reported itself complete, exit 0
    for presets in ([], ["--presets", "digits"]):  # the second named the preset it refused as one it runs
        assert main(["bench", "--quick", "--device", "cpu", "--sections", "train", "--providers", "fastdiff-native",
                     *presets, "--out", str(tmp_path / "b")]) == 2
        err = capsys.readouterr().err
        assert "no train bench job on this device (cpu, --quick) runs " in err and "provider(s) fastdiff-native;" in err
    assert not (tmp_path / "b").exists()
    # an earlier report stays until this run has a row to replace it with (interrupted at once here)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "bench.json").write_text('{"rows": [1]}')
    import fastdiff.bench.suite as suite

    with pytest.MonkeyPatch.context() as m:
        m.setattr(suite, "run_job", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        assert main(["bench", "--quick", "--device", "cpu", "--out", str(tmp_path / "old")]) == 130
    assert (tmp_path / "old" / "bench.json").read_text() == '{"rows": [1]}'
    # a run stopped after its first row says so in its report (it read as a finished run's)
    real = suite.run_job

    def one_row_then_stop(job, *args, **kwargs):
        yield next(iter(real(job, *args, **kwargs)))
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as m:
        m.setattr(suite, "run_job", one_row_then_stop)
        assert main(["bench", "--quick", "--device", "cpu", "--sections", "ops", "--out", str(tmp_path / "cut")]) == 130
    assert json.loads((tmp_path / "cut" / "bench.json").read_text())["complete"] is False
    assert "**incomplete**" in (tmp_path / "cut" / "bench.md").read_text()


def _rows_for_targets(train_ms: float, ddpm_ms: float) -> list[dict]:
    train = dict(section="train", preset="cifar10-ddpm", batch=128, status="ok", case="train")
    ddpm = dict(section="sample", preset="cifar10-ddpm", batch=1024, sampler="ddpm-1000", status="ok", case="ddpm")
    gn = dict(section="op", op="group_norm_silu", shape=[32, 256, 64, 64], dtype="bfloat16", note="", status="ok",
              case="gn")
    return [
        {**train, "provider": "torch-eager", "dtype": "fp32", "median_ms": 60.0, "images_per_s": 128 / 0.06},
        {**train, "provider": "fastdiff", "dtype": "bf16", "median_ms": train_ms,
         "images_per_s": 128 / train_ms * 1e3},
        {**train, "provider": "torch-compile", "dtype": "bf16", "median_ms": 20.0, "images_per_s": 6400.0},
        {**ddpm, "provider": "fastdiff", "dtype": "bf16", "median_ms": ddpm_ms, "images_per_s": 50.0},
        {**ddpm, "provider": "torch-compile", "dtype": "bf16", "status": "skipped: time budget"},
        {**gn, "provider": "fastdiff", "frac_copy_bw": 0.66, "median_ms": 1.0},
        {**gn, "provider": "fastdiff[looped]", "frac_copy_bw": 0.83, "median_ms": 0.8},
        {**gn, "note": "channels_last", "provider": "fastdiff", "frac_copy_bw": 0.81, "median_ms": 0.9},
    ]


def test_targets_are_checked_against_the_rows_of_one_run():
    from fastdiff.bench.report import add_ratios, render_markdown
    from fastdiff.bench.targets import evaluate

    rows = _rows_for_targets(train_ms=12.8, ddpm_ms=500.0)  # 10,000 images/s, 4.7x eager, 1.56x compile
    add_ratios(rows)
    got = {t["target"]: t for t in evaluate(rows, "cuda")}
    assert len(got) == 10
    train = {k: v for k, v in got.items() if k.startswith("cifar10-ddpm training")}
    assert [t["status"] for t in train.values()] == ["met"] * 3
    assert [t["measured"] for t in train.values()] == ["10,000.0", "4.688x", "1.562x"]
    ddpm = [t for k, t in got.items() if k.startswith("DDPM-1000")]
    assert ddpm[0]["status"] == "met" and ddpm[1]["status"] == "not measured: torch-compile: skipped: time budget"
    gn = [t for k, t in got.items() if k.startswith("GroupNorm+SiLU")]
    assert (gn[0]["status"], gn[0]["measured"], gn[0]["other paths"]) == ("not met", "66.0%", "fastdiff[looped] 83.0%")
    assert gn[1]["status"] == "met" and "other paths" not in gn[1]
    assert got["mnist sampling, batch 64: x torch-eager"]["status"] == "not measured: no such row in this run"
    # one slower row flips its targets, and the report's last section says so
    rows = _rows_for_targets(train_ms=40.0, ddpm_ms=500.0)
    add_ratios(rows)
    targets = evaluate(rows, "cuda")
    assert [t["status"] for t in targets[:3]] == ["not met"] * 3
    md = render_markdown({"environment": {}, "rows": rows, "targets": targets})
    assert md.split("## ")[-1].startswith("Targets") and "| not met |" in md


def test_targets_say_why_a_row_is_missing_and_never_borrow_a_reference():
    from fastdiff.bench.report import add_ratios
    from fastdiff.bench.targets import evaluate

    rows = _rows_for_targets(train_ms=12.8, ddpm_ms=500.0)
    # the eager fp32 row failed; an eager bf16 row of the same case (a later job's) must not stand in for it
    rows[0] = {**rows[0], "status": "error: RuntimeError: boom", "median_ms": None}
    rows.append({**rows[1], "provider": "torch-eager", "median_ms": 40.0})
    rows.append({"section": "op", "op": "rest op rows (7 cases left)", "status": "skipped: time budget"})
    rows.append({**rows[1], "provider": "fastdiff", "dtype": "bf16", "batch": 64, "preset": "mnist",
                 "section": "sample", "sampler": "ddim-20", "median_ms": 0.0, "case": "mnist"})
    add_ratios(rows)
    got = {t["target"]: t for t in evaluate(rows, "cuda")}
    assert got["cifar10-ddpm training: x torch-eager fp32"]["status"] == (
        "not measured: torch-eager: error: RuntimeError: boom")
    assert got["sampler step, bf16: share of copy bandwidth"]["status"] == (
        "not measured: rest op rows (7 cases left): skipped: time budget")
    assert got["mnist sampling, batch 64: x torch-eager"]["status"] == "not measured: the row has no timing"
    # a miss just under a threshold never reads as the threshold
    rows = _rows_for_targets(train_ms=128 / 8999.6 * 1e3, ddpm_ms=500.0)
    add_ratios(rows)
    first = evaluate(rows, "cuda")[0]
    assert (first["measured"], first["at_least"], first["status"]) == ("8,999.6", "9,000", "not met")


def test_cpu_targets_compare_with_diffusers_at_both_precisions(monkeypatch):
    from fastdiff import runtime
    from fastdiff.bench import targets

    choice = runtime.cpu_choice(frozenset({"avx512_bf16"}), native=True)
    monkeypatch.setattr(targets, "cpu_choice", lambda: choice)
    row = dict(section="sample", preset="mnist5k", batch=64, sampler="ddim-20", status="ok")
    rows = [{**row, "provider": "fastdiff", "dtype": "bf16", "median_ms": 100.0},
            {**row, "provider": "diffusers", "dtype": "bf16", "median_ms": 140.0},
            {**row, "provider": "diffusers", "dtype": "fp32", "median_ms": 250.0}]
    got = targets.evaluate(rows, "cpu")
    assert [(t["measured"], t["status"]) for t in got[:2]] == [("2.500x", "met"), ("1.400x", "not met")]
    assert all(t["status"].startswith("not measured") for t in got[2:])  # no training rows
    # a miss by less than the shown digit reads below the threshold (1.4996 showed 1.500x against 1.50x)
    rows[1]["median_ms"] = 149.96
    assert [(t["measured"], t["status"]) for t in targets.evaluate(rows, "cpu")[1:2]] == [("1.499x", "not met")]


SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.sh"


def _dry_suite(tmp_path, total_s: int) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, "FASTDIFF_SUITE_DRY": "1", "TOTAL_S": str(total_s), "OUT": str(tmp_path),
           "PYTHON": sys.executable}
    t0 = time.monotonic()
    done = subprocess.run(["bash", str(SUITE)], env=env, capture_output=True, text=True, timeout=total_s + 60)
    return time.monotonic() - t0, done


def test_gpu_suite_keeps_to_its_total_time(tmp_path):
    # Far too little time for the work: every stage is cut by its timeout, and the script still ends in time and
    # leaves its log files.
    seconds, done = _dry_suite(tmp_path, 12)
    assert seconds < 12 + 8, done.stdout
    log = (tmp_path / "suite.log").read_text()
    assert "stage 1: environment" in log and "stage 1: pytest -m gpu" in log and "stage 2: fastdiff bench" in log
    assert "done in" in log and "(dry run)" in log
    # stage 2's compiles ran beside the tests and were stopped with them
    assert "stage 2's compiles started beside the tests" in log and "stage 2's compiles stopped" in log
    files = {p.name for p in tmp_path.iterdir()}
    assert {"suite.log", "env.txt", "pytest-gpu-ops.log", "pytest-gpu-sample.log", "pytest-gpu.log",
            "bench.log"} <= files
    assert len(files) <= 8  # the most a device call brings back
    assert "## nvidia-smi" in (tmp_path / "env.txt").read_text()


def test_gpu_suite_without_cuda_stops_at_once_and_says_why(tmp_path):
    # The real (not dry) suite where torch sees no GPU: the gpu tests would all skip and report exit 0, and the
    # bench fail; it stops at its start with one line, nvidia-smi's output kept.
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    env = {**os.environ, "TOTAL_S": "60", "OUT": str(tmp_path), "PYTHON": sys.executable}
    env.pop("FASTDIFF_SUITE_DRY", None)
    done = subprocess.run(["bash", str(SUITE)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "CUDA is not available" in (tmp_path / "suite.log").read_text()
    assert {p.name for p in tmp_path.iterdir()} == {"suite.log", "env.txt"}
    assert "## nvidia-smi" in (tmp_path / "env.txt").read_text()


@pytest.mark.slow
def test_gpu_suite_dry_run_writes_the_bench_report(tmp_path):
    seconds, done = _dry_suite(tmp_path, 240)
    assert seconds < 240 + 10 and "stage 2: fastdiff bench: exit" in (tmp_path / "suite.log").read_text()
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert doc["environment"]["bench_device"] == "cpu" and doc["rows"]
    assert len(list(tmp_path.iterdir())) <= 8 and "stage 2's compiles stopped" in (tmp_path / "suite.log").read_text()
    assert "# fastdiff bench --quick" in (tmp_path / "bench.md").read_text()
    for name in ("pytest-gpu-ops.log", "pytest-gpu-sample.log", "pytest-gpu.log"):  # on the CPU the gpu tests skip
        pytest_log = (tmp_path / name).read_text()
        assert "skipped" in pytest_log or "passed" in pytest_log, name


@pytest.fixture
def bench_scripts(monkeypatch):
    """benchmarks/ on sys.path, for the tests that import its scripts."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_cli_malloc_runs_a_command_in_both_settings(tmp_path, bench_scripts):
    # benchmarks/cli_malloc.py's plumbing on a command that prints JSON: a fresh process per setting, each one's
    # own peak RSS (wait4), and the outputs compared apart from timings.
    import cli_malloc

    assert cli_malloc.main(["--rounds", "1", "--out", str(tmp_path), "--", "env"]) == 0
    doc = json.loads((tmp_path / "cli_malloc.json").read_text())
    rows = {r["malloc"]: r for r in doc["rows"]}
    assert set(rows) == {"keep", "default"} and all(r["same_output"] for r in rows.values())
    assert all(r["peak_rss_mib"] > 10 and r["wall_s"] > 0 for r in rows.values())
    if runtime.glibc_version():  # `fastdiff env` names what the command ran with
        assert doc["last_result"]["malloc"].startswith("keep freed memory")


def test_cli_malloc_vs_runs_the_command_against_itself_with_more_arguments(tmp_path, bench_scripts):
    # --vs: the command as typed against the same command with the extra arguments, each in fresh processes that
    # keep freed memory; the outputs compared apart from timings and the options the arguments set.
    import cli_malloc

    grid = tmp_path / "grid.png"
    assert cli_malloc.main(["--rounds", "1", "--vs", "--max-rows 1", "--out", str(tmp_path), "--", "sample",
                            "--checkpoint", "pretrained:mnist-student", "--n", "2", "--out", str(grid)]) == 0
    doc = json.loads((tmp_path / "cli_malloc.json").read_text())
    rows = {r["provider"]: r for r in doc["rows"]}
    assert set(rows) == {"fastdiff as typed", "fastdiff with --max-rows 1"}
    assert {r["malloc"] for r in rows.values()} == {"keep"} and all(r["same_output"] for r in rows.values())
    assert rows["fastdiff with --max-rows 1"]["case"].endswith("--max-rows 1")
    assert doc["rows"][0]["as_typed_vs_with_--max-rows_1"] > 0 and grid.exists()
    with pytest.raises(SystemExit):
        cli_malloc.main(["--vs", " ", "--out", str(tmp_path), "--", "env"])


def test_cpu_allocator_takes_any_row_limit_its_candidates_name(bench_scripts):
    # benchmarks/cpu_allocator.py builds the chunked candidates (.../rN) its --only names, any N, and refuses an
    # unknown name in one line before it starts a process.
    import cpu_allocator

    t = f"{torch.get_num_threads()}t"
    grid = cpu_allocator.candidate_grid([f"cl/bf16/native/{t}/r128@64", f"nchw/fp32/torch/{t}/r96", "diffusers/bf16"],
                                        64)
    assert grid[f"cl/bf16/native/{t}/r128"]["rows"] == 128 and grid[f"nchw/fp32/torch/{t}/r96"]["rows"] == 96
    assert "diffusers/bf16" in grid and f"cl/bf16/native/{t}/r64" not in grid
    with pytest.raises(SystemExit):
        cpu_allocator.main(["--only", f"cl/bf16/native/{t}/r128,no/such/candidate", "--settings", "keep"])


def test_cpu_defaults_memory_report_has_a_row_per_candidate(tmp_path, bench_scripts):
    # benchmarks/cpu_defaults.py --memory: each candidate's peak RSS in a process of its own, in the JSON and as
    # rows of the Markdown report (which had the tables' headings and no rows); --batches is refused with it.
    pytest.importorskip("diffusers")  # every memory process imports it, so that baselines match
    import cpu_defaults

    only = f"nchw/fp32/torch/{torch.get_num_threads()}t"
    assert cpu_defaults.main(["--preset", "digits", "--batch", "2", "--memory", "--sections", "sample",
                              "--only", only, "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "cpu_defaults.json").read_text())["rows"]
    assert [(r["provider"], r["status"]) for r in rows] == [(only, "ok")] and rows[0]["peak_rss_mib"] > 10
    assert f"| {only} |" in (tmp_path / "cpu_defaults.md").read_text()
    with pytest.raises(SystemExit):
        cpu_defaults.main(["--memory", "--batches", "16,32", "--out", str(tmp_path)])


def test_cpu_defaults_compares_each_batch_with_its_own_references(tmp_path, bench_scripts):
    # --batches named each candidate .../bN, and the references were looked up without it: every ratio column
    # vanished without a word. Medians are timing's (an even count of rounds took the upper middle one), and
    # --timed-steps beyond DDIM-20's (or 0) is refused before any timing.
    pytest.importorskip("diffusers")
    import cpu_defaults

    assert cpu_defaults.median_p20_p80([10.0, 20.0])[0] == 15.0
    plain = f"nchw/fp32/torch/{torch.get_num_threads()}t"
    assert cpu_defaults.main(["--preset", "digits", "--batch", "2", "--batches", "2,4", "--sections", "sample",
                              "--rounds", "2", "--warmup", "1", "--timed-steps", "1", "--only",
                              f"{plain},diffusers/fp32", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "cpu_defaults.json").read_text())["rows"]
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert all("vs_plain" in r and "vs_diffusers_fp32" in r for r in rows), rows
    assert {r["batch"] for r in rows} == {2, 4}
    for steps in ("0", "21"):
        with pytest.raises(SystemExit):
            cpu_defaults.main(["--timed-steps", steps, "--out", str(tmp_path)])


def test_conv_layers_reports_each_convolution_and_the_step_share(tmp_path, bench_scripts):
    # benchmarks/conv_layers.py at a tiny size: a row per convolution and pass, the totals, and each library's
    # profiled training step with its convolution share and fastdiff's ceiling against diffusers.
    pytest.importorskip("diffusers")
    import conv_layers

    assert conv_layers.main(["--preset", "digits", "--batch", "4", "--rounds", "1", "--profiles", "1", "--wide", "16",
                             "--dtypes", "fp32", "--layouts", "cl", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "conv_layers.json").read_text())["rows"]
    layers = [r for r in rows if r["section"] == "layers" and "calls" in r]
    assert layers and all(r["status"] == "ok" and r["gflop_per_s"] > 0 for r in layers)
    assert sum(r["calls"] for r in layers if r["provider"] == "forward") == sum(
        isinstance(m, torch.nn.Conv2d) for m in UNet(preset_config("digits").model).modules())
    assert {r["provider"] for r in rows if r["section"] == "totals"} == {
        "forward, all layers", "backward_input, all layers", "backward_weight, all layers"}
    step = [r for r in rows if r["section"] == "step"]
    assert len(step) == 2 and 0 < step[0]["share_convolution"] < 1 and step[0]["ceiling_vs_diffusers"] > 0


def test_op_rows_compile_each_size_static():
    # The torch-compile op baseline compiles as the e2e rows do (static shapes): one function timed at three sizes
    # compiles three times, where torch.compile's automatic dynamic shapes would reuse one symbolic graph from
    # the second size on.
    from fastdiff.bench.ops import _providers

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = _providers(lambda x: x * 2 + 1, None, torch.device("cpu"), quick=False)["torch-compile"]
    for n in (3, 5, 7):
        torch.testing.assert_close(compiled(torch.ones(n)), torch.full((n,), 3.0))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3


@pytest.mark.slow  # four collections of the suite, ~10 s each
def test_gpu_suite_runs_every_gpu_test_once():
    # stage 1 splits the gpu tests over three processes by path and -k: together they collect each exactly once
    root = Path(__file__).resolve().parents[1]
    sampling = "sampler or sample_fast_path"
    parts = [["tests/ops"], ["tests/test_accel.py", "-k", sampling], ["tests", "--ignore=tests/ops", "-k",
                                                                      f"not ({sampling})"]]

    def collected(args):
        out = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q",
                              "-p", "no:cacheprovider", *args], cwd=root, capture_output=True, text=True)
        return [line for line in out.stdout.splitlines() if "::" in line]

    split = [t for args in parts for t in collected(args)]
    whole = collected(["tests"])
    assert len(split) == len(set(split)) and sorted(split) == sorted(whole) and whole
    assert f"SAMPLING='{sampling}'" in SUITE.read_text()


def test_ratios_compare_rows_of_one_job_and_the_gpu_plan_times_diffusers_beside_fastdiff():
    # On the GPU diffusers ran in jobs of its own, minutes after the fastdiff/eager/compile trio of the same case,
    # and its ratios were taken across them. Ratios are now within a job, and each diffusers job has fastdiff.
    from fastdiff.bench.report import add_ratios
    from fastdiff.bench.suite import Job, plan

    case = dict(section="sample", case="sample mnist b64 ddim-20/20", status="ok")
    rows = [{**case, "job": 0, "provider": "torch-eager", "dtype": "fp32", "median_ms": 100.0},
            {**case, "job": 0, "provider": "fastdiff", "dtype": "bf16", "median_ms": 50.0},
            {**case, "job": 1, "provider": "fastdiff", "dtype": "bf16", "median_ms": 40.0},
            {**case, "job": 1, "provider": "diffusers", "dtype": "bf16", "median_ms": 80.0}]
    add_ratios(rows)
    assert rows[1]["vs_torch_eager"] == 2.0 and "vs_diffusers" not in rows[1]
    assert rows[2]["vs_diffusers"] == 2.0 and "vs_torch_eager" not in rows[2] and "vs_torch_eager" not in rows[3]
    for job in plan(torch.device("cuda"), quick=False):
        if isinstance(job, Job) and any(p == "diffusers" for p, _ in job.providers):
            assert ("fastdiff", "bf16") in job.providers, job


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_every_target_names_a_row_the_bench_makes(device):
    # A target whose row the plan never makes would read "not measured" on every run: each target's fields
    # must match a row of a planned job (or of a declared op case, as `measure_case` names it).
    from fastdiff.bench.ops import _declared
    from fastdiff.bench.suite import OpsJob, plan
    from fastdiff.bench.targets import targets_for

    device = torch.device(device)
    rows = []
    for job in plan(device, quick=False):
        if isinstance(job, OpsJob):
            continue
        for case in job.cases or (None,):
            rows += [job.row(p, d, case) for p, d in job.providers]
    for name, cases in _declared(quick=False).items():
        for _, case in cases:
            base = {"section": "op", "op": name, "shape": list(case.shape), "dtype": str(case.dtype).split(".")[-1],
                    "note": case.note}
            rows += [{**base, "provider": p} for p in ("fastdiff", *(f"fastdiff[{v}]" for v in case.variants))]
    for target in targets_for(device):
        for fields in filter(None, (target.row, target.over)):
            assert any(all(r.get(k) == v for k, v in fields.items()) for r in rows), (target.what, fields)


def test_a_failing_job_or_target_check_keeps_the_report(tiny_preset, tmp_path, monkeypatch):
    # A sampling job that raises outside its providers leaves an error row per case and provider (so a target
    # naming the case says why); a target check that raises leaves the report, with the reason, and the bench goes
    # on.
    import fastdiff.bench.suite as suite

    def broken(*args, **kwargs):
        raise RuntimeError("no model")
        yield  # a generator, like sample_rows

    monkeypatch.setattr(suite, "sample_rows", broken)
    cases = (SampleCase("ddim", 4, 4), SampleCase("ddpm", 8, 1))
    job = Job("sample", tiny_preset, 2, (("torch-eager", "fp32"),), cases)
    rows = list(suite.run_job(job, torch.device("cpu"), quick=True, rounds=1, budget=suite.Budget(60)))
    assert [(r["sampler"], r["status"]) for r in rows] == [("ddim-4", "error: RuntimeError: no model"),
                                                           ("ddpm-8", "error: RuntimeError: no model")]
    monkeypatch.setattr(suite, "evaluate", lambda rows, device: 1 / 0)
    monkeypatch.setattr(suite, "PRESETS", (tiny_preset,))
    doc = suite.run_bench(device="cpu", out=tmp_path, quick=True, sections=("train",), providers=("torch-eager",),
                          echo=lambda line: None)
    assert doc["rows"] and doc["targets"][0]["status"].startswith("not evaluated: error: ZeroDivisionError")


def test_run_bench_checks_its_arguments(tmp_path):
    """sections="sample" was split into letters, an unknown provider ran no model rows and said complete, rounds 0
    became 5, a NaN budget never ran out, out=None was a TypeError."""
    from fastdiff.bench import suite
    from fastdiff.errors import ConfigError

    for kwargs, says in (({"sections": "sample"}, r"sections='sample' must be a list of names"),
                         ({"providers": ["nope"]}, r"unknown bench provider\(s\) \['nope'\]"),
                         ({"presets": ["nope"]}, r"unknown bench preset\(s\) \['nope'\]"),
                         ({"rounds": 0}, "rounds=0 must be at least 1"),
                         ({"budget_s": float("nan")}, "budget_s=nan is outside"),
                         ({"out": None}, "out is the folder"),
                         ({"device": "gpu"}, "gpu")):
        with pytest.raises(ConfigError, match=says):
            suite.run_bench(**{"device": "cpu", "out": tmp_path / "b", "quick": True, **kwargs})
    assert not (tmp_path / "b").exists()
