"""The training skeleton's resume rules: --steps below the run's step, finished runs, stats.jsonl after a resume,
a new learning rate on --resume, and the NaN guard's advice followed to the letter."""

import json
import shlex
import shutil

import pytest
import torch

from fastdiff import checkpoint as ckpt
from fastdiff.cli import main
from fastdiff.config import apply_overrides, preset_config
from fastdiff.errors import ConfigError, TrainingDiverged
from fastdiff.train import train_ddpm
from fastdiff.train.lr import one_cycle_lr, one_cycle_momentum, warmup_lr
from fastdiff.train.rundir import truncate_stats

QUIET = dict(progress=False, echo=lambda s: None)


def tiny(overrides, **extra):
    return apply_overrides(preset_config("digits"), {**overrides, **extra})


def stats(run):
    return [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]


def test_resume_below_the_run_is_an_error_and_a_finished_run_is_left_alone(tmp_path, tiny_overrides):
    run = tmp_path / "r"
    train_ddpm(tiny(tiny_overrides, **{"train.steps": 2}), run, **QUIET)
    before = {p.name: p.read_bytes() for p in (run / "config.json", run / "stats.jsonl", run / "log.txt")}
    with pytest.raises(ConfigError, match=r"--steps 1 is below step 2, which the run .* reached; pass --steps 2"):
        train_ddpm(tiny(tiny_overrides, **{"train.steps": 1}), run, resume=True, **QUIET)
    said = []
    rec = train_ddpm(tiny(tiny_overrides, **{"train.steps": 2}), run, resume=True, progress=False, echo=said.append)
    assert rec == {"step": 2, "already_finished": True}
    assert len(said) == 1 and "already finished at step 2" in said[0]
    assert {p.name: p.read_bytes() for p in (run / "config.json", run / "stats.jsonl", run / "log.txt")} == before


def test_cli_resume_of_a_finished_run_says_so(tmp_path, tiny_overrides, capsys):
    run = tmp_path / "r"
    train_ddpm(tiny(tiny_overrides, **{"train.steps": 2}), run, **QUIET)
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1]) == {"run_dir": str(run), "step": 2, "already_finished": True}
    assert "already finished at step 2" in err and len(err.strip().splitlines()) == 1
    assert main(["train", "--out", str(run), "--resume", "--steps", "1", "--no-progress"]) == 2
    assert "--steps 1 is below step 2" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--resume", "--steps", "1", "--dry-run"]) == 2  # it printed the config
    assert "--steps 1 is below step 2" in capsys.readouterr().err
    # a dry run of a resume with nothing to resume printed a new run's config, exit 0, where the run is refused
    for command in (["train", "--preset", "digits"], ["distill"], ["train-refiner"]):
        assert main([*command, "--out", str(tmp_path / "none"), "--resume", "--dry-run"]) == 2
        assert "holds no checkpoint to resume from" in capsys.readouterr().err and not (tmp_path / "none").exists()


def test_stats_are_not_repeated_after_a_resume(tmp_path, tiny_overrides):
    """Killed after the records of steps 3-4 but before the checkpoint of step 4 (and mid-line): the resumed run
    drops those records and writes them again, once."""
    over = {**tiny_overrides, "train.ckpt_every": 2, "train.log_every": 1}
    run = tmp_path / "r"
    train_ddpm(tiny(over, **{"train.steps": 4}), run, **QUIET)
    straight = stats(run)
    shutil.rmtree(ckpt.latest_checkpoint(run))
    with open(run / "stats.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a line torn by the kill
    train_ddpm(tiny(over, **{"train.steps": 4}), run, resume=True, **QUIET)
    again = stats(run)
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    assert [r["loss"] for r in again] == [r["loss"] for r in straight]  # and the same values: an exact resume
    assert truncate_stats(run, 2) == 2 and [r["step"] for r in stats(run)] == [1, 2]


def test_a_refused_resume_leaves_the_run_as_it_was(tmp_path, tiny_overrides, monkeypatch, capsys):
    """A resume refused during its setup (here: its image folder's classes changed) had already written its new
    config.json (a later plain --resume trained on with the refused run's --steps and --lr, logging no change),
    and cut stats.jsonl. Changes a resume may not make were refused only as flags: a hand-edited config.json, or
    the Python API, resumed an eps checkpoint as v-prediction, on another batch size."""
    from fastdiff.errors import DataError
    from fastdiff.train import loop

    over = {**tiny_overrides, "train.ckpt_every": 2, "train.log_every": 1, "train.sample_every": 1}
    run = tmp_path / "r"
    train_ddpm(tiny(over, **{"train.steps": 4}), run, **QUIET)
    shutil.rmtree(ckpt.latest_checkpoint(run))  # killed after step 4's records and grid, before its checkpoint
    files = lambda: {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*"))  # noqa: E731
                     if p.is_file() and p.name != "log.txt" and p.suffix != ".lock"}
    before = files()
    assert (run / "samples" / "step-000000004.png").exists() and len(stats(run)) == 4

    def refused(*args):
        raise DataError("the classes changed")

    with monkeypatch.context() as m:
        m.setattr(loop, "_check_classes", refused)
        with pytest.raises(DataError):
            train_ddpm(tiny(over, **{"train.steps": 6, "train.lr": 4e-4}), run, resume=True, **QUIET)
    assert files() == before
    for change, value in (("train.batch_size", 8), ("diffusion.prediction", "v"), ("train.seed", 7)):
        with pytest.raises(ConfigError, match=rf"a resume cannot change {change} .* -> {value} \(the checkpoint"):
            train_ddpm(tiny(over, **{"train.steps": 6, change: value}), run, resume=True, **QUIET)
        assert files() == before
    saved = json.loads((run / "config.json").read_text())
    saved["train"]["batch_size"] = 8
    (run / "config.json").write_text(json.dumps(saved))
    assert main(["train", "--out", str(run), "--resume", "--steps", "6", "--no-progress"]) == 2
    assert "a resume cannot change train.batch_size 16 -> 8" in capsys.readouterr().err
    saved["train"]["batch_size"] = 16
    (run / "config.json").write_text(json.dumps(saved))
    # the resume that may go on drops the records and the grid past its checkpoint, and writes them again
    train_ddpm(tiny(over, **{"train.steps": 3}), run, resume=True, **QUIET)
    assert [r["step"] for r in stats(run)] == [1, 2, 3] and not (run / "samples" / "step-000000004.png").exists()


def test_lr_schedules_are_pure_functions_of_the_step():
    lr = warmup_lr(1e-3, 4)
    assert [lr(k) for k in range(5)] == [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3]
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=50, pct_start=0.1, cycle_momentum=False)
    one = one_cycle_lr(1e-3, 50)
    for k in range(50):
        assert one(k) == pytest.approx(ref.get_last_lr()[0], rel=1e-12, abs=1e-15), k
        opt.step()
        ref.step()
    # and its momentum (the classifiers' AdamW beta1), bit for bit, at every length torch's runs; at 10 steps (one
    # warm-up step) torch divided by zero, which failed `fastdiff eval --classifier-steps 10` with a traceback
    for n in (1, 2, 9, 11, 57, 600):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-3)
        ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=n, pct_start=0.1)
        lr, beta1 = one_cycle_lr(3e-3, n), one_cycle_momentum(n)
        for k in range(n):
            assert (lr(k), beta1(k)) == (opt.param_groups[0]["lr"], opt.param_groups[0]["betas"][0]), (n, k)
            opt.step()
            ref.step()
    with pytest.raises(ZeroDivisionError):
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=10, pct_start=0.1)
    ten = one_cycle_momentum(10)
    assert [round(ten(k), 6) for k in (0, 9)] == [0.85, 0.95] and one_cycle_lr(3e-3, 10)(0) == 3e-3
    from fastdiff.models.classifier import fit_classifier

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    images, labels = torch.rand(32, 1, 8, 8) * 2 - 1, torch.arange(32) % 10
    assert not fit_classifier(model, images, labels, steps=10, batch_size=8, lr=1e-3, seed=0).training


def test_resume_with_a_new_learning_rate_and_warmup(tmp_path, tiny_overrides, capsys):
    over = {**tiny_overrides, "train.ckpt_every": 2, "train.log_every": 1, "train.lr": 1e-3, "train.warmup_steps": 2}
    run = tmp_path / "r"
    train_ddpm(tiny(over, **{"train.steps": 2}), run, **QUIET)
    opt_before = ckpt.load_tensors(ckpt.latest_checkpoint(run), "optimizer")
    assert main(["train", "--out", str(run), "--resume", "--steps", "4", "--lr", "4e-4", "--warmup", "8",
                 "--no-progress"]) == 0
    lrs = {r["step"]: r["lr"] for r in stats(run)}
    new = warmup_lr(4e-4, 8)
    assert lrs[1] == 1e-3 * 1 / 2 and lrs[3] == new(2) and lrs[4] == new(3)  # the new schedule from step 2 on
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["lr"] == 4e-4 and config["train"]["warmup_steps"] == 8
    log = (run / "log.txt").read_text()
    assert "resumed with train.lr 0.001 -> 0.0004 from step 2 on" in log and "train.warmup_steps 2 -> 8" in log
    assert "channel_mult" not in log, "a tuple option and its config.json list are no change"
    state = json.loads((ckpt.latest_checkpoint(run) / "state.json").read_text())
    assert state["lr"] == new(4)
    # The optimizer's moments were kept: the resumed step 3 started from step 2's (a fresh optimizer has none).
    assert any(k.endswith("exp_avg_sq") for k in opt_before)
    # And the same resume again gives the same run (the schedule is a function of the config and the step).
    shutil_copy = tmp_path / "again"
    train_ddpm(tiny(over, **{"train.steps": 2}), shutil_copy, **QUIET)
    main(["train", "--out", str(shutil_copy), "--resume", "--steps", "4", "--lr", "4e-4", "--warmup", "8",
          "--no-progress"])
    a, b = (ckpt.load_tensors(ckpt.latest_checkpoint(r), "model") for r in (run, shutil_copy))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_guard_advice_is_a_command_that_works(tmp_path, tiny_overrides, nan_batches, capsys):
    run = tmp_path / "r"
    with pytest.raises(TrainingDiverged) as err:
        train_ddpm(tiny(tiny_overrides, **{"train.steps": 8}), run, **QUIET)
    message = str(err.value)
    assert "the last good checkpoint is" in message and "step-000000002" in message
    command = message.split("warm-up: ", 1)[1].split(" (", 1)[0]
    assert command.startswith(f"fastdiff train --out {run} --resume --lr 0.001 --warmup 100")
    nan_batches()  # the data is fine again
    assert main([*shlex.split(command)[1:], "--no-progress"]) == 0
    assert ckpt.latest_checkpoint(run).name == "step-000000008"
    assert [r["step"] for r in stats(run)] == list(range(1, 9))


def test_nan_guard_advice_names_only_flags_the_command_has(tmp_path):
    """train-refiner's advice said `--warmup 100`, which it has not (its one cycle has no warm-up): the command it
    gave failed with "unrecognized arguments"."""
    from fastdiff.cli import build_parser
    from fastdiff.train.add import ADDObjective
    from fastdiff.train.ddpm import DDPMObjective
    from fastdiff.train.loop import _advice
    from fastdiff.train.refiner import RefinerObjective, refiner_train_config

    tc = refiner_train_config()
    for objective in (DDPMObjective, ADDObjective, RefinerObjective):
        for last in (None, str(tmp_path / "checkpoints" / "step-000000002")):
            advice = _advice(objective, tmp_path, tc, last)
            command = advice.split("(" if last is None else "warm-up: " if objective.warmup else "rate: ", 1)[1]
            args = shlex.split(command.split(" into a new --out")[0].split(" (")[0])
            assert args[:2] == objective.command.split() and ("--warmup" in args) == objective.warmup, advice
            extra = {"fastdiff train": ["--out", "x"], "fastdiff distill": ["--teacher", "t", "--out", "x"],
                     "fastdiff train-refiner": ["--checkpoint", "c", "--out", "x"]}[objective.command]
            build_parser().parse_args(args[1:] + ([] if last else extra))  # exits on a flag it lacks


def test_resume_with_another_precision(tmp_path, tiny_overrides):
    # A run trained on a GPU in fp16 (which the CPU cannot run) continues on the CPU with --amp bf16 or fp32: the
    # checkpoint holds float32 weights and moments, so --amp may change on --resume like --lr.
    run = tmp_path / "r"
    train_ddpm(tiny({**tiny_overrides, "train.amp": "fp32"}, **{"train.steps": 2}), run, **QUIET)
    assert main(["train", "--out", str(run), "--resume", "--steps", "4", "--amp", "bf16", "--no-progress"]) == 0
    assert json.loads((run / "config.json").read_text())["train"]["amp"] == "bf16"
    assert "resumed with train.amp fp32 -> bf16 from step 2 on" in (run / "log.txt").read_text()
    assert [r["step"] for r in stats(run)][-1] == 4


def test_the_nan_guard_names_the_term_that_is_not_finite():
    """The guard summed every logged term: an infinite gradient norm beside a finite loss was "the loss became
    inf"."""
    from fastdiff.train.meter import IntervalMeter

    for values, says in (((1.0, float("inf")), "grad_norm became inf"), ((float("nan"), 1.0), "the loss became nan")):
        meter = IntervalMeter(("loss", "grad_norm"), torch.device("cpu"), 0)
        meter.add(*(torch.tensor(v) for v in values))
        with pytest.raises(TrainingDiverged, match=rf"^{says} between steps 1 and 1; go on"):
            meter.read(1, 8, "go on")
