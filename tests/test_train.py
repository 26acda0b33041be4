import json

import pytest
import torch

from fastdiff import checkpoint as ckpt
from fastdiff.config import apply_overrides, preset_config
from fastdiff.errors import FastdiffError, TrainingDiverged
from fastdiff.train import train_ddpm
from fastdiff.train.ema import EMA, warmed_decay
from fastdiff.train.ema import describe as describe_ema


def tiny(overrides, **extra):
    return apply_overrides(preset_config("digits"), {**overrides, **extra})


def test_smoke_loss_decreases(tmp_path, tiny_overrides):
    cfg = tiny(tiny_overrides, **{"train.steps": 30, "train.log_every": 10, "train.ckpt_every": 30,
                                  "train.lr": 3e-3})
    train_ddpm(cfg, tmp_path, progress=False, echo=lambda s: None)
    stats = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats] == [10, 20, 30]
    assert stats[-1]["loss"] < stats[0]["loss"]
    assert {"kimg", "sec_per_kimg", "images_per_sec", "peak_mem_mb", "loss"} <= set(stats[0])
    assert (tmp_path / "log.txt").read_text().count("step ") >= 3
    assert json.loads((tmp_path / "config.json").read_text())["preset"] == "digits"
    # the decay is never reached in 30 steps: the log says so, and what the warm-up made of it
    assert "ema=0.999 (not reached: the warm-up (1+n)/(10+n) sets it, 0.7692 at the last step" in \
        (tmp_path / "log.txt").read_text()


def test_ema_warms_up_to_its_decay():
    """The EMA's decay at step n is min(decay, (1+n)/(10+n)); a run's log line says from which step the decay holds,
    or that it never does (a --ema-decay above the last step's warm-up then changes nothing)."""
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema, want = EMA(model, 0.8), 0.0
    for step in range(40):
        with torch.no_grad():
            model.weight.fill_(step + 1.0)
        ema.update(model, step)
        d = min(0.8, (1 + step) / (10 + step))
        want = d * want + (1 - d) * (step + 1.0)
    assert ema.model.weight.item() == pytest.approx(want, rel=1e-6)
    assert warmed_decay(0.999, 8990) == 0.999 and warmed_decay(0.999, 8989) < 0.999  # 0-based: the 8991st step
    assert describe_ema(0.999, 9000) == "0.999 (from step 8991)"
    assert describe_ema(0.9995, 20_000) == "0.9995 (from step 17991)"  # (10d-1)/(1-d) is 17990.000000001983 in floats
    assert describe_ema(0.0, 5) == "0"
    assert describe_ema(0.999, 1000) == ("0.999 (not reached: the warm-up (1+n)/(10+n) sets it, 0.9911 at the last "
                                         "step; 0.999 comes at step 8991)")


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_resume_continues_exactly(tmp_path, tiny_overrides, prediction):
    over = {**tiny_overrides, "diffusion.prediction": prediction, "model.dropout": 0.1}
    straight = tiny(over, **{"train.steps": 6})
    train_ddpm(straight, tmp_path / "a", progress=False, echo=lambda s: None)
    # The same run killed after 4 steps (its config said 4), then resumed to 6.
    train_ddpm(tiny(over, **{"train.steps": 4}), tmp_path / "b", progress=False, echo=lambda s: None)
    train_ddpm(straight, tmp_path / "b", resume=True, progress=False, echo=lambda s: None)
    a, b = ckpt.latest_checkpoint(tmp_path / "a"), ckpt.latest_checkpoint(tmp_path / "b")
    assert a.name == b.name == "step-000000006"
    for name in ("model", "ema", "optimizer"):
        ta, tb = ckpt.load_tensors(a, name), ckpt.load_tensors(b, name)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}.{k} differs after resume"


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_overrides, nan_batches):
    cfg = tiny(tiny_overrides, **{"train.steps": 8})
    with pytest.raises(TrainingDiverged, match=r"nan between steps 4 and 4.*step-000000002"):
        train_ddpm(cfg, tmp_path, progress=False, echo=lambda s: None)
    good = ckpt.latest_checkpoint(tmp_path)
    assert good.name == "step-000000002"
    assert all(torch.isfinite(v).all() for v in ckpt.load_tensors(good, "model").values())


def test_run_dir_guards(tmp_path, tiny_overrides):
    cfg = tiny(tiny_overrides, **{"train.steps": 2})
    with pytest.raises(FastdiffError, match="no checkpoint to resume"):
        train_ddpm(cfg, tmp_path / "r", resume=True, progress=False)
    train_ddpm(cfg, tmp_path / "r", progress=False, echo=lambda s: None)
    with pytest.raises(FastdiffError, match="already holds a run"):
        train_ddpm(cfg, tmp_path / "r", progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(FastdiffError, match="cannot write to the run directory"):
        train_ddpm(cfg, blocker / "run", progress=False)


def test_bf16_autocast_on_cpu(tmp_path, tiny_overrides):
    cfg = tiny(tiny_overrides, **{"train.steps": 2, "train.amp": "bf16"})
    rec = train_ddpm(cfg, tmp_path, progress=False, echo=lambda s: None)
    assert rec["step"] == 2 and rec["loss"] == rec["loss"]


def test_a_schedule_of_fewer_timesteps_than_a_grids_steps_trains(tmp_path, tiny_overrides):
    """A grid samples 10 DDIM steps: with 3 timesteps the run trained, wrote its checkpoint and then failed with
    "steps=10 must be between 1 and the 3 training timesteps", a value nobody gave."""
    cfg = tiny(tiny_overrides, **{"train.steps": 2, "train.sample_every": None, "diffusion.num_timesteps": 3,
                                  "diffusion.schedule": "cosine", "sample.steps": 3})
    assert train_ddpm(cfg, tmp_path, progress=False, echo=lambda s: None)["step"] == 2
    assert (tmp_path / "samples" / "step-000000002.png").exists()


def test_a_config_built_in_python_is_checked_as_a_file_is(tmp_path, tiny_overrides):
    """train_ddpm trained an ema_decay of 2 (or sample.steps 5000, p_uncond 5) and wrote a run that would not load;
    a dict or a student's config were AttributeErrors."""
    import dataclasses

    from fastdiff.config import distill_config
    from fastdiff.errors import ConfigError
    from fastdiff.train import train_add

    cfg = apply_overrides(preset_config("digits"), tiny_overrides)
    for bad, says in ((dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, ema_decay=2.0)),
                       r"train.ema_decay must be in \[0, 1\)"),
                      (dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, steps=5000)), "sample.steps"),
                      (cfg.to_dict(), "must be a fastdiff.config.RunConfig"),
                      (distill_config(cfg, str(tmp_path / "teacher")), "trains with train_add")):
        with pytest.raises(ConfigError, match=says):
            train_ddpm(bad, tmp_path / "run", progress=False, echo=lambda s: None)
    with pytest.raises(ConfigError, match="train_add needs a student's config"):
        train_add(cfg, tmp_path / "run", progress=False, echo=lambda s: None)
    assert not (tmp_path / "run").exists()
