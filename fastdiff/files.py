"""Files written atomically: the one place bytes reach the disk (`_write_file`; tests inject disk-full faults
there), the writes of one file or several together through temporary files and renames, the JSON reader, and the
removal of the temporary files a killed writer left. Checkpoint folders themselves: `fastdiff.checkpoint`."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import threading
from pathlib import Path

from fastdiff.errors import CheckpointError, FastdiffError, access_error


def _write_file(path: Path, data: bytes) -> None:
    """Write and flush one file (tests inject disk-full faults here)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_error(path, e: OSError) -> str:
    """One line for a failed write; a full disk names the fix."""
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return f"cannot write {path}: no space left on device; free some space and run again (earlier files are intact)"
    return f"cannot write {path}: {e.strerror or e}; choose a writable path"


@contextlib.contextmanager
def signals_held():
    """SIGINT and SIGTERM held inside: their Python handlers (which run on the main thread; elsewhere there is
    nothing to hold) only note them, and each noted signal is raised again as the block ends, so its exception
    comes after the block's work. (Blocking the signals in the thread's mask does not hold them: the kernel hands
    a signal sent to the process to any other thread, torch's included, and Python then runs its handler.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted = []
    held = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(s) is not None:  # None: a handler installed from C, left alone
            held[s] = signal.signal(s, lambda signum, frame: noted.append(signum))
    try:
        yield
    finally:
        for s, handler in held.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(noted):
            signal.raise_signal(s)


def atomic_write(path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file and a rename: `path` is the old file or the new one, never a
    partial one, and no temporary file is left behind on any error (a full disk gives one FastdiffError)."""
    return atomic_write_all({path: data})[0]


def atomic_write_all(files: dict) -> list[Path]:
    """`atomic_write` of several files together ({path: bytes}), e.g. a grid and its samples: all are written to
    temporary files first and renamed into place only once every one is written, so an error while writing (a full
    disk, Ctrl-C) leaves every file as it was, never a new one beside an old one. Ctrl-C and SIGTERM during the
    renames wait until the last is done (`signals_held`, on the main thread); only a kill -9 or a crash between
    them could mix them."""
    items = [(Path(p), data, Path(p).with_name(f".{Path(p).name}.{os.getpid()}.tmp")) for p, data in files.items()]
    current = items[0][0]
    try:
        for current, data, tmp in items:
            _write_file(tmp, data)
        with signals_held():
            for current, _, tmp in items:
                os.replace(tmp, current)
    except BaseException as e:
        for _, _, tmp in items:
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise FastdiffError(write_error(current, e)) from None
        raise
    return [path for path, _, _ in items]


def json_bytes(obj) -> bytes:
    """How fastdiff writes a JSON file: indented, UTF-8."""
    return json.dumps(obj, indent=2).encode()


def write_json_atomic(path, obj) -> Path:
    return atomic_write(path, json_bytes(obj))


def read_json(path, error=CheckpointError) -> dict:
    """A JSON object from `path`; anything else (missing, unreadable, not JSON, not an object) is one `error`."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path} is missing") from None
    except PermissionError:
        raise access_error(path) from None
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from None
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise error(f"{path} is not valid JSON ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(obj, dict):
        raise error(f"{path} holds a JSON {type(obj).__name__}, not an object; the file is corrupt or not fastdiff's")
    return obj



_TMP_FILE = re.compile(r"^\.(.+)\.(\d+)\.tmp$")  # atomic_write_all's temporary files: .NAME.PID.tmp


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def remove_stale_files(folder: Path, names=None) -> None:
    """The temporary files (`atomic_write_all`'s) in `folder` of processes no longer running: killed while they
    wrote (a running process's are its own). With `names` (a function of a file name), only those of the files it
    accepts: in a folder of the user's, those of the files the command writes."""
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        m = _TMP_FILE.match(p.name)
        if m and (names is None or names(m.group(1))) and p.is_file() and not _running(int(m.group(2))):
            p.unlink(missing_ok=True)
