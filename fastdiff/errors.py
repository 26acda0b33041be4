"""User-facing errors. The CLI prints these as one line and exits non-zero; anything else is a bug."""


class FastdiffError(Exception):
    """An error caused by input or environment that the user can fix; the message says how."""


class ConfigError(FastdiffError, ValueError):
    """An unknown preset, dataset, option value or an inconsistent combination of options."""


class DataError(FastdiffError):
    """Missing, corrupt or malformed dataset files."""


class CheckpointError(FastdiffError):
    """A missing, incomplete or incompatible checkpoint."""


class AccessError(FastdiffError):
    """A file or folder that is there but that this user may not read: no damage, so nothing is skipped for it (a
    resume does not fall back past it to an older checkpoint, nor set it aside)."""


def access_error(path, what: str = "read") -> AccessError:
    return AccessError(f"cannot {what} {path}: permission denied; make it readable to this user")


class FastdiffWarning(UserWarning):
    """Something the user may want to know that stops nothing (a dataset file unlike the published one, a refiner
    applied to another model than its own): the CLI prints it as one line, the Python API warns."""


class TrainingDiverged(FastdiffError):
    """The loss became NaN or infinite."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, a scheduler's time limit, docker stop), raised where the process is, as Ctrl-C's
    KeyboardInterrupt is: the same cleanup runs (temporary files removed, the run's log says where it stopped).
    An exception raised inside a finalizer is swallowed, so the training loop also checks `terminating` after
    every step."""


_terminating = [False]


def terminate(signum=None, frame=None):
    """The SIGTERM handler of the CLI: raise Terminated here and remember it (`terminating`); a second SIGTERM
    kills the process at once, as by default."""
    import os
    import signal

    if _terminating[0]:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    _terminating[0] = True
    raise Terminated()


def terminating(reset: bool = False) -> bool:
    """Whether SIGTERM was received (reset: forget it, as each CLI command starts)."""
    if reset:
        _terminating[0] = False
    return _terminating[0]
