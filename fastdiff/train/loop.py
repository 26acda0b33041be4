"""The training skeleton, in the manner of EDM2's training_loop: one loop that owns the state, the metering, the
checkpoints and resume, the NaN guard, the logs and the progress bar, and an objective that supplies the step.

DDPM (`train.ddpm`), ADD (`train.add`) and the refiner (`train.refiner`) are objectives. An objective is built
from a `Session` (device, processes, acceleration options, log) and gives the loop:

    kind, command        the checkpoint's kind ("ddpm", ...) and the CLI command that trains it (for advice)
    warmup               whether its learning rate has a --warmup (the refiner's one cycle has none)
    parts                its trained networks (`Part`: module, optimizer, lr(step), loss scaler); parts[0] is the
                         network that is sampled
    ema                  whether parts[0] is averaged into an EMA (saved as `ema`, sampled in the grids)
    stats                the names of the values that step() returns, the loss first
    step(k, x0, labels)  all the updates of training step k on the batch of step k; made of `Session.train_step`s,
                         which give it bf16, torch.compile, CUDA graphs and DDP where the options allow
    extra_state()        JSON saved in each checkpoint's state.json besides the loop's own
    grid(model)          a sample grid (uint8 HWC, `monitor.sample_grid`) of the EMA network, or None for none
    describe()           its part of the run's first log line

Per-step randomness is a pure function of (seed, step): the batch of step k comes from `Batcher`, its noise,
timesteps and dropout from generators seeded with (seed, step) inside the train steps, and its learning rates
from the parts' lr(step). A run killed at any moment and resumed from its latest checkpoint continues exactly
as the uninterrupted run does.

Resume: `--steps` may grow (never fall below the run's step; equal: the run is finished and nothing is written),
and `--lr` / `--warmup` may change: the optimizer state is kept, and from the resumed step on the learning rate is
the new schedule's lr(step), as if the run had been configured so from the start. The change is logged in
log.txt and kept in config.json. That is how a run stopped by the NaN guard continues from its last good
checkpoint.
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from fastdiff import __version__, state_dicts
from fastdiff import checkpoint as ckpt
from fastdiff.config import TrainConfig, resume_changes
from fastdiff.errors import DataError, FastdiffError, Terminated, terminating
from fastdiff.runtime import AccelOptions, check_amp, command_line, mix_seed, resolve_device
from fastdiff.train.batcher import Batcher
from fastdiff.train.distributed import World, init_world
from fastdiff.train.ema import EMA
from fastdiff.train.ema import describe as describe_ema
from fastdiff.train.meter import IntervalMeter
from fastdiff.train.monitor import Monitor
from fastdiff.train.rundir import (
    FINISHED,
    QuietLog,
    RunLog,
    begin_run,
    open_run_dir,
    read_stats,
    resume_checkpoint,
    resumed_step,
    run_finished,
)
from fastdiff.train.step import make_train_step


@dataclass
class Part:
    """A network with its optimizer, learning rate lr(step) and loss scaler, saved and restored together.

    In a checkpoint its weights are `<name>.safetensors`; its optimizer is `optimizer` for the part named "model"
    and `<name>_optimizer` otherwise (likewise the grad-scaler state). `tensors` / `load` replace the module's
    own state_dict / load_state_dict where only some of its tensors are saved (a frozen backbone).
    """

    name: str
    module: torch.nn.Module
    opt: torch.optim.Optimizer
    lr: Callable[[int], float]
    scaler: torch.amp.GradScaler
    tensors: Callable[[], dict] | None = None
    load: Callable[[dict, Path], None] | None = None

    @property
    def prefix(self) -> str:
        return "" if self.name == "model" else self.name + "_"

    def set_lr(self, step: int) -> float:
        lr = self.lr(step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        return lr


class Session:
    """What an objective builds its steps from: the device, the processes, the options, the run's log, and whether
    this process draws progress bars (of a setup that takes minutes, too: a ViT's pretraining, teacher pairs)."""

    def __init__(self, tc: TrainConfig, device: torch.device, world: World, accel: AccelOptions, log,
                 run_dir: Path, progress: bool = False):
        self.tc, self.device, self.world, self.accel, self.log = tc, device, world, accel, log
        self.run_dir, self.progress = run_dir, progress
        self.steps: list[tuple[str, object]] = []

    @property
    def memory_format(self) -> torch.memory_format:
        """The layout of the run's activations (`--channels-last`)."""
        return torch.channels_last if self.tc.channels_last else torch.contiguous_format

    def train_step(self, part: Part, loss_fn: Callable, *, grad_clip: float, compiled: bool, stream: int = 0,
                   buffers=()):
        """The train step of one part (`fastdiff.train.step.make_train_step`): graphed where the options allow.

        stream 0 draws the run's own random numbers; a second step of the same objective takes another stream.
        `compiled` says whether loss_fn runs a compiled network (for the log line).
        """
        seed = self.world.seed(self.tc.seed)
        seed = seed if stream == 0 else mix_seed(seed, stream, stream=17)
        step = make_train_step(part.module, part.opt, loss_fn, grad_clip=grad_clip, seed=seed, device=self.device,
                               amp=self.tc.amp, options=self.accel, scaler=part.scaler,
                               log=self.log if not self.steps else None, buffers=buffers)
        self.steps.append((f"{type(step).__name__}({'compiled' if compiled else 'eager'})", step))
        return step

    def describe(self) -> str:
        return "+".join(name for name, _ in self.steps)

    def take_setup_seconds(self) -> float:
        return sum(step.take_setup_seconds() for _, step in self.steps)


def _advice(objective, run_dir: Path, tc: TrainConfig, last_ckpt: str | None) -> str:
    """After a NaN: the command that goes on with a lower learning rate (and a longer warm-up, where it has one)."""
    command, has_warmup = objective.command, objective.warmup
    change = "a lower learning rate or a longer warm-up" if has_warmup else "a lower learning rate"
    flags = f"--lr {tc.lr / 2:g}" + (f" --warmup {max(2 * tc.warmup_steps, 100)}" if has_warmup else "")
    fp = "use --amp bf16 or fp32 instead of fp16, " if tc.amp == "fp16" else ""
    if last_ckpt is None:
        return (f"no checkpoint was written yet. Start again with {change} ({command} {flags} into a new --out), "
                f"{fp}or check the data for NaNs")
    return (f"the last good checkpoint is {last_ckpt}. Resume from it with {change}: {command} --out {run_dir} "
            f"--resume {flags} ({fp}or check the data for NaNs)")


def _stopped(e: BaseException, where: str, last_ckpt: str | None, run_dir: Path, world: World,
             command: str | None = None) -> str:
    """The log line of a run stopped by an error or a signal: where, and how to go on (`command`: the objective's,
    where it was built)."""
    if isinstance(e, FastdiffError):
        return f"stopped {where}: {e}"
    how = f" under torchrun with {world.size} processes" if world.distributed else ""
    resume = f"{command} --out {run_dir} --resume" if command else "the same command with --resume"
    go_on = f"continue from {last_ckpt} with: {resume}{how}" if last_ckpt else "no checkpoint was written yet"
    return f"{'terminated' if isinstance(e, Terminated) else 'interrupted'} {where}; {go_on}"


def _save(run_dir: Path, objective, ema: EMA | None, config: dict, tc: TrainConfig, step: int, images_seen: int,
          processes: int, classes: list[str]):
    tensors, state = {}, {"step": step, "images_seen": images_seen, "kind": objective.kind, "processes": processes,
                          "classes": classes, **objective.extra_state()}
    for part in objective.parts:
        tensors[part.name] = part.tensors() if part.tensors else part.module.state_dict()
        tensors[part.prefix + "optimizer"], state[part.prefix + "optimizer"] = state_dicts.optimizer_tensors(part.opt)
        state[part.prefix + "grad_scaler"] = part.scaler.state_dict() if part.scaler.is_enabled() else None
        state[part.prefix + "lr"] = part.lr(step)
    if ema is not None:
        tensors["ema"] = ema.model.state_dict()
    return str(ckpt.save_checkpoint(run_dir, step, tensors=tensors, state=state, config=config,
                                    keep=tc.keep_checkpoints))


def _restore(path: Path, objective, ema: EMA | None, device) -> dict:
    where = path / "state.json"
    state = ckpt.load_state(path, keys=("step", "images_seen") + tuple(p.prefix + "optimizer" for p in objective.parts))
    for part in objective.parts:
        weights = ckpt.load_tensors(path, part.name, device)
        part.load(weights, path) if part.load else state_dicts.load_model_weights(part.module, weights, path)
        opt_tensors = ckpt.load_tensors(path, part.prefix + "optimizer", device)
        state_dicts.load_optimizer(part.opt, opt_tensors, state[part.prefix + "optimizer"], where=where)
        if state.get(part.prefix + "grad_scaler"):
            state_dicts.load_state_dict_checked(part.scaler, state[part.prefix + "grad_scaler"], where)
    if ema is not None:
        state_dicts.load_model_weights(ema.model, ckpt.load_tensors(path, "ema", device), path)
    return state


def _check_classes(state: dict, data, path: Path) -> None:
    """The dataset's classes, in label order, are those the checkpoint trained on (an image folder's are its
    sorted class folders: one renamed gave its label to another class without a word). Checkpoints before
    2026-12-07 recorded none."""
    then = state.get("classes")
    if then is not None and list(then) != list(data.class_names):
        raise DataError(f"the {data.name} dataset's classes (labels 0, 1, ...) are {', '.join(data.class_names)}, but "
                        f"{path} trained on {', '.join(then)}; restore the class folders as they were, or start a "
                        "new --out")


def train_loop(build: Callable[[Session], object], *, kind: str, data, tc: TrainConfig, config: dict, run_dir,
               device="auto", resume: bool = False, progress: bool = True, echo=print,
               accel: AccelOptions | None = None) -> dict:
    """Train (or resume) the objective that `build(session)` makes, on `data`, in `run_dir`; `kind` is the
    objective's (`config.RUN_KINDS`), which a resumed run must be (`rundir.check_run_kind`).

    `tc` holds the loop's settings (steps, batch size, seed, amp, intervals, EMA decay), checked by the trainer
    that calls it (`config.checked`, `RefinerConfig.from_dict`); `config` is the run's whole config, written to
    config.json and into every checkpoint. Returns the last stats record (on a finished run: {"step": N,
    "already_finished": True}).
    """
    run_dir = Path(run_dir)
    world, device = init_world(resolve_device(device), tc.batch_size)  # torchrun: one process per device
    # amp "auto" and channels_last None become this device's defaults here, once: the run records what it ran.
    tc = tc.for_device(device)
    config = {**config, "train": {**config["train"], "amp": tc.amp, "channels_last": tc.channels_last}}
    try:
        check_amp(tc.amp, device)
        if world.is_main:
            with open_run_dir(run_dir, resume, kind):
                result = _run(build, kind, world, data, tc, config, run_dir, device, resume, progress, echo, accel)
        else:
            result = _run(build, kind, world, data, tc, config, run_dir, device, resume, False, echo, accel)
        world.barrier()  # every process done (the first writes the last checkpoint) before any tears the group down
        return result
    finally:
        world.close()


def _run(build, kind: str, world: World, data, tc: TrainConfig, config: dict, run_dir: Path, device,
         resume: bool, progress: bool, echo, accel) -> dict:
    world.barrier()  # the first process has opened the run directory
    path = None
    if resume:  # the first process's choice on all (each choosing while it set corrupt ones aside could differ)
        path = resume_checkpoint(run_dir, log=echo) if world.is_main else None
        path = world.from_main(None if path is None else str(path))
        path = Path(path) if path is not None else None
    start = resumed_step(path, tc.steps, run_dir) if path is not None else 0
    if path is not None and start == tc.steps and run_finished(run_dir, start):  # else: a stop lost its end (_loop)
        if world.is_main:
            echo(f"the run in {run_dir} is already finished at step {start}; pass --steps N (above {start}) with "
                 "--resume to train it further")
        return {"step": start, "already_finished": True}
    changed = resume_changes(ckpt.load_json(path, "config"), config, kind) if path is not None else []
    if world.is_main and path is None:  # a resume writes its config once its checkpoint is restored (begin_run)
        begin_run(run_dir, start, config)
    write = (lambda s: tqdm.write(s, file=sys.stderr)) if progress else echo
    log = RunLog(run_dir, echo=write) if world.is_main else QuietLog()
    log.line(f"{command_line()} (fastdiff {__version__}, torch {torch.__version__}, Python "
             f"{platform.python_version()})", echo=False)
    monitor = None
    try:
        accel = AccelOptions.for_device(device) if accel is None else accel.check(device)
        session = Session(tc, device, world, world.adjust(accel, log.line), log.line, run_dir, progress)
        torch.manual_seed(tc.seed)
        try:  # the setup (a student's teacher pairs and backbone may take minutes)
            objective = build(session)
            main = objective.parts[0]
            ema = EMA(main.module, tc.ema_decay) if world.is_main and objective.ema else None
            images_seen, last_ckpt, saved_processes = 0, None, world.size
            if path is not None:
                state = _restore(path, objective, ema, device)
                _check_classes(state, data, path)
                images_seen, last_ckpt, saved_processes = state["images_seen"], str(path), state.get("processes")
        except (KeyboardInterrupt, FastdiffError) as e:
            log.line(_stopped(e, f"before step {start + 1}", str(path) if path else None, run_dir, world),
                     echo=isinstance(e, KeyboardInterrupt))  # a FastdiffError: the command prints it
            raise
        if world.is_main and path is not None:
            begin_run(run_dir, start, config)
        batcher = Batcher(len(data), tc.batch_size, tc.seed)
        log.line(f"{'resuming at step ' + str(start) if path is not None else 'training'} {objective.describe()} "
                 f"dataset={data.name} ({len(data)} images {tuple(data.shape)}) device={device} amp={tc.amp} "
                 f"steps={tc.steps} batch={tc.batch_size} step={session.describe()} processes={world.size}"
                 + (f" ema={describe_ema(tc.ema_decay, tc.steps)}" if objective.ema else ""))
        for key, a, b in changed:  # a new learning rate schedule goes on from the optimizer's kept state
            kept = " (the optimizer state is kept)" if key in ("train.lr", "train.warmup_steps") else ""
            log.line(f"resumed with {key} {a} -> {b} from step {start} on{kept}")
        if saved_processes is not None and saved_processes != world.size:  # (a checkpoint before 2026-12-07: None)
            log.line(f"resuming a run of {saved_processes} processes with {world.size}: each process draws its own "
                     "noise, so this resume is not exact (it is for the same number of processes)")
        if world.is_main:
            monitor = Monitor(run_dir, tensorboard=tc.tensorboard, start_step=start,
                              plot_keys=("loss", "images_per_sec", "lr"))
        return _loop(objective, session, ema, monitor, log, data, batcher, tc, config, run_dir, start,
                     images_seen, last_ckpt, progress)
    finally:
        if monitor is not None:
            monitor.close()
        log.close()


def _loop(objective, session: Session, ema, monitor, log, data, batcher, tc: TrainConfig, config, run_dir, start,
          images_seen, last_ckpt, progress) -> dict:
    world, device = session.world, session.device
    sample_every = tc.ckpt_every if tc.sample_every is None else tc.sample_every

    def grid_due(step: int) -> bool:
        return sample_every > 0 and (step % sample_every == 0 or step == tc.steps)

    record, done = {}, start
    if start == tc.steps:  # a stop after the last checkpoint: its grid (below), stats.png and last line are drawn now
        record = ([{}] + read_stats(run_dir))[-1]
        if monitor is not None:
            monitor.plot()
    if (monitor is not None and ema is not None and start and grid_due(start)
            and not monitor.grid_path(start).exists()):  # stopped between the checkpoint and its grid: drawn now
        if (grid := objective.grid(ema.model)) is not None:
            log.line(f"samples {monitor.grid(start, grid)} (the stopped run's, drawn on resuming)")
    # the clocks start here: a grid drawn on resuming (seconds) was counted in the first interval's images/s
    bar = tqdm(total=tc.steps, initial=start, disable=not progress, unit="step", dynamic_ncols=True)
    meter = IntervalMeter(objective.stats, device, start, reduce=world.mean)
    for part in objective.parts:
        part.module.train()
    try:
        for step in range(start, tc.steps):
            lrs = [part.set_lr(step) for part in objective.parts]
            x0, labels = data.batch(world.shard(batcher.indices(step)), device)
            meter.add(*objective.step(step, x0, labels))
            if ema is not None:
                ema.update(objective.parts[0].module, step)
            images_seen += tc.batch_size
            done = step + 1
            bar.update(1)
            if terminating():  # a SIGTERM whose exception a finalizer swallowed
                raise Terminated()
            is_ckpt = done % tc.ckpt_every == 0 or done == tc.steps
            is_grid = grid_due(done)
            if not (done % tc.log_every == 0 or is_ckpt or is_grid):
                continue
            advice = _advice(objective, run_dir, tc, last_ckpt)
            record = {"step": done, "kimg": images_seen / 1000,
                      **meter.read(done, tc.batch_size, advice, session.take_setup_seconds()),
                      "lr": lrs[0], "time": time.time()}
            log.stats(record)
            terms = " ".join(f"{k} {record[k]:.4f}" for k in objective.stats if k != "grad_norm")
            log.line(f"step {done}/{tc.steps} {terms} {record['images_per_sec']:.0f} img/s")
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if is_ckpt and world.is_main:
                last_ckpt = _save(run_dir, objective, ema, config, tc, done, images_seen, session.world.size,
                                  data.class_names)
                log.line(f"checkpoint {last_ckpt}")
            elif is_ckpt:  # the first process's, which every process's advice after a NaN names (it said "none")
                last_ckpt = str(ckpt.checkpoint_path(run_dir, done))
            if monitor is not None:
                if is_grid and ema is not None and (grid := objective.grid(ema.model)) is not None:
                    log.line(f"samples {monitor.grid(done, grid)}")
                monitor.record(record, last=done == tc.steps)
            meter.restart()  # checkpoints, grids and plots are not training time
    except (KeyboardInterrupt, FastdiffError) as e:  # the run's log says where it stopped, and how to go on
        bar.close()
        if world.is_main and isinstance(e, KeyboardInterrupt):  # only a stop's line names the checkpoint to go on
            newest = ckpt.latest_checkpoint(run_dir)  # a stop inside _save after its rename: that one, not the last
            last_ckpt = str(newest) if newest is not None else last_ckpt
        log.line(_stopped(e, f"after step {done}", last_ckpt, run_dir, world, objective.command),
                 echo=isinstance(e, KeyboardInterrupt))  # a FastdiffError: the command prints it
        raise
    finally:
        bar.close()
    log.line(FINISHED.format(tc.steps))
    return record
