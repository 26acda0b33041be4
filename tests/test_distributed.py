"""Training under torchrun's environment: DDP on the CPU with gloo, two processes, at a tiny size."""

import contextlib
import datetime
import json
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastdiff import checkpoint as ckpt
from fastdiff.config import RunConfig, apply_overrides, preset_config
from fastdiff.errors import ConfigError
from fastdiff.train.distributed import World, init_world


def test_world_of_one_is_the_plain_run(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    world, device = init_world(torch.device("cpu"), 6)
    assert world == World() and device.type == "cpu" and world.seed(7) == 7
    idx = torch.arange(6)
    assert torch.equal(world.shard(idx), idx) and world.mean(torch.tensor(3.0)) == 3.0


def test_ranks_take_contiguous_slices_and_own_streams():
    ranks = [World(rank=r, size=3) for r in range(3)]
    idx = torch.arange(12) * 10
    assert torch.equal(torch.cat([w.shard(idx) for w in ranks]), idx)
    assert len({w.seed(0) for w in ranks}) == 3


def test_batch_must_split_evenly(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(ConfigError, match="not divisible by the 2 processes"):
        init_world(torch.device("cpu"), 5)


def test_world_size_without_torchrun_is_one_error(monkeypatch):
    """WORLD_SIZE and RANK alone (a leftover, another launcher) were torch's ValueError after the dataset loaded;
    without LOCAL_RANK every process took cuda:0."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="WORLD_SIZE=2 is set but MASTER_ADDR and MASTER_PORT not: run under "
                                          "torchrun"):
        init_world(torch.device("cpu"), 4)


def test_dry_run_under_torchrun_prints_once_and_checks_the_batch_split(monkeypatch, capsys, tmp_path):
    # Every process printed the config (two JSON documents in one stdout), and a batch the run would refuse passed
    from fastdiff.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, printed in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        assert main(["train", "--preset", "digits", "--out", str(tmp_path / "run"), "--dry-run"]) == 0
        assert bool(capsys.readouterr().out) == printed
    assert main(["train", "--preset", "digits", "--out", str(tmp_path / "run"), "--batch-size", "7", "--dry-run"]) == 2
    assert "--batch-size 7 is not divisible by the 2 processes" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_env(rank, world_size, port):
    """What torchrun sets for process `rank` of `world_size` on this machine."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))


def _worker(rank, world_size, port, cfg_dict, out, resume, accel):
    _torchrun_env(rank, world_size, port)
    torch.set_num_threads(1)
    from fastdiff.train import loop, train_ddpm

    if rank:  # the first process chooses the checkpoint a resume starts from, for all (each chose its own)
        def chosen_apart(*args, **kwargs):
            raise AssertionError(f"process {rank} chose the resume's checkpoint itself")

        loop.resume_checkpoint = chosen_apart

    train_ddpm(RunConfig.from_dict(cfg_dict), out, device="cpu", resume=resume, progress=False, echo=lambda s: None,
               accel=accel)


def _launch(cfg, out, resume=False, accel=None):
    mp.spawn(_worker, args=(2, _free_port(), cfg.to_dict(), str(out), resume, accel), nprocs=2, join=True)


@pytest.mark.slow
def test_two_processes_train_resume_exactly_and_only_rank0_writes(tmp_path, tiny_overrides):
    over = {**tiny_overrides, "model.dropout": 0.1, "train.log_every": 2}

    def cfg(steps):
        return apply_overrides(preset_config("digits"), {**over, "train.steps": steps})

    _launch(cfg(4), tmp_path / "a")
    _launch(cfg(2), tmp_path / "b")
    _launch(cfg(4), tmp_path / "b", resume=True)
    log = (tmp_path / "a" / "log.txt").read_text()
    assert "processes=2" in log and log.count("training preset") == 1  # one writer
    stats = [json.loads(line) for line in (tmp_path / "a" / "stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats] == [2, 4] and stats[-1]["kimg"] == 4 * 16 / 1000
    a, b = ckpt.latest_checkpoint(tmp_path / "a"), ckpt.latest_checkpoint(tmp_path / "b")
    assert a.name == b.name == "step-000000004"
    for name in ("model", "ema", "optimizer"):
        ta, tb = ckpt.load_tensors(a, name), ckpt.load_tensors(b, name)
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}.{k} differs after a resumed two-process run"


def test_a_resume_with_another_number_of_processes_says_it_is_not_exact(tmp_path, tiny_overrides):
    # Each process draws its own noise (seed, rank, step): such a resume continues, but not as the run would have
    from fastdiff.train import train_ddpm

    def cfg(steps):
        return apply_overrides(preset_config("digits"), {**tiny_overrides, "train.steps": steps})

    _launch(cfg(2), tmp_path / "run")
    assert json.loads((ckpt.latest_checkpoint(tmp_path / "run") / "state.json").read_text())["processes"] == 2
    train_ddpm(cfg(3), tmp_path / "run", resume=True, progress=False, echo=lambda s: None)
    assert "resuming a run of 2 processes with 1: each process draws its own noise, so this resume is not exact" in (
        tmp_path / "run" / "log.txt").read_text()


def _nan_worker(rank, world_size, port, cfg_dict, out):
    """A run whose batches turn NaN after the third, so it diverges at step 4 after its step-2 checkpoint (as the
    `nan_batches` fixture); each process writes the NaN guard's message it raised."""
    _torchrun_env(rank, world_size, port)
    torch.set_num_threads(1)
    from fastdiff.data import datasets
    from fastdiff.errors import TrainingDiverged
    from fastdiff.train import train_ddpm

    real, calls = datasets.ImageData.batch, [0]

    def poisoned(self, index, device):
        calls[0] += 1
        x, y = real(self, index, device)
        return (x * float("nan") if calls[0] > 3 else x), y

    datasets.ImageData.batch = poisoned
    try:
        train_ddpm(RunConfig.from_dict(cfg_dict), out, device="cpu", progress=False, echo=lambda s: None)
    except TrainingDiverged as e:
        with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
            f.write(str(e))


def test_every_process_names_the_last_checkpoint_after_a_nan(tmp_path, tiny_overrides):
    """The other processes' NaN guard said "no checkpoint was written yet. Start again ... into a new --out" (only
    the first had written it), and the CLI prints every process's error: following that line threw the run away."""
    cfg = apply_overrides(preset_config("digits"), {**tiny_overrides, "train.steps": 8})
    mp.spawn(_nan_worker, args=(2, _free_port(), cfg.to_dict(), str(tmp_path)), nprocs=2, join=True)
    said = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    last = tmp_path / "checkpoints" / "step-000000002"
    assert said[0] == said[1] and f"the last good checkpoint is {last}" in said[1]


def test_two_processes_train_compiled(tmp_path, tiny_overrides):
    """torch.compile of the DDP-wrapped model, as on GPUs (Dynamo's eager backend here, to skip Inductor's C++):
    DDP's forward is no single graph, so fullgraph=True failed every multi-GPU run at its first step."""
    from fastdiff.runtime import AccelOptions

    cfg = apply_overrides(preset_config("digits"), {**tiny_overrides, "train.steps": 2})
    _launch(cfg, tmp_path / "run", accel=AccelOptions(compile=True, compile_backend="eager"))
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step-000000002"
    assert "fullgraph off" in (tmp_path / "run" / "log.txt").read_text()


def _main_first_worker(rank, world_size, port, out):
    _torchrun_env(rank, world_size, port)
    # a process group whose own timeout (1 s) is shorter than the first process's work in main_first (2.5 s):
    # the others must still wait for it (as under NCCL's 10 minutes while rank 0 samples teacher pairs). The
    # store has a long timeout of its own: it returns once both processes have joined, so the 1 s never covers
    # one process starting later than the other.
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=rank == 0,
                          timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=1))
    world, _ = init_world(torch.device("cpu"), world_size)
    try:
        cache = os.path.join(out, "cache.txt")
        with world.main_first():  # the first process writes the cache; the other finds it there
            if world.is_main:
                time.sleep(2.5)
                with open(cache, "w") as f:
                    f.write("made by rank 0")
            found = open(cache).read() if os.path.exists(cache) else "missing"
        with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
            f.write(found)
        # a collective after it: both processes reach it (the barriers of main_first are balanced)
        assert world.mean(torch.tensor(float(rank))).item() == 0.5
    finally:
        world.close()
        dist.destroy_process_group()


def test_main_first_waits_for_the_first_process_beyond_the_group_timeout(tmp_path):
    mp.spawn(_main_first_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "rank1.txt").read_text() == "made by rank 0"


def _distill_worker(rank, world_size, port, cfg_dict, out, older=None):
    _torchrun_env(rank, world_size, port)
    torch.set_num_threads(1)
    from fastdiff.train import add

    if rank == 1 and older:  # its teacher run wrote a checkpoint between the two processes' pins
        add.source_checkpoint = lambda *args, **kwargs: older
    made = []
    init = add.ADDObjective.__init__

    def keep(self, *args, **kwargs):  # the objective, for its discriminator after the run
        init(self, *args, **kwargs)
        made.append(self)

    add.ADDObjective.__init__ = keep
    add.train_add(RunConfig.from_dict(cfg_dict), out, device="cpu", progress=False, echo=lambda s: None)
    torch.save(made[0].disc.state_dict(), os.path.join(out, f"disc-rank{rank}.pt"))
    with open(os.path.join(out, f"teacher-rank{rank}.txt"), "w") as f:
        f.write(made[0].cfg.distill.teacher)


def _pin_race_worker(rank, world_size, port, cfg_dict, out, older):
    """A refiner's process 1 pins `older` (its generator run wrote a checkpoint between the two processes' pins)."""
    _torchrun_env(rank, world_size, port)
    torch.set_num_threads(1)
    from fastdiff.train import refiner

    if rank == 1:
        refiner.source_checkpoint = lambda *args, **kwargs: older
    made = []
    init = refiner.RefinerObjective.__init__

    def keep(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    refiner.RefinerObjective.__init__ = keep
    refiner.train_refiner(refiner.RefinerConfig.from_dict(cfg_dict), out, device="cpu", progress=False,
                          echo=lambda s: None)
    with open(os.path.join(out, f"generator-rank{rank}.txt"), "w") as f:
        f.write(made[0].loaded.path)


def test_every_process_reads_the_source_checkpoint_the_first_pinned(tmp_path, tiny_overrides):
    """Each process pins the other run's checkpoint as it starts, before the process group is up; if that run
    writes a checkpoint in between, they would train against different weights. The first process's pin (the one
    its config.json records) is every process's."""
    from fastdiff.train import train_ddpm
    from fastdiff.train.refiner import RefinerConfig

    gen = tmp_path / "gen"
    train_ddpm(apply_overrides(preset_config("digits"), {**tiny_overrides, "train.steps": 2, "train.ckpt_every": 1}),
               gen, progress=False, echo=lambda s: None)
    older, newest = (str(p.resolve()) for p in sorted((gen / "checkpoints").iterdir()))
    cfg = RefinerConfig(generator=str(gen))
    cfg.train.steps, cfg.train.batch_size, cfg.base_channels = 2, 8, 8
    out = tmp_path / "refiner"
    mp.spawn(_pin_race_worker, args=(2, _free_port(), cfg.to_dict(), str(out), older), nprocs=2, join=True)
    assert json.loads((out / "config.json").read_text())["refiner"]["generator"] == newest
    assert [(out / f"generator-rank{r}.txt").read_text() for r in range(2)] == [newest, newest]


def _cli_worker(rank, world_size, port, argv, out):
    _torchrun_env(rank, world_size, port)
    torch.set_num_threads(1)
    from fastdiff.cli import main

    with open(os.path.join(out, f"stdout-rank{rank}.txt"), "w") as f, contextlib.redirect_stdout(f):
        assert main(argv) == 0


@pytest.mark.slow
def test_two_processes_distill_and_refine_with_the_caches_made_once(tmp_path, tiny_overrides):
    """ADD under DDP: the first process pretrains the ViT backbone and samples the teacher pairs, caching both
    beside the teacher, while the other waits; then both train (once, every run hung here at the start)."""
    from fastdiff.config import distill_config
    from fastdiff.sampling import load_run
    from fastdiff.train import train_ddpm

    teacher = tmp_path / "teacher"
    train_ddpm(apply_overrides(preset_config("digits"), {**tiny_overrides, "train.steps": 2, "train.ckpt_every": 1}),
               teacher, progress=False, echo=lambda s: None)
    older, newest = (str(p.resolve()) for p in sorted((teacher / "checkpoints").iterdir()))
    over = {"train.steps": 2, "train.batch_size": 8, "train.log_every": 1, "train.ckpt_every": 2,
            "train.sample_every": 0, "distill.backbone": "pretrain", "distill.backbone_steps": 3,
            "distill.backbone_dim": 16, "distill.backbone_depth": 2, "distill.backbone_heads": 2,
            "distill.disc_width": 8, "distill.r1_gamma": 0.1, "distill.regress_weight": 1.0,
            "distill.regress_pairs": 6, "distill.regress_steps": 2}
    cfg = apply_overrides(distill_config(load_run(teacher, "cpu").config, str(teacher)), over)
    mp.spawn(_distill_worker, args=(2, _free_port(), cfg.to_dict(), str(tmp_path / "student"), older), nprocs=2,
             join=True)
    # both processes distil the teacher checkpoint the first pinned (process 1 pinned the older one)
    assert [(tmp_path / "student" / f"teacher-rank{r}.txt").read_text() for r in range(2)] == [newest, newest]
    log = (tmp_path / "student" / "log.txt").read_text()
    assert "processes=2" in log and log.count("sampling 6 teacher pairs") == 1
    assert len(list(teacher.glob("vit-digits-*.safetensors"))) == 1
    assert (teacher / "pairs-ddim2-n6.safetensors").exists()
    assert ckpt.latest_checkpoint(tmp_path / "student").name == "step-000000002"
    # the discriminator (not wrapped in DDP) starts from the first process's weights and stays equal on both
    discs = [torch.load(tmp_path / "student" / f"disc-rank{r}.pt") for r in range(2)]
    for k in discs[0]:
        assert torch.equal(discs[0][k], discs[1][k]), f"disc.{k} differs between the processes"
    # and its refiner, on pairs the first process samples and caches in the refiner's run
    argv = ["train-refiner", "--checkpoint", str(tmp_path / "student"), "--out", str(tmp_path / "refiner"),
            "--steps", "2", "--batch-size", "8", "--base-channels", "8", "--pairs", "16", "--no-progress"]
    mp.spawn(_cli_worker, args=(2, _free_port(), argv, str(tmp_path)), nprocs=2, join=True)
    assert len(list((tmp_path / "refiner").glob("pairs-*.safetensors"))) == 1
    assert ckpt.latest_checkpoint(tmp_path / "refiner").name == "step-000000002"
    # the first process prints the run's record, the other nothing
    printed = [(tmp_path / f"stdout-rank{r}.txt").read_text().strip().splitlines() for r in range(2)]
    assert json.loads(printed[0][-1])["step"] == 2 and printed[1] == []
