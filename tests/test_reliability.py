"""What fastdiff guarantees when things go wrong: corrupt weights are refused, pruning keeps the newest good
checkpoint, one writer per run directory, a full disk gives one error and loses nothing, and every number and
file is checked where it is read (one clear line, exit status 2)."""

import errno
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fastdiff import checkpoint as ckpt
from fastdiff import runlock, state_dicts
from fastdiff.cli import main
from fastdiff.config import RunConfig, apply_overrides, load_config, preset_config
from fastdiff.errors import CheckpointError, ConfigError, FastdiffError
from fastdiff.images import save_png

TINY = ["--steps", "4", "--batch-size", "16", "--log-every", "2", "--ckpt-every", "2", "--no-progress"]


def run(args, capsys):
    try:
        code = main(args)
    except SystemExit as e:  # argparse usage errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(code, err):
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("rel") / "run"
    assert main(["train", "--preset", "digits", "--out", str(run_dir), *TINY]) == 0
    return run_dir


@pytest.fixture
def run_copy(trained, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    return dst


def overwrite_tensor_bytes(path: Path, value: bytes = b"\xff") -> None:
    """Overwrite the start of the tensor data with `value` bytes and leave the header intact (0xff.. is a NaN)."""
    raw = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", raw[:8])[0]
    raw[start : start + 64] = value * 64
    path.write_bytes(bytes(raw))


# --- corrupted weights --------------------------------------------------------------------------------------------

def test_sample_and_eval_refuse_non_finite_weights(run_copy, tmp_path, capsys):
    step4 = run_copy / "checkpoints" / "step-000000004"
    overwrite_tensor_bytes(step4 / "ema.safetensors")
    code, _, err = run(["sample", "--checkpoint", str(run_copy), "--n", "2", "--steps", "2",
                        "--out", str(tmp_path / "s.png")], capsys)
    one_line_error(code, err)
    assert "ema.safetensors" in err and "NaN or infinite" in err and "step-000000002" in err, err
    assert not (tmp_path / "s.png").exists()
    code, _, err = run(["eval", "--checkpoint", str(run_copy), "--n", "4", "--steps", "2"], capsys)
    one_line_error(code, err)
    assert "ema.safetensors" in err and "NaN or infinite" in err


def test_latest_good_checkpoint_skips_corrupt_and_damaged(run_copy):
    step2, step4 = (run_copy / "checkpoints" / f"step-00000000{s}" for s in (2, 4))
    assert ckpt.latest_good_checkpoint(run_copy) == step4
    overwrite_tensor_bytes(step4 / "optimizer.safetensors")
    skipped = []
    assert ckpt.latest_good_checkpoint(run_copy, log=skipped.append) == step2
    assert "optimizer.safetensors" in skipped[0]
    (step2 / "state.json").write_text("[]")
    assert ckpt.latest_good_checkpoint(run_copy) is None


def test_resume_starts_from_newest_good_checkpoint_and_is_exact(run_copy, tmp_path, capsys):
    """The newest checkpoint is corrupt: resume starts at the one before and ends bit-exact with a run that was
    never interrupted; pruning then keeps the good checkpoints, never the corrupt one."""
    overwrite_tensor_bytes(run_copy / "checkpoints" / "step-000000004" / "model.safetensors")
    assert main(["train", "--out", str(run_copy), "--resume", "--steps", "6", "--no-progress"]) == 0
    assert [s for s, _ in ckpt.checkpoint_dirs(run_copy)] == [4, 6]
    captured = capsys.readouterr()
    assert "skipping checkpoint" in captured.out + captured.err
    straight = tmp_path / "straight"
    assert main(["train", "--preset", "digits", "--out", str(straight), *TINY[:-1], "--steps", "6"]) == 0
    for name in ("model", "ema", "optimizer"):
        a = load_file(str(run_copy / "checkpoints" / "step-000000006" / f"{name}.safetensors"))
        b = load_file(str(straight / "checkpoints" / "step-000000006" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_an_unreadable_checkpoint_is_not_skipped_as_corrupt(run_copy, capsys, monkeypatch):
    """A file this user may not read (safetensors: "No such file") was "corrupt": the resume set its checkpoint
    aside and went back to an older one (exit 0); an unlistable checkpoints/ was a PermissionError traceback. The
    tests run as root, whom permissions do not stop, so os.access and the folder listing say what they would."""
    import pathlib

    step4 = run_copy / "checkpoints" / "step-000000004"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p).name != "ema.safetensors" and real_access(p, mode))
    before = sorted(p.name for p in (run_copy / "checkpoints").iterdir())
    for argv in (["train", "--out", str(run_copy), "--resume", "--steps", "6", "--no-progress"],
                 ["sample", "--checkpoint", str(run_copy), "--n", "2", "--steps", "2",
                  "--out", str(run_copy / "s.png")]):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"cannot read {step4 / 'ema.safetensors'}: permission denied" in err and "skipping" not in err, err
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == before  # nothing set aside
    monkeypatch.setattr(os, "access", real_access)
    real_iterdir = pathlib.Path.iterdir

    def iterdir(self):
        if self.name == "checkpoints":
            raise PermissionError(13, "Permission denied")
        return real_iterdir(self)

    monkeypatch.setattr(pathlib.Path, "iterdir", iterdir)
    capsys.readouterr()
    assert main(["train", "--out", str(run_copy), "--resume", "--steps", "6", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"cannot list {run_copy / 'checkpoints'}: permission denied" in err and "Traceback" not in err, err


def _save(run_dir, step, value=1.0, keep=2, size=4):
    model = {"w": torch.full((size,), value)}
    return ckpt.save_checkpoint(run_dir, step, tensors={"model": model}, state={"step": step}, config={"x": 1},
                                keep=keep)


def test_non_finite_tensors_are_never_written(tmp_path):
    _save(tmp_path, 1)
    with pytest.raises(CheckpointError, match="'w' holds NaN"):
        _save(tmp_path, 2, value=float("nan"))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000000001"]


def test_pruning_keeps_the_newest_good_checkpoint(tmp_path):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    overwrite_tensor_bytes(tmp_path / "checkpoints" / "step-000000002" / "model.safetensors")
    _save(tmp_path, 3, keep=1)  # pruned before the write to make room: step 1 (good) stays, step 2 (bad) goes
    assert [s for s, _ in ckpt.checkpoint_dirs(tmp_path)] == [3]
    _save(tmp_path, 4, keep=3)
    _save(tmp_path, 5, keep=3)
    for step in (4, 5):
        overwrite_tensor_bytes(tmp_path / "checkpoints" / f"step-00000000{step}" / "model.safetensors")
    _save(tmp_path, 6, keep=2)  # step 3 is the newest good one until step 6 is complete: it survives the pre-prune
    assert [s for s, _ in ckpt.checkpoint_dirs(tmp_path)] == [5, 6]


def test_set_aside_newer_checkpoints(run_copy):
    step2 = run_copy / "checkpoints" / "step-000000002"
    overwrite_tensor_bytes(run_copy / "checkpoints" / "step-000000004" / "ema.safetensors")
    moved = ckpt.set_aside_newer(run_copy, ckpt.latest_good_checkpoint(run_copy))
    assert [p.name for p in moved] == ["step-000000004"] and moved[0].parent.name == "set-aside"
    assert ckpt.checkpoint_dirs(run_copy) == [(2, step2)] and ckpt.resolve_checkpoint(run_copy) == step2
    # the same step set aside again (a resumed run wrote step 4 anew, and it was damaged too): both are kept
    shutil.copytree(moved[0], run_copy / "checkpoints" / "step-000000004")
    again = ckpt.set_aside_newer(run_copy, step2)
    assert [p.name for p in again] == ["step-000000004.1"]
    assert sorted(p.name for p in moved[0].parent.iterdir()) == ["step-000000004", "step-000000004.1"]


def test_a_lost_config_comes_from_the_checkpoint_a_resume_starts_from(run_copy):
    # RUN/config.json lost and the newest checkpoint damaged: the config is the one of the checkpoint the resume
    # starts from (the newest that passes), not the damaged one's
    from fastdiff.train.rundir import saved_run_config

    (run_copy / "config.json").unlink()
    (run_copy / "checkpoints" / "step-000000004" / "config.json").write_text("{trunc")
    assert saved_run_config(run_copy) == run_copy / "checkpoints" / "step-000000002" / "config.json"


def test_a_pinned_source_checkpoint_that_was_pruned(tmp_path):
    # A student or refiner resumes with the checkpoint it recorded; where its run pruned it since, with that run's
    # newest, and it says the resume is not exact (it was an error with no way out)
    from fastdiff.config import config_changes
    from fastdiff.train.rundir import source_checkpoint

    for step in (2, 4):
        _save(tmp_path / "teacher", step, keep=0)
    pinned = str((tmp_path / "teacher" / "checkpoints" / "step-000000002").resolve())
    student = tmp_path / "student"
    student.mkdir()
    (student / "config.json").write_text(json.dumps({"distill": {"teacher": pinned}}))
    lines = []
    assert source_checkpoint(student, True, "unused", "distill", "teacher", log=lines.append) == pinned and not lines
    shutil.rmtree(pinned)
    newest = str((tmp_path / "teacher" / "checkpoints" / "step-000000004").resolve())
    assert source_checkpoint(student, True, "unused", "distill", "teacher", log=lines.append) == newest
    assert len(lines) == 1 and "is gone" in lines[0] and "not exact" in lines[0]
    assert source_checkpoint(student, False, str(tmp_path / "teacher"), "distill", "teacher") == newest
    # a resumed run's log names no change for an option its config.json predates (model.null_class, 2026-12-07)
    assert config_changes({"model": {"a": 1}}, {"model": {"a": 1, "null_class": True}}) == []


def test_resume_without_a_good_checkpoint_is_refused(run_copy, capsys):
    # Every checkpoint damaged: --resume must not start over from step 0 (and overwrite them) as if resuming.
    for step in (2, 4):
        overwrite_tensor_bytes(run_copy / "checkpoints" / f"step-00000000{step}" / "model.safetensors")
    before = sorted(p.name for p in (run_copy / "checkpoints").iterdir())
    stats = (run_copy / "stats.jsonl").read_text()
    assert main(["train", "--out", str(run_copy), "--resume", "--steps", "6"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint of" in err and "passes its check (step-000000002, step-000000004" in err
    assert "Traceback" not in err and "train without --resume" in err
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == before
    assert (run_copy / "stats.jsonl").read_text() == stats


def test_killed_mid_swap_puts_the_checkpoint_back(tmp_path):
    path = _save(tmp_path, 1)
    os.rename(path, path.parent / ".old-step-000000001-123")  # killed between the two renames of a re-save
    ckpt.remove_stale_temporaries(tmp_path)
    assert ckpt.latest_good_checkpoint(tmp_path) == path


# --- one writer per run directory ---------------------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys, time
    from fastdiff.runlock import lock_run_dir
    lock = lock_run_dir(sys.argv[1])
    print("locked", flush=True)
    time.sleep(60)
""")


def test_second_writer_gets_the_holders_pid_and_kill_9_releases(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parent.parent)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FastdiffError, match=f"in use by another fastdiff process \\(pid {holder.pid}\\)"):
            runlock.lock_run_dir(run_dir)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with runlock.lock_run_dir(run_dir):  # the kernel dropped the dead holder's lock
        with pytest.raises(FastdiffError, match=f"pid {os.getpid()}"):
            runlock.lock_run_dir(run_dir)
    runlock.lock_run_dir(run_dir).release()


# --- full disk ----------------------------------------------------------------------------------------------------

def _no_temporaries(root: Path) -> None:
    left = [p.name for p in root.rglob("*") if p.name.startswith(".") and p.name != runlock.LOCK_FILE]
    assert left == [], left


@pytest.fixture
def disk_full(monkeypatch):
    """Fail the n-th write of a file with ENOSPC (the default: the first)."""
    from fastdiff import files

    real = files._write_file
    calls = {"n": 0}

    def arm(after: int = 0):
        def write(path, data):
            calls["n"] += 1
            if calls["n"] > after:
                raise OSError(errno.ENOSPC, "No space left on device")
            real(path, data)
        monkeypatch.setattr(files, "_write_file", write)
    return arm


@pytest.mark.parametrize("after", [0, 1, 2])
def test_disk_full_checkpoint_keeps_earlier_and_leaves_nothing(tmp_path, disk_full, after):
    good = _save(tmp_path, 1)
    disk_full(after)
    with pytest.raises(CheckpointError, match="no space left on device"):
        _save(tmp_path, 2)
    assert ckpt.latest_good_checkpoint(tmp_path) == good
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [good.name]


def test_disk_full_resave_of_the_same_step_keeps_it(tmp_path, disk_full):
    good = _save(tmp_path, 1)
    disk_full(0)
    with pytest.raises(CheckpointError, match="no space"):
        _save(tmp_path, 1, value=2.0)
    assert ckpt.load_tensors(good, "model")["w"][0] == 1.0
    _no_temporaries(tmp_path)


def test_disk_full_json_and_png_keep_the_old_file(tmp_path, disk_full):
    path = ckpt.write_json_atomic(tmp_path / "a.json", {"v": 1})
    png = save_png(np.zeros((4, 4, 1), np.uint8), tmp_path / "g.png")
    old_png = png.read_bytes()
    disk_full(0)
    with pytest.raises(FastdiffError, match="no space left on device"):
        ckpt.write_json_atomic(path, {"v": 2})
    with pytest.raises(FastdiffError, match="no space left on device"):
        save_png(np.full((4, 4, 1), 255, np.uint8), png)
    with pytest.raises(FastdiffError, match="no space left on device"):
        save_png(np.zeros((4, 4, 1), np.uint8), tmp_path / "new.png")
    assert json.loads(path.read_text()) == {"v": 1} and png.read_bytes() == old_png
    assert not (tmp_path / "new.png").exists()
    _no_temporaries(tmp_path)


def test_disk_full_sample_is_one_line_and_writes_nothing(trained, tmp_path, disk_full, capsys):
    disk_full(0)
    code, _, err = run(["sample", "--checkpoint", str(trained), "--n", "2", "--steps", "2", "--no-progress",
                        "--out", str(tmp_path / "s.png")], capsys)  # (the write fails after the sampling's bar)
    one_line_error(code, err)
    assert "no space left on device" in err and list(tmp_path.iterdir()) == []


def test_disk_full_sample_keeps_the_old_grid_and_samples_together(trained, tmp_path, disk_full, capsys):
    # The grid was renamed into place before the .npz failed: a new grid beside the old run's samples
    args = ["sample", "--checkpoint", str(trained), "--n", "2", "--steps", "2", "--no-progress", "--out",
            str(tmp_path / "s.png")]
    assert run(args, capsys)[0] == 0
    old = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    disk_full(1)  # the grid's temporary file is written, the samples' is not
    code, _, err = run([*args, "--n", "3", "--seed", "5"], capsys)
    one_line_error(code, err)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs made by the test (root only; skipped where mount is not allowed)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_full_disk_checkpoint_json_png(small_fs):
    n = 400 * 1024 // 4  # a 400 KiB checkpoint: two fit in 1 MiB, three do not
    for step in (1, 2, 3, 4):  # keeping 2 needs room for 2, not 3
        _save(small_fs, step, keep=2, size=n)
    assert [s for s, _ in ckpt.checkpoint_dirs(small_fs)] == [3, 4]
    with pytest.raises(CheckpointError, match="no space left on device"):
        _save(small_fs, 5, keep=0, size=n)  # keep all: no room for a third
    assert [s for s, _ in ckpt.checkpoint_dirs(small_fs)] == [3, 4]
    assert ckpt.latest_good_checkpoint(small_fs).name == "step-000000004"
    with pytest.raises(FastdiffError, match="no space left on device"):
        save_png(np.random.default_rng(0).integers(0, 255, (600, 600, 3), dtype=np.uint8), small_fs / "g.png")
    with pytest.raises(FastdiffError, match="no space left on device"):
        ckpt.write_json_atomic(small_fs / "big.json", {"x": "y" * 400_000})
    assert not (small_fs / "g.png").exists() and not (small_fs / "big.json").exists()
    _no_temporaries(small_fs)


# --- numbers and settings -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, message", [
    ("train.log_every", 0, "train.log_every must be in [1, inf)"),
    ("train.ckpt_every", -1, "train.ckpt_every must be in [1, inf)"),
    ("train.batch_size", -4, "train.batch_size must be in [1, inf)"),
    ("train.lr", float("nan"), "train.lr must be in (0, inf)"),
    ("train.lr", float("inf"), "train.lr must be in (0, inf)"),
    ("train.ema_decay", float("nan"), "train.ema_decay must be in [0, 1)"),
    ("train.ema_decay", 1.0, "train.ema_decay must be in [0, 1)"),
    ("train.grad_clip", 0.0, "train.grad_clip must be in (0, inf]"),
    ("train.p_uncond", 1.5, "train.p_uncond must be in [0, 1]"),
    ("train.steps", True, "train.steps must be an integer"),
    ("train.lr", "1e-3", "train.lr must be a number"),
    ("sample.guidance", float("nan"), "sample.guidance must be in [0, inf)"),
    ("sample.eta", float("nan"), "sample.eta must be in [0, 1]"),
    ("sample.steps", 0, "sample.steps must be in [1, inf)"),
    ("sample.steps", 1001, "sample.steps 1001 must be in [1, 1000]"),
    ("model.dropout", float("nan"), "model.dropout must be in [0, 1)"),
    ("model.image_size", 32, "image_size 32 does not fit this model"),
    ("model.channel_mult", [1, 0], "model.channel_mult must be in [1, inf)"),
    ("model.num_heads", 3, "does not divide the attention channels"),
    ("diffusion.num_timesteps", 10, "gives betas outside (0, 1)"),
    ("diffusion.zero_terminal_snr", True, "zero_terminal_snr with prediction eps"),
    ("diffusion.prediction", "score", "diffusion.prediction 'score' is not one of"),
    # refused by the one validation, so --dry-run refuses them too (they failed only once training began)
    ("train.amp", "fp8", "train.amp 'fp8' is not one of auto, fp32, bf16, fp16"),
    ("data.dataset", "nope", "data.dataset 'nope' is not one of digits"),
    ("train.sample_every", -5, "train.sample_every must be in [0, inf)"),
    ("model.channel_mult", [], "model.channel_mult is empty"),
    ("model.null_class", False, "drops labels to the null class, which model.null_class false removes"),
    ("train.p_uncond", 0.0, "guides against the null class, which train.p_uncond 0 never trains"),
])
def test_config_numbers_and_combinations(key, value, message):
    with pytest.raises(ConfigError) as e:
        apply_overrides(preset_config("digits"), {key: value})
    assert message in str(e.value)


def test_the_input_convolutions_channels_divide_by_num_groups():
    """base_channels 24 with channel_mult (2, 4) and 16 groups passed the check (48 and 96 divide) and --dry-run, and
    the first block's GroupNorm of conv_in's 24 channels failed at the first step with a traceback."""
    with pytest.raises(ConfigError, match=r"channels 24 \(base_channels 24 x 1\) not divisible by num_groups=16"):
        apply_overrides(preset_config("digits"), {"model.base_channels": 24, "model.channel_mult": [2, 4],
                                                  "model.num_groups": 16})


def test_an_unconditional_model_has_no_guidance():
    """--num-classes 0 on a class-conditional preset wrote its guidance 2 and label dropout 0.1 in the run, where
    sampling took 1 and training dropped no labels without a word; a guidance given for such a model is refused."""
    cfg = apply_overrides(preset_config("digits"), {"model.num_classes": 0})
    assert (cfg.sample.guidance, cfg.train.p_uncond) == (1.0, 0.0)
    with pytest.raises(ConfigError, match="sample.guidance 2 needs class labels, and model.num_classes 0"):
        apply_overrides(preset_config("digits"), {"model.num_classes": 0, "sample.guidance": 2})
    # a label dropout given for it too (a config file's p_uncond 0.3 was recorded and did nothing)
    with pytest.raises(ConfigError, match="train.p_uncond 0.3 needs class labels, .* set train.p_uncond 0 "):
        apply_overrides(preset_config("digits"), {"model.num_classes": 0, "train.p_uncond": 0.3})
    # a run saved with them before still loads and resumes as it was
    old = {**preset_config("digits").to_dict(), "model": {**preset_config("digits").to_dict()["model"],
                                                          "num_classes": 0}}
    resumed = apply_overrides(RunConfig.from_dict(old, saved=True), {"train.steps": 5}, saved=True)
    assert (resumed.sample.guidance, resumed.train.p_uncond, resumed.train.steps) == (2.0, 0.1, 5)


def test_valid_settings_still_accepted():
    cfg = apply_overrides(preset_config("digits-v"), {"diffusion.zero_terminal_snr": True, "sample.guidance": 0.0,
                                                      "train.keep_checkpoints": 0, "train.grad_clip": float("inf")})
    assert cfg.diffusion.zero_terminal_snr and cfg.sample.guidance == 0.0
    assert apply_overrides(preset_config("digits"), {"train.p_uncond": 0.0, "sample.guidance": 1.0}).train.p_uncond == 0
    for name in ("digits", "mnist", "fashion-mnist", "fer2013", "cifar10-ddpm", "digits-v"):
        RunConfig.from_dict(json.loads(preset_config(name).to_json()))


def test_distill_settings_checked():
    from fastdiff.config import distill_config

    cfg = distill_config(preset_config("digits-v"), "teacher")
    for key, value, message in [("distill.student_timesteps", [999, 999], "strictly decreasing"),
                                ("distill.student_timesteps", [1000], "strictly decreasing"),
                                ("distill.teacher_t_max", 1000, "teacher_t_max 1000"),
                                ("distill.betas", [0.0, 1.0], "distill.betas must be in [0, 1)"),
                                ("distill.disc_heads", 9, "disc_heads 9"),
                                ("sample.steps", 5, "sample.steps 5 must be in [1, 4] for sampler student")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            apply_overrides(cfg, {key: value})


def test_an_unconditional_discriminators_std_groups_divide_the_batch(monkeypatch):
    """Minibatch std over gcd(batch, disc_mbstd) samples: batch 9 with groups of 4 gave a constant feature, silently."""
    from fastdiff.config import distill_config

    student = distill_config(apply_overrides(preset_config("digits-v"), {"model.num_classes": 0}), "teacher")
    with pytest.raises(ConfigError, match=re.escape("train.batch_size 9 is not a multiple of it: groups of 1 would "
                                                    "be taken (one sample: a constant feature)")):
        apply_overrides(student, {"train.batch_size": 9})
    with pytest.raises(ConfigError, match=re.escape("groups of 2 would be taken; use a batch size that is a multiple "
                                                    "of 4, or --disc-mbstd 2")):
        apply_overrides(student, {"train.batch_size": 6})
    assert apply_overrides(student, {"train.batch_size": 6, "distill.disc_mbstd": 2}).train.batch_size == 6
    assert apply_overrides(student, {"train.batch_size": 6, "distill.disc_mbstd": 0}).train.batch_size == 6
    with pytest.raises(ConfigError, match="a group of one sample gives a constant feature; use --disc-mbstd 2"):
        apply_overrides(student, {"distill.disc_mbstd": 1})
    # under torchrun each process's discriminator sees its share of the batch: 8 over 4 processes is 2 each
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match=re.escape("train.batch_size 8 over 4 processes is 2 each, which is not a "
                                                    "multiple of it: groups of 2 would be taken; use a batch size "
                                                    "that is a multiple of 16, or --disc-mbstd 2")):
        apply_overrides(student, {"train.batch_size": 8})
    assert apply_overrides(student, {"train.batch_size": 16}).train.batch_size == 16
    # a class-conditional discriminator takes the samples of each label, whatever the batch
    conditional = distill_config(preset_config("digits-v"), "teacher")
    assert apply_overrides(conditional, {"train.batch_size": 9}).train.batch_size == 9
    assert apply_overrides(conditional, {"distill.disc_mbstd": 1}).distill.disc_mbstd == 1


def test_a_students_settings_that_would_do_nothing_are_refused():
    """Found by the boundary review: each trained (exit 0) without the setting having any effect."""
    from fastdiff.config import RunConfig, distill_config

    student = distill_config(preset_config("digits-v"), "teacher")
    for overrides, says in (
            ({"distill.adv_weight": 0.0, "distill.distill_weight": 0.0}, "are all 0: the student would never change"),
            ({"distill.regress_steps": 61}, "distill.regress_steps 61 set, which only the regression loss reads"),
            ({"distill.regress_pairs": 8, "distill.regress_at": "all"}, "regress_pairs 8, regress_at 'all' set"),
            # the distillation loss's options without that loss, a pretraining without a backbone to pretrain
            ({"distill.distill_weight": 0.0, "distill.teacher_t_min": 100},
             "distill.teacher_t_min 100 set, which only the distillation loss reads, and distill.distill_weight is "
             "0 (off): give --distill-weight, or drop it"),
            ({"distill.backbone": "none", "distill.backbone_steps": 50},
             "distill.backbone_steps 50 set, which only the pretraining of a 'pretrain' backbone reads"),
            # a student's sampling starts from pure noise: at the noisiest timestep only
            ({"distill.student_timesteps": [749, 249]}, "start at 749, but a student's sampling starts from pure "
                                                        "noise, at the noisiest timestep 999")):
        with pytest.raises(ConfigError, match=re.escape(says)):
            apply_overrides(student, overrides)
    # the preset's own regression settings, with the regression turned off (an ablation), are no user's setting
    mnist5k = distill_config(apply_overrides(preset_config("mnist5k"), {}), "teacher")
    assert apply_overrides(mnist5k, {"distill.regress_weight": 0.0}).distill.regress_at == "all"
    regress_only = {"distill.regress_weight": 1.0, "distill.regress_steps": 61, "distill.adv_weight": 0.0,
                    "distill.distill_weight": 0.0}
    assert apply_overrides(student, regress_only).distill.regress_steps == 61
    assert apply_overrides(student, {"distill.distill_weight": 0.0}).distill.teacher_t_max == 999
    # a sampling default that `fastdiff sample` of the student then refused
    with pytest.raises(ConfigError, match=re.escape("sample.sampler ddim with sample.steps 3 (trailing spacing) "
                                                    "would run the student at timesteps other than its [999, 749, "
                                                    "499, 249]; use sampler student, or steps 1 or 2 or 4")):
        apply_overrides(student, {"sample.sampler": "ddim", "sample.steps": 3})
    assert apply_overrides(student, {"sample.sampler": "ddim", "sample.steps": 4}).sample.steps == 4
    # a teacher of another T: the default timesteps spread over its own (500 was refused whatever the flags, 2000
    # started its student halfway and drew the teacher's timesteps from the lower half)
    for T, timesteps in ((500, (499, 374, 249, 124)), (2000, (1999, 1499, 999, 499))):
        other = distill_config(apply_overrides(preset_config("digits-v"), {"diffusion.num_timesteps": T}), "t")
        assert (other.distill.student_timesteps, other.distill.teacher_t_max) == (timesteps, T - 1)
        assert apply_overrides(other, {"distill.regress_weight": 0.0}).distill.regress_steps == 20
    # teacher guidance needs the teacher's null class: an unconditional teacher's was recorded and ignored
    old_teacher = preset_config("digits-v").to_dict()
    old_teacher["model"]["num_classes"] = 0  # a teacher saved before 2026-12-07 kept the preset's guidance 2
    unconditional = distill_config(RunConfig.from_dict(old_teacher, saved=True), "teacher")
    assert unconditional.distill.teacher_guidance == 1.0
    with pytest.raises(ConfigError, match="teacher_guidance 3 needs a class-conditional teacher with a null class, "
                                          "and this one is unconditional"):
        apply_overrides(unconditional, {"distill.teacher_guidance": 3.0})
    assert apply_overrides(student, {"distill.teacher_guidance": 3.0}).distill.teacher_guidance == 3.0


@pytest.mark.parametrize("args, message", [
    (["sample", "--steps", "0"], "argument --steps: 0 is outside"),
    (["sample", "--n", "-3"], "argument --n: -3 is outside"),
    (["sample", "--guidance", "nan"], "argument --guidance: nan is outside"),
    (["sample", "--eta", "1.5"], "argument --eta: 1.5 is outside"),
    (["sample", "--seed", "-1"], "argument --seed: -1 is outside"),
    (["sample", "--batch-size", "0"], "argument --batch-size: 0 is outside"),
    (["eval", "--steps", "0"], "argument --steps: 0 is outside"),
    (["eval", "--classifier-steps", "0"], "argument --classifier-steps"),
    (["sample", "--steps", "5000"], "steps=5000 must be between 1 and the 1000"),
    (["sample", "--sampler", "student"], "is not an ADD student run"),
])
def test_sampling_options_checked_once(args, message, trained, tmp_path, capsys):
    out = ["--out", str(tmp_path / "s.png")] if args[0] == "sample" else []
    code, _, err = run([*args, "--checkpoint", str(trained), *out], capsys)
    one_line_error(code, err)
    assert message in err, err


def test_resume_steps_below_the_run_is_refused(run_copy, capsys):
    before = (run_copy / "config.json").read_bytes()
    code, _, err = run(["train", "--out", str(run_copy), "--resume", "--steps", "2", "--no-progress"], capsys)
    one_line_error(code, err)
    assert "--steps 2 is below step 4" in err
    assert (run_copy / "config.json").read_bytes() == before


# --- files that are not what they should be -----------------------------------------------------------------------

BAD_JSON = [b"[]", b"{}", b"\x00\xff\xfe garbage", b"", b'{"model": 3}', b'{"train": {"steps": "ten"}}',
            b"[" * 5000, b'"a string"', b"null"]


@pytest.mark.parametrize("content", BAD_JSON)
def test_bad_run_config_json_is_one_line(run_copy, content, capsys, tmp_path):
    (run_copy / "config.json").write_bytes(content)
    code, _, err = run(["train", "--out", str(run_copy), "--resume", "--dry-run"], capsys)
    one_line_error(code, err)
    assert "config.json" in err
    (run_copy / "checkpoints" / "step-000000004" / "config.json").write_bytes(content)
    code, _, err = run(["sample", "--checkpoint", str(run_copy), "--n", "1", "--steps", "1",
                        "--out", str(tmp_path / "s.png")], capsys)
    one_line_error(code, err)
    assert "step-000000004/config.json" in err


@pytest.mark.parametrize("content", BAD_JSON + [b'{"step": -1}', b'{"step": 4, "optimizer": []}'])
def test_bad_state_json_is_refused_by_verification(run_copy, content):
    step4 = run_copy / "checkpoints" / "step-000000004"
    (step4 / "state.json").write_bytes(content)
    with pytest.raises(CheckpointError, match="state.json"):
        ckpt.verify_checkpoint(step4)
    assert ckpt.latest_good_checkpoint(run_copy).name == "step-000000002"


def test_scheduler_and_optimizer_state_checked(run_copy):
    path = run_copy / "checkpoints" / "step-000000004"
    state = ckpt.load_state(path)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(CheckpointError, match="last_epoch"):
        state_dicts.load_state_dict_checked(sched, {**sched.state_dict(), "last_epoch": "x"},
                                            "state.json: lr_scheduler")
    with pytest.raises(CheckpointError, match="missing"):
        state_dicts.load_state_dict_checked(sched, {}, "state.json: lr_scheduler")
    meta = state["optimizer"]
    meta["param_groups"][0]["lr"] = "fast"
    with pytest.raises(CheckpointError, match="lr should be a finite number"):
        state_dicts.load_optimizer(torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()), {}, meta)


def test_load_config_needs_every_section(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"train": {}}))
    with pytest.raises(ConfigError, match="are missing"):
        load_config(tmp_path / "config.json")


def test_classifier_cache_with_bad_metadata_retrains(tmp_path):
    from fastdiff.data import load_dataset
    from fastdiff.evaluate import classifier_path, load_or_train_classifier

    data = load_dataset("digits", "train")
    path = classifier_path(tmp_path, data, 2)
    path.write_bytes(b"junk")
    path.with_suffix(".json").write_text("[1, 2]")
    said = []
    load_or_train_classifier(data, tmp_path, steps=2, log=said.append)
    assert "unreadable" in said[0] and json.loads(path.with_suffix(".json").read_text())["steps"] == 2


def test_lock_is_released_when_the_holder_exits(tmp_path):
    code = "import sys; from fastdiff.runlock import lock_run_dir; lock_run_dir(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, cwd=Path(__file__).parent.parent)
    runlock.lock_run_dir(tmp_path).release()  # never waits: it takes the lock or raises at once


# --- stopping a command ---------------------------------------------------------------------------------------------

def test_sigterm_stops_training_as_ctrl_c_does(tmp_path):
    # SIGTERM (kill, a scheduler's limit) killed the process where it stood: no line, no word in log.txt, and the
    # temporaries of a file being written stayed
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fastdiff.cli", "train", "--preset", "digits", "--out", str(run_dir),
                             "--steps", "100000", "--ckpt-every", "3", "--sample-every", "0", "--batch-size", "16",
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parent.parent)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoints").is_dir() or not ckpt.latest_checkpoint(run_dir):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "fastdiff train: terminated", err
    assert "Traceback" not in err and out == ""
    log = (run_dir / "log.txt").read_text()
    assert re.search(r"terminated after step \d+; continue from .*step-\d+ with: fastdiff train --out .* --resume",
                     log), log
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name]


def test_a_closed_stdout_is_no_traceback(tmp_path):
    # `fastdiff ... | head` ended in a BrokenPipeError traceback (and bench stopped after its first row)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # block-buffered, as in a pipe
    for command in (["env"], ["sample", "--checkpoint", "pretrained:mnist", "--n", "1", "--steps", "1", "--out",
                              str(tmp_path / "g.png"), "--no-progress"]):  # a short result: written out at exit
        proc = subprocess.Popen([sys.executable, "-m", "fastdiff.cli", *command], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent, env=env)
        proc.stdout.close()
        err = proc.stderr.read()
        assert proc.wait(timeout=60) == 141 and "Traceback" not in err and "Exception ignored" not in err, err


def test_an_interrupted_run_says_where_it_stopped_and_a_fresh_start_drops_its_stats(tmp_path, monkeypatch,
                                                                                     tiny_overrides):
    from fastdiff.train import train_ddpm
    from fastdiff.train.batcher import Batcher

    cfg = apply_overrides(preset_config("digits"), {**tiny_overrides, "train.steps": 4, "train.ckpt_every": 100})
    indices = Batcher.indices

    def stop_at_step_3(self, step):
        if step == 2:
            raise KeyboardInterrupt
        return indices(self, step)

    with monkeypatch.context() as m:
        m.setattr(Batcher, "indices", stop_at_step_3)
        with pytest.raises(KeyboardInterrupt):
            train_ddpm(cfg, tmp_path, progress=False, echo=lambda s: None)
    assert "interrupted after step 2; no checkpoint was written yet" in (tmp_path / "log.txt").read_text()
    train_ddpm(cfg, tmp_path, progress=False, echo=lambda s: None)  # no checkpoint: a fresh start
    steps = [json.loads(line)["step"] for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the stopped start's 1 and 2 are gone
    log = (tmp_path / "log.txt").read_text()
    assert log.rstrip().endswith("finished at step 4") and "fastdiff 0.1.0, torch" in log
    # a SIGTERM whose exception a finalizer swallowed (a CI run trained on for a minute after it): the loop stops
    import fastdiff.errors as errors
    from fastdiff.errors import Terminated

    monkeypatch.setattr(errors, "_terminating", [True])
    with pytest.raises(Terminated):
        train_ddpm(cfg, tmp_path / "term", progress=False, echo=lambda s: None)
    assert "terminated after step 1; no checkpoint" in (tmp_path / "term" / "log.txt").read_text()
    monkeypatch.setattr(errors, "_terminating", [False])
    # stopped while it set up (a student's teacher pairs and backbone can take minutes): said too
    import fastdiff.train.loop as loop

    with monkeypatch.context() as m:
        m.setattr(loop, "EMA", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            train_ddpm(cfg, tmp_path / "setup", progress=False, echo=lambda s: None)
    log = (tmp_path / "setup" / "log.txt").read_text().splitlines()
    assert "fastdiff 0.1.0, torch" in log[0] and log[-1].endswith("interrupted before step 1; no checkpoint was "
                                                                  "written yet")


def test_a_stop_just_after_a_checkpoint_is_renamed_names_that_checkpoint(tmp_path, monkeypatch, tiny_overrides):
    """Stopped inside the checkpoint's write, after its rename (at the folder's fsync), the log said to continue
    from the checkpoint before it: the loop records a checkpoint when the write returns."""
    from fastdiff.train import train_ddpm

    cfg = apply_overrides(preset_config("digits"), {**tiny_overrides, "train.steps": 6, "train.ckpt_every": 2})
    fsync = ckpt._fsync

    def stop_after_the_second_rename(path):
        fsync(path)
        if Path(path).name == "checkpoints" and (Path(path) / "step-000000004").exists():
            raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "_fsync", stop_after_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        train_ddpm(cfg, tmp_path, progress=False, echo=lambda s: None)
    assert (f"interrupted after step 4; continue from {tmp_path / 'checkpoints' / 'step-000000004'} with: "
            "fastdiff train") in (tmp_path / "log.txt").read_text()


def test_a_grid_lost_between_its_checkpoint_and_a_stop_is_drawn_on_resuming(tmp_path, monkeypatch, tiny_overrides):
    """A kill after the checkpoint's rename and before its grid lost samples/step-N.png for good: the resume
    started at step N + 1. The grid is drawn when the run resumes, and the run stays exact."""
    from fastdiff.train import train_ddpm
    from fastdiff.train.monitor import Monitor

    cfg = apply_overrides(preset_config("digits"), {**tiny_overrides, "train.steps": 4, "train.ckpt_every": 2,
                                                    "train.sample_every": None})
    train_ddpm(cfg, tmp_path / "straight", progress=False, echo=lambda s: None)
    with monkeypatch.context() as m:
        m.setattr(Monitor, "grid", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            train_ddpm(cfg, tmp_path / "stopped", progress=False, echo=lambda s: None)
    assert not (tmp_path / "stopped" / "samples" / "step-000000002.png").exists()
    # ... and off the clock: the first interval's images/s counted the seconds of drawing it
    from fastdiff.train import loop

    events, real_grid, real_meter = [], Monitor.grid, loop.IntervalMeter
    monkeypatch.setattr(Monitor, "grid", lambda self, step, g: events.append(f"grid {step}")
                        or real_grid(self, step, g))
    monkeypatch.setattr(loop, "IntervalMeter", lambda *a, **k: events.append("meter") or real_meter(*a, **k))
    train_ddpm(cfg, tmp_path / "stopped", resume=True, progress=False, echo=lambda s: None)
    assert events == ["grid 2", "meter", "grid 4"], events
    for step in (2, 4):
        name = f"samples/step-{step:09d}.png"
        assert (tmp_path / "stopped" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()
    a, b = (ckpt.load_tensors(ckpt.latest_checkpoint(tmp_path / r), "ema") for r in ("straight", "stopped"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_stop_after_the_last_checkpoint_is_finished_by_the_resume(tmp_path, monkeypatch, tiny_overrides):
    """A kill after the last checkpoint and before the end of the run lost its last grid, its last stats.png and its
    "finished" line for good: the resume said "already finished". It now draws them, as the run would have."""
    from fastdiff.train import train_ddpm
    from fastdiff.train.monitor import Monitor

    cfg = apply_overrides(preset_config("digits"), {**tiny_overrides, "train.steps": 2, "train.ckpt_every": 2,
                                                    "train.log_every": 2, "train.sample_every": None})
    straight = train_ddpm(cfg, tmp_path / "straight", progress=False, echo=lambda s: None)
    for where in ("grid", "plot"):
        run = tmp_path / where
        with monkeypatch.context() as m:
            m.setattr(Monitor, where, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
            with pytest.raises(KeyboardInterrupt):
                train_ddpm(cfg, run, progress=False, echo=lambda s: None)
        if where == "plot":  # stopped at the only drawing (the grid's stop came before it)
            assert not (run / "stats.png").exists()
        said = []
        record = train_ddpm(cfg, run, resume=True, progress=False, echo=said.append)
        assert not any("already finished" in line for line in said), said
        assert record == json.loads((run / "stats.jsonl").read_text().splitlines()[-1])
        assert (record["step"], record["loss"]) == (straight["step"], straight["loss"])
        name = "samples/step-000000002.png"
        assert (run / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()
        assert (run / "stats.png").exists()
        assert (run / "log.txt").read_text().splitlines()[-1].endswith("] finished at step 2")
        assert len((run / "stats.jsonl").read_text().splitlines()) == 1
        said.clear()
        assert train_ddpm(cfg, run, resume=True, progress=False, echo=said.append)["already_finished"]
        assert len(said) == 1 and "already finished at step 2" in said[0]


def test_export_on_a_full_disk_names_the_export(trained, tmp_path, capsys, monkeypatch):
    # It named the temporary file inside the folder it had just removed
    import fastdiff.interop.diffusers as exporter

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(exporter, "safetensors_bytes", full)
    code, _, err = run(["export", "--checkpoint", str(trained), "--out", str(tmp_path / "exp")], capsys)
    one_line_error(code, err)
    assert f"cannot write the export {tmp_path / 'exp'}: no space left on device" in err
    assert list(tmp_path.iterdir()) == []


def test_a_new_run_overwrites_no_files_of_another_and_no_checkpoint_folder(tmp_path, capsys, monkeypatch):
    """train --out wrote config.json, log.txt and stats into any folder: a checkpoint folder (its config.json, which
    sampling then read, replaced), the current folder of --out "", someone's files (their stats.jsonl cut)."""
    tiny = ["--preset", "digits", "--steps", "1", "--batch-size", "8", "--ckpt-every", "1", "--sample-every", "0",
            "--no-progress"]
    run = tmp_path / "run"
    assert main(["train", *tiny, "--out", str(run)]) == 0
    checkpoint = ckpt.latest_checkpoint(run)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "config.json").write_text('{"lr": 1}')
    (theirs / "stats.jsonl").write_text("not json\n")
    monkeypatch.chdir(theirs)
    for out, says in ((checkpoint, "is a checkpoint folder, not a run directory"),
                      (theirs, "holds config.json, stats.jsonl of no fastdiff run, which a new run would overwrite"),
                      (".", "holds config.json, stats.jsonl of no fastdiff run, which a new run would overwrite"),
                      ("", "argument --out: empty; give a file or folder name")):
        before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
        capsys.readouterr()
        try:
            code = main(["train", *tiny, "--out", str(out)])
        except SystemExit as e:  # argparse's own error
            code = e.code
        err = capsys.readouterr().err
        assert code == 2, err
        assert says in err and "Traceback" not in err, err
        assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before
    (tmp_path / "afile").write_text("x")
    for extra in ([], ["--resume"]):
        assert main(["train", *tiny, "--out", str(tmp_path / "afile"), *extra]) == 2
        assert "afile is a file, not a folder; choose another --out" in capsys.readouterr().err
    # other files stay beside a new run: a job script, the run's own redirected output
    job = tmp_path / "job"
    job.mkdir()
    (job / "train.log").write_text("started\n")
    assert main(["train", *tiny, "--out", str(job)]) == 0 and (job / "train.log").read_text() == "started\n"
    # a finished run whose config.json is lost is still a run: resume it
    (job / "config.json").unlink()
    assert main(["train", *tiny, "--out", str(job)]) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    # a run that stopped before its first checkpoint (config.json and stats, no checkpoints) starts over
    shutil.rmtree(run / "checkpoints")
    assert main(["train", *tiny, "--out", str(run)]) == 0 and ckpt.latest_checkpoint(run) is not None
