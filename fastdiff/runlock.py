"""One writer per run directory: an exclusive flock on RUN/.lock that holds the writer's pid.

`fastdiff.train.rundir.open_run_dir` takes it before it reads anything in the run directory. `waiting_lock`: one
process at a time through a block (a dataset's download and unpacking), the others waiting their turn.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import tempfile
from pathlib import Path

from fastdiff.errors import FastdiffError

LOCK_FILE = ".lock"


class RunDirLock:
    """An exclusive flock on <run_dir>/.lock holding the writer's pid. The kernel drops the lock when the process
    exits in any way (kill -9 included), so a stale lock file never blocks a later run."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunDirLock":
        import fcntl

        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise FastdiffError(f"cannot write to the run directory {self.run_dir}: {e.strerror}; "
                                "choose a writable --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise FastdiffError(f"cannot lock the run directory {self.run_dir}: {e.strerror}") from None
            raise FastdiffError(f"the run directory {self.run_dir} is in use by another fastdiff process (pid "
                                f"{holder}); wait for it to finish or stop it, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunDirLock":
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run_dir(run_dir) -> RunDirLock:
    """Take the run directory's writer lock (a FastdiffError naming the holder's pid if another process has it).
    Use as `with lock_run_dir(out): ...` or call `.release()`."""
    return RunDirLock(run_dir).acquire()


def waiting_lock_path(name: str, key) -> Path:
    """The lock file of `waiting_lock(name, key)`: in the temporary folder, named by `name` and the resolved path
    `key` (nothing is written beside `key`, which may not exist yet or be read-only)."""
    digest = hashlib.sha256(str(Path(key).resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"fastdiff-{name}-{digest}.lock"


@contextlib.contextmanager
def waiting_lock(name: str, key: Path):
    """One process at a time inside (the others wait): an exclusive flock on `waiting_lock_path(name, key)`. The
    kernel drops it when its process ends in any way."""
    import fcntl

    fd = os.open(waiting_lock_path(name, key), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # the flock goes with its last descriptor
