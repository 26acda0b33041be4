"""Multi-process training under torchrun: one process per GPU (or per CPU worker with gloo), DistributedDataParallel.

`fastdiff train` reads torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). The
global batch of step k is the single-process batch of step k (`Batcher.indices(k)`); rank r trains on its
contiguous slice r of it, so the data order is the same for any number of processes. Each rank draws its own
noise, timesteps and dropout masks from (seed, rank, step), so a run is deterministic for a given world size and
resumes exactly; a world size of 1 draws exactly what a plain single-process run draws. Rank 0 alone writes
the run directory (logs, stats, checkpoints) and keeps the EMA; every rank loads checkpoints on resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from fastdiff.errors import ConfigError
from fastdiff.runtime import mix_seed

# How long the other processes wait for the first in `main_first` (it may pretrain a backbone or sample thousands
# of teacher pairs). NCCL's own timeout (10 minutes) would abort them mid-wait; if the first process dies instead,
# torchrun stops the rest, so a long wait is no hang.
MAIN_FIRST_TIMEOUT = datetime.timedelta(hours=24)


@dataclass
class World:
    rank: int = 0
    size: int = 1
    initialised_here: bool = False
    # a gloo group of all processes with MAIN_FIRST_TIMEOUT for main_first's waits, made by its first call (which
    # every process makes), so that a run that never waits needs no gloo beside NCCL
    wait_group: object = field(default=None, compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def seed(self, seed: int) -> int:
        """The seed of this rank's random streams: the run's own seed on a single process."""
        return seed if not self.distributed else mix_seed(seed, self.rank, stream=11)

    def shard(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch of indices."""
        per = indices.shape[0] // self.size
        return indices[self.rank * per : (self.rank + 1) * per]

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor over the ranks (the tensor itself on one process)."""
        if not self.distributed:
            return value
        value = value.clone()
        dist.all_reduce(value)
        return value / self.size

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel(model) on several processes (gradients averaged in backward), else model."""
        if not self.distributed:
            return model
        device = next(model.parameters()).device
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    def adjust(self, accel, log):
        """The acceleration options this world can use: no CUDA graphs around DDP's collectives, and a compiled
        DDP model that may break its graph (Dynamo splits DDP's forward at the gradient buckets, so that their
        all-reduces overlap the backward; fullgraph=True refuses DDP's forward at the first step)."""
        if not self.distributed:
            return accel
        if accel.cuda_graphs:
            log("CUDA graphs are off with several processes (DDP all-reduces in backward); compile stays on")
            accel = dataclasses.replace(accel, cuda_graphs=False)
        if accel.compile and accel.fullgraph:
            log("torch.compile runs with fullgraph off with several processes (DDP's forward is split at its "
                "gradient buckets)")
            accel = dataclasses.replace(accel, fullgraph=False)
        return accel

    def from_main(self, value):
        """The first process's `value` (picklable), on every process: what the ranks decided apart before the
        process group was up (a source checkpoint each pinned when it started) becomes the first's, which is the
        one it recorded in the run directory."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self, group=None) -> None:
        if self.distributed:
            dist.barrier(group=group)

    @contextlib.contextmanager
    def main_first(self):
        """Run the body on the first process, then on the rest: what it writes (a cache), they read.

        The body must hold no collective (DDP's construction is one): the other processes wait in a barrier
        while the first runs it, on the CPU (gloo) for up to MAIN_FIRST_TIMEOUT, not under NCCL's timeout. If the
        first process fails, the rest still go on, and fail on their own."""
        if self.distributed and self.wait_group is None:
            self.wait_group = dist.new_group(backend="gloo", timeout=MAIN_FIRST_TIMEOUT)
        if not self.is_main:
            self.barrier(self.wait_group)
        try:
            yield
        finally:
            if self.is_main:
                self.barrier(self.wait_group)

    def close(self) -> None:
        if not dist.is_initialized():
            return
        if self.initialised_here:
            dist.destroy_process_group()  # every group with it
        elif self.wait_group is not None:
            dist.destroy_process_group(self.wait_group)


def _env_world() -> tuple[int, int]:
    """(rank, size) from torchrun's environment; (0, 1) for a process on its own."""
    size = _env_int("WORLD_SIZE", "1")
    if size < 1:
        raise ConfigError(f"WORLD_SIZE={size} must be 1 or more; run under torchrun, or unset WORLD_SIZE")
    if size == 1:
        return 0, 1
    rank = _env_int("RANK", None)
    if not 0 <= rank < size:
        raise ConfigError(f"RANK={rank} is outside 0..{size - 1} (WORLD_SIZE={size}); run under torchrun, which sets "
                          "both")
    return rank, size


def _env_int(name: str, default: str | None) -> int:
    text = os.environ.get(name, default)
    try:
        return int(text)
    except (TypeError, ValueError):
        said = f"{name} is not set" if text is None else f"{name}={text!r} is not an integer"
        raise ConfigError(f"{said}; run under torchrun (which sets WORLD_SIZE, RANK and LOCAL_RANK), or unset "
                          "WORLD_SIZE to run one process") from None


def is_main_process() -> bool:
    """Whether this process is the first of torchrun's, or runs alone: the one that reports the run."""
    return _env_world()[0] == 0


def torchrun_processes() -> int:
    """How many processes torchrun started (1 for a process on its own)."""
    return _env_world()[1]


def check_batch_split(batch_size: int) -> None:
    """The global batch splits evenly over torchrun's processes (its environment; any batch on its own)."""
    size = torchrun_processes()
    if batch_size % size:
        raise ConfigError(f"--batch-size {batch_size} is not divisible by the {size} processes; "
                          f"use a multiple of {size}")


def init_world(device: torch.device, batch_size: int) -> tuple[World, torch.device]:
    """The World from torchrun's environment (one process: World()), and the device this rank uses."""
    rank, size = _env_world()
    if size == 1:
        return World(), device
    here = not dist.is_initialized()
    # torchrun sets them all; WORLD_SIZE alone (a leftover in the shell, another launcher) was torch's ValueError
    # after the dataset loaded, and LOCAL_RANK's absence put every process on cuda:0
    needed = (["MASTER_ADDR", "MASTER_PORT"] if here else []) + (["LOCAL_RANK"] if device.type == "cuda" else [])
    if missing := [name for name in needed if name not in os.environ]:
        raise ConfigError(f"WORLD_SIZE={size} is set but {' and '.join(missing)} not: run under torchrun "
                          "(torchrun --nproc_per_node N -m fastdiff.cli ...), which sets them, or unset WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK", "0")
    check_batch_split(batch_size)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs; "
                              "lower --nproc_per_node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if here:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(rank, size, here), device

