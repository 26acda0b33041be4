"""Progress bars: on stderr with an ETA, never on stdout (whose last line stays the JSON result), off with
--no-progress, and off by default in the Python API."""

import json
import re

import pytest
import torch

from fastdiff.cli import main
from fastdiff.sampling import load_run, resolve_settings, sample

TINY = ["--steps", "2", "--batch-size", "16", "--log-every", "1", "--ckpt-every", "2", "--sample-every", "0"]
ETA = re.compile(r"\d+/\d+ \[\d\d:\d\d<\d\d:\d\d")  # tqdm's "done/total [elapsed<remaining"


@pytest.fixture(autouse=True)
def terminal(monkeypatch):
    """stderr as a terminal's (pytest captures it): where the bars are drawn."""
    monkeypatch.setattr("fastdiff.cli.args.stderr_is_terminal", lambda: True)


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    assert code == 0, out.err
    json.loads(out.out.strip().splitlines()[-1])  # the result is still the last line of stdout
    assert not ETA.search(out.out) and "\r" not in out.out
    return out.err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("progress") / "run"
    assert main(["train", "--preset", "digits", "--out", str(run_dir), *TINY, "--no-progress"]) == 0
    return run_dir


def test_train_shows_its_bar_on_stderr(tmp_path, capsys):
    err = run(["train", "--preset", "digits", "--out", str(tmp_path / "run"), *TINY], capsys)
    assert re.search(r"2/2 \[\d\d:\d\d<\d\d:\d\d", err), err  # the training loop's bar
    quiet = run(["train", "--preset", "digits", "--out", str(tmp_path / "quiet"), *TINY, "--no-progress"], capsys)
    assert not ETA.search(quiet), quiet


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_sampling_bar_counts_the_steps_of_every_batch(command, trained, tmp_path, capsys):
    args = [command, "--checkpoint", str(trained), "--n", "20", "--steps", "3", "--batch-size", "10"]
    args += ["--out", str(tmp_path / "s.png")] if command == "sample" else ["--classifier-steps", "5"]
    err = run(args, capsys)
    assert re.search(r"sampling: 100%.*6/6 \[\d\d:\d\d<\d\d:\d\d", err), err  # 2 batches x 3 steps
    if command == "eval":  # its classifier trains first (for minutes at the default steps), then it is cached
        assert re.search(r"classifier: 100%.*5/5 \[\d\d:\d\d<\d\d:\d\d", err), err
    quiet = run([*args, "--no-progress"], capsys)
    assert "sampling" not in quiet and not ETA.search(quiet), quiet


def test_distill_shows_bars_of_its_setup(tmp_path, capsys):
    """The ViT backbone's pretraining and the teacher pairs' sampling take minutes before the first step."""
    from fastdiff.config import apply_overrides, preset_config
    from fastdiff.train.ddpm import train_ddpm

    tiny = {"model.base_channels": 16, "model.num_groups": 4, "train.batch_size": 16, "train.steps": 2,
            "train.ckpt_every": 2, "diffusion.prediction": "v"}
    train_ddpm(apply_overrides(preset_config("digits"), tiny), tmp_path / "teacher", progress=False,
               echo=lambda s: None)
    err = run(["distill", "--teacher", str(tmp_path / "teacher"), "--out", str(tmp_path / "student"), "--steps", "2",
               "--backbone-steps", "3", "--regress-weight", "1", "--regress-pairs", "8", "--regress-steps", "4",
               *TINY[2:]], capsys)
    assert re.search(r"ViT backbone: 100%.*3/3 \[\d\d:\d\d<\d\d:\d\d", err), err
    assert re.search(r"sampling: 100%.*4/4 \[\d\d:\d\d<\d\d:\d\d", err), err  # 8 pairs, 1 batch x DDIM-4
    assert re.search(r"2/2 \[\d\d:\d\d<\d\d:\d\d", err), err  # then the training loop's own bar


def test_no_bar_where_stderr_is_no_terminal(trained, tmp_path, capsys, monkeypatch):
    # Redirected to a file, each redraw was a carriage return, and the log lines came out between them
    monkeypatch.setattr("fastdiff.cli.args.stderr_is_terminal", lambda: False)
    err = run(["train", "--preset", "digits", "--out", str(tmp_path / "run"), *TINY], capsys)
    assert "step 2/2" in err and not ETA.search(err) and "\r" not in err
    err = run(["sample", "--checkpoint", str(trained), "--n", "4", "--steps", "2", "--out", str(tmp_path / "s.png")],
              capsys)
    assert not ETA.search(err) and "\r" not in err


def test_python_api_is_quiet_unless_asked(trained, capsys):
    denoiser = load_run(trained, torch.device("cpu"))
    settings = resolve_settings(denoiser, torch.device("cpu"), steps=2)
    sample(denoiser, settings, n=2)
    assert capsys.readouterr().err == ""
    sample(denoiser, settings, n=2, progress=True)
    assert "2/2" in capsys.readouterr().err


def test_bench_bar_counts_jobs_and_keeps_its_rows_on_stdout(tmp_path, capsys, monkeypatch):
    import fastdiff.bench.suite as suite

    # Two stand-in jobs: this checks the bar and the echoed rows, not the benchmarks (tests/test_bench.py).
    monkeypatch.setattr(suite, "plan", lambda *a: [suite.OpsJob("all"), suite.OpsJob("all")])
    monkeypatch.setattr(suite, "run_job", lambda job, *a, **k: iter([{"section": "op", "op": "stand-in",
                                                                      "status": "skipped: test"}]))
    args = ["bench", "--quick", "--out", str(tmp_path), "--device", "cpu", "--sections", "ops"]
    assert main(args) == 0
    out = capsys.readouterr()
    assert re.search(r"bench: 100%.*2/2 \[\d\d:\d\d<\d\d:\d\d", out.err), out.err
    assert out.out.count("op stand-in: skipped: test") == 2 and not ETA.search(out.out)
    result = json.loads(out.out.strip().splitlines()[-1])  # the result last, as every command's
    assert result["rows"] == 2 and result["json"] == str(tmp_path / "bench.json")
    assert json.loads((tmp_path / "bench.json").read_text())["complete"] is True
    assert main([*args, "--no-progress"]) == 0
    assert not ETA.search(capsys.readouterr().err)
