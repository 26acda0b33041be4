"""The run directory of a training run: opening it (the one place), the checkpoint a resume starts from (the one
function), and the human and machine logs (log.txt, stats.jsonl).

    RUN/config.json        the resolved config (rewritten when a resume changes a resumable option)
    RUN/log.txt            human lines, appended by every run and resume
    RUN/stats.jsonl        one JSON record per logging interval; a resume drops the records past its checkpoint
    RUN/checkpoints/       atomic checkpoints (`fastdiff.checkpoint`)
    RUN/samples/           EMA sample grids, RUN/stats.png, RUN/tb/ (`fastdiff.train.monitor`)
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from fastdiff import checkpoint as ckpt
from fastdiff import runlock
from fastdiff.errors import ConfigError, FastdiffError
from fastdiff.sources import pin_checkpoint, pinned_or_its_run


def resume_checkpoint(run_dir: Path, log=None) -> Path:
    """The checkpoint that --resume continues from: the newest one whose tensors load and are finite (chosen by
    the writing process, which shares it with the others). Newer checkpoints that failed the check move to
    checkpoints/set-aside/, where nothing prunes or resumes from them; nothing is deleted. Where none passes, one
    error: starting over from step 0 under --resume would be no resume, and would overwrite the damaged
    checkpoints."""
    path = ckpt.latest_good_checkpoint(run_dir, log=log)
    if path is None:
        names = ", ".join(p.name for _, p in ckpt.checkpoint_dirs(run_dir)) or "none"
        raise FastdiffError(f"--resume: no checkpoint of {run_dir} passes its check ({names}; "
                            "the lines above say why each was skipped), so the run cannot continue where it stopped;"
                            f" to start over, move {run_dir} aside and train without --resume")
    ckpt.set_aside_newer(run_dir, path)
    return path


def saved_run_config(run_dir) -> Path | None:
    """The config a resume of run_dir continues with: RUN/config.json, else (deleted or lost) the one inside the
    checkpoint the resume will start from (the newest that passes its check; every checkpoint holds its config);
    None for a directory with neither."""
    saved = Path(run_dir) / "config.json"
    if saved.exists():
        return saved
    good = ckpt.latest_good_checkpoint(run_dir)
    return good / "config.json" if good is not None else None


def source_checkpoint(run_dir, resume: bool, given: str, *key: str, log=None) -> str:
    """The checkpoint of another run that this run reads (a student's teacher, a refiner's generator): on a new
    run, `given` pinned to the checkpoint it resolves to now (`sources.pin_checkpoint`); on a resume, the one
    the run recorded (its config's `key` path), so that it continues with the same weights after the other run
    has trained on. Where that checkpoint is gone (the other run pruned it: it keeps its newest few), its run's
    newest one, and `log` says that the resume is then not exact."""
    saved = saved_run_config(run_dir) if resume else None
    if saved is not None:
        value = ckpt.read_json(saved)
        for k in key:
            value = value.get(k) if isinstance(value, dict) else None
        if isinstance(value, str) and value:
            return pinned_now(value, log, "this run started from")
    return pin_checkpoint(given)


def pinned_now(pinned: str, log=None, what: str = "recorded") -> str:
    """A pinned checkpoint (`sources.pin_checkpoint`) to read now: itself while it exists, else (its run pruned
    it, keeping only its newest few) its run's newest, and `log` says so: what follows is then not exact."""
    now = pinned_or_its_run(pinned)
    if not now.startswith("pretrained:") and not Path(now).exists():  # the run itself moved or deleted
        raise FastdiffError(f"the checkpoint {pinned} {what} is gone{' with its run ' + now if now != pinned else ''}; "
                            "move that run back there (its path is recorded in the config)")
    if now == pinned:
        return pinned
    newest = pin_checkpoint(now)  # its run's newest (an error if the run is gone)
    if log is not None:
        log(f"the checkpoint {pinned} {what} is gone (its run keeps only its newest); continuing with {newest}, so "
            "this is not exact")
    return newest


def check_run_kind(run_dir, kind: str) -> None:
    """A resume of run_dir by the command of `kind` (`config.RUN_KINDS`) continues a run of that kind (its saved
    config's, `config.run_kind`): a student resumed by train went on as a DDPM run, distill on a DDPM run was a
    traceback. One ConfigError naming the command that resumes it; nothing for a folder with no saved config."""
    from fastdiff.config import RUN_KINDS, run_kind

    saved = saved_run_config(run_dir)
    found = run_kind(ckpt.read_json(saved, error=ConfigError)) if saved is not None else kind
    if found != kind:
        raise ConfigError(f"{run_dir} is a run of {RUN_KINDS[found]}, not of {RUN_KINDS[kind]}; resume it with "
                          f"{RUN_KINDS[found]} --out {run_dir} --resume")


def resumed_step(checkpoint: Path, steps: int, run_dir) -> int:
    """The step of the checkpoint a resume starts from; one ConfigError where the run's --steps are below it (a dry
    run checks it too: it printed a config the run refuses)."""
    step = int(ckpt.load_json(checkpoint, "state")["step"])
    if steps < step:
        raise ConfigError(f"--steps {steps} is below step {step}, which the run in {run_dir} already reached; "
                          f"pass --steps {step} or more to continue it")
    return step


def no_checkpoint(run_dir) -> FastdiffError:
    """The error of a --resume where `run_dir` holds no checkpoint (a dry run's too: it printed a new run's config),
    or of any run where it is a file."""
    if Path(run_dir).exists() and not Path(run_dir).is_dir():
        return FastdiffError(f"the run directory {run_dir} is a file, not a folder; choose another --out")
    return FastdiffError(f"--resume: {run_dir} holds no checkpoint to resume from; drop --resume to start a run")


@contextlib.contextmanager
def open_run_dir(run_dir: Path, resume: bool, kind: str):
    """Open a run directory for writing for the duration of the `with` block (the writing process only).

    Checks that it is writable and that --resume matches what it holds (a checkpoint, of a run of `kind`), and
    removes the temporaries of a run
    killed while it wrote a checkpoint. This is the one place a training run opens its directory; it holds the
    run-directory lock (`fastdiff.runlock.lock_run_dir`, released on any exit, kill -9 included) for the block.
    """
    if (run_dir.exists() and not run_dir.is_dir()) or (resume and not run_dir.is_dir()):  # before anything is made
        raise no_checkpoint(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise FastdiffError(f"cannot write to the run directory {run_dir}: {e.strerror}; choose a writable --out")
    if not resume:
        _check_fresh(run_dir)  # reads only, before the lock file is made in a folder that is no run
    with runlock.lock_run_dir(run_dir):  # taken before anything is read, held until the block ends
        ckpt.remove_stale_temporaries(run_dir)
        has_ckpt = ckpt.latest_checkpoint(run_dir) is not None
        if resume and not has_ckpt:
            raise no_checkpoint(run_dir)
        if resume:
            check_run_kind(run_dir, kind)  # before anything is set aside, truncated or rewritten
        if not resume and has_ckpt:
            raise FastdiffError(f"{run_dir} already holds a run; pass --resume to continue it or choose another "
                                "--out")
        yield


RUN_FILES = ("config.json", "stats.jsonl", "log.txt", "samples", "stats.png", "tb")  # what a new run writes over


def _check_fresh(run_dir: Path) -> None:
    """A new run writes config.json, stats.jsonl, log.txt, samples/, stats.png and tb/ (`RUN_FILES`): refused where
    they are there but not a fastdiff run's (no config.json of one, with its train section), and in a checkpoint
    folder, so that nothing of anyone else's is overwritten. Other files (a job script, the run's own redirected
    log) stay beside it; a folder with checkpoints is left to the --resume check."""
    if (run_dir / "model.safetensors").exists() or (run_dir / "state.json").exists():
        raise FastdiffError(f"{run_dir} is a checkpoint folder, not a run directory; choose a new --out")
    if ckpt.latest_checkpoint(run_dir) is not None:
        return
    mine = [name for name in RUN_FILES if (run_dir / name).exists()]
    try:
        config = json.loads((run_dir / "config.json").read_text()) if "config.json" in mine else None
    except (OSError, ValueError):
        config = None
    if mine and not (isinstance(config, dict) and isinstance(config.get("train"), dict)):
        raise FastdiffError(f"{run_dir} holds {', '.join(mine)} of no fastdiff run, which a new run would overwrite; "
                            "choose a new or empty --out")


def truncate_stats(run_dir: Path, step: int) -> int:
    """Drop the stats.jsonl records past `step` (written after the checkpoint a resume starts from), and a line
    torn by a kill, atomically; returns how many were dropped."""
    path = run_dir / "stats.jsonl"
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            keep = isinstance(record, dict) and record.get("step", 0) <= step
        except json.JSONDecodeError:
            keep = False
        if keep:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        ckpt.atomic_write(path, "".join(kept).encode())
    return dropped


def begin_run(run_dir: Path, start: int, config: dict) -> None:
    """Write the run's config and drop what was written past step `start` (the checkpoint a resume starts from; 0,
    an earlier start that stopped before its first checkpoint): stats.jsonl's records and the sample grids. A resume
    does it once its checkpoint is restored, so that one refused on the way leaves the run as it was."""
    truncate_stats(run_dir, start)
    for grid in (run_dir / "samples").glob("step-*.png"):
        if grid.stem[5:].isdigit() and int(grid.stem[5:]) > start:
            grid.unlink()
    ckpt.write_json_atomic(run_dir / "config.json", config)


FINISHED = "finished at step {}"  # the training loop's last line in log.txt, after the last checkpoint, grid and plot


def run_finished(run_dir: Path, step: int) -> bool:
    """Whether the run in `run_dir` wrote everything of its last step: log.txt ends with FINISHED. A stop between
    its last checkpoint and that line (a kill -9 while its grid or stats.png was drawn) leaves it out, and the
    resume then draws what the stop lost."""
    try:
        with open(run_dir / "log.txt", "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            tail = f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return False
    return bool(tail) and tail[-1].endswith("] " + FINISHED.format(step))


def read_stats(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "stats.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunLog:
    """log.txt (human lines) and stats.jsonl (one JSON record per logging interval) in the run directory."""

    def __init__(self, run_dir: Path, echo=None):
        self.run_dir = run_dir
        self.echo = echo
        self._log = open(run_dir / "log.txt", "a", buffering=1)
        self._stats = None  # opened at the first record: a resume truncates the file once its checkpoint is restored

    def line(self, text: str, echo: bool = True) -> None:
        """A line in log.txt, echoed (echo False: the file alone, e.g. what the terminal shows already)."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._log.write(f"[{stamp}] {text}\n")
        if echo and self.echo is not None:
            self.echo(text)

    def stats(self, record: dict) -> None:
        if self._stats is None:
            self._stats = open(self.run_dir / "stats.jsonl", "a", buffering=1)
        self._stats.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._log.close()
        if self._stats is not None:
            self._stats.close()


class QuietLog:
    """The run log of the processes other than the first of a multi-process run: they write nothing."""

    def line(self, text: str, echo: bool = True) -> None:
        pass

    def stats(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass
