from pathlib import Path

import pytest
import torch

from fastdiff import checkpoint as ckpt
from fastdiff import state_dicts
from fastdiff.errors import CheckpointError


def _save(run_dir, step, model, opt, keep=2):
    tensors, meta = state_dicts.optimizer_tensors(opt)
    return ckpt.save_checkpoint(run_dir, step, tensors={"model": model.state_dict(), "optimizer": tensors},
                                state={"step": step, "optimizer": meta}, config={"x": 1}, keep=keep)


def test_round_trip_and_prune(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    for step in (1, 2, 3):
        path = _save(tmp_path, step, model, opt)
    assert [s for s, _ in ckpt.checkpoint_dirs(tmp_path)] == [2, 3]
    assert ckpt.resolve_checkpoint(tmp_path) == path
    model2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.5)
    state_dicts.load_model_weights(model2, ckpt.load_tensors(path, "model"), path)
    state_dicts.load_optimizer(opt2, ckpt.load_tensors(path, "optimizer"), ckpt.load_json(path, "state")["optimizer"])
    assert torch.equal(model2.weight, model.weight)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s2["param_groups"][0]["lr"] == 0.1
    for k in s1["state"][0]:
        assert torch.equal(torch.as_tensor(s1["state"][0][k]), torch.as_tensor(s2["state"][0][k]))


def test_interrupted_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    good = _save(tmp_path, 1, model, opt)

    def crash(*a, **k):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(ckpt, "_fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, model, opt)
    monkeypatch.undo()
    assert ckpt.resolve_checkpoint(tmp_path) == good  # the half-written step 2 is invisible
    ckpt.remove_stale_temporaries(tmp_path)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [good.name]


def test_a_stop_while_pruning_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    """A kill while an old checkpoint was deleted in place left a step-* folder without its state.json, which
    `fastdiff sample --checkpoint` then refused; it is renamed out of sight first, and a leftover is removed."""
    import shutil

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in (1, 2):
        _save(tmp_path, step, model, opt)
    rmtree = shutil.rmtree

    def stop_midway(path, ignore_errors=False):
        (Path(path) / "state.json").unlink()  # part deleted, then killed
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.shutil, "rmtree", stop_midway)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 3, model, opt)
    monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree)
    assert [s for s, _ in ckpt.checkpoint_dirs(tmp_path)] == [2]  # step 1 is out of sight, step 2 whole
    assert all((p / "state.json").exists() for _, p in ckpt.checkpoint_dirs(tmp_path))
    ckpt.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000000002"]


def test_a_killed_writers_temporary_files_are_removed_at_the_next_start(tmp_path):
    """kill -9 while a grid, stats.png or config.json was written left .NAME.PID.tmp for good (only checkpoints/
    was cleaned); a running process's own (a `fastdiff sample` into the run) stay."""
    import os

    dead = 2**22 + 11  # above Linux's largest pid: no such process
    (tmp_path / "samples").mkdir()
    stale = [tmp_path / f".stats.png.{dead}.tmp", tmp_path / "samples" / f".step-000000005.png.{dead}.tmp"]
    live = tmp_path / f".grid.png.{os.getpid()}.tmp"
    mine = tmp_path / f".notes.{dead}.txt"  # not a temporary file of ours
    for p in (*stale, live, mine):
        p.write_bytes(b"x")
    ckpt.remove_stale_temporaries(tmp_path)
    assert not any(p.exists() for p in stale) and live.exists() and mine.exists()


def test_ctrl_c_during_the_renames_of_files_written_together_waits_for_the_last(tmp_path, monkeypatch):
    """A grid and its samples are renamed into place one after the other: Ctrl-C (or SIGTERM) after the first
    rename left a new grid beside the old samples. Now the signal lands after the last rename."""
    import os
    import signal

    a, b = tmp_path / "grid.png", tmp_path / "grid.npz"
    a.write_bytes(b"old a")
    b.write_bytes(b"old b")
    replace = os.replace
    renamed = []

    def replace_then_interrupt(src, dst):
        replace(src, dst)
        renamed.append(dst)
        if len(renamed) == 1:
            signal.raise_signal(signal.SIGINT)  # to this thread: its KeyboardInterrupt comes at once, unless held

    from fastdiff import files

    monkeypatch.setattr(files.os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_write_all({a: b"new a", b: b"new b"})
    assert (a.read_bytes(), b.read_bytes()) == (b"new a", b"new b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.npz", "grid.png"]  # no temporary file left


def test_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        ckpt.resolve_checkpoint(tmp_path)
    model = torch.nn.Linear(2, 2)
    path = _save(tmp_path, 1, model, torch.optim.SGD(model.parameters(), lr=0.1))
    (path / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        ckpt.load_tensors(path, "model")
    other = _save(tmp_path, 2, model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(CheckpointError, match="does not fit"):
        state_dicts.load_model_weights(torch.nn.Linear(3, 3), ckpt.load_tensors(other, "model"), path)


def test_fused_adamw_resumes_exactly_on_channels_last_weights():
    """The moments come back in their parameter's strides: fused AdamW (fastdiff's optimizer on every device)
    mixes up elements when a channels_last weight has contiguous moments, as a checkpoint file gives them."""
    from fastdiff.train.step import adamw

    def conv():
        torch.manual_seed(0)
        return torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)

    gen = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=gen).contiguous(memory_format=torch.channels_last) if p.dim() == 4
              else torch.randn(p.shape, generator=gen) for p in conv().parameters()] for _ in range(4)]

    def steps(model, opt, gs):
        for g in gs:
            for p, gp in zip(model.parameters(), g):
                p.grad = gp.clone()
            opt.step()

    straight = conv()
    steps(straight, opt := adamw(straight.parameters(), "cpu", lr=1e-2), grads)
    resumed = conv()
    steps(resumed, first := adamw(resumed.parameters(), "cpu", lr=1e-2), grads[:2])
    tensors, meta = state_dicts.optimizer_tensors(first)
    tensors = {k: v.contiguous() for k, v in tensors.items()}  # as safetensors reads them back
    again = adamw(resumed.parameters(), "cpu", lr=1e-2)
    state_dicts.load_optimizer(again, tensors, meta)
    steps(resumed, again, grads[2:])
    assert opt.param_groups[0]["fused"]
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_weights_that_do_not_fit_name_the_keys():
    # load_state_dict's first line names only the model; the message carries what does not fit
    load_model_weights = state_dicts.load_model_weights
    model = torch.nn.Linear(2, 3)
    for tensors, detail in (({"weight": torch.zeros(3, 2)}, 'Missing key(s) in state_dict: "bias"'),
                            ({"weight": torch.zeros(3, 2), "bias": torch.zeros(3), "extra": torch.zeros(1)},
                             'Unexpected key(s) in state_dict: "extra"'),
                            ({"weight": torch.zeros(4, 2), "bias": torch.zeros(3)}, "size mismatch for weight")):
        with pytest.raises(CheckpointError, match="run/model.safetensors does not fit this model") as e:
            load_model_weights(model, tensors, "run/model.safetensors")
        assert detail in str(e.value)
