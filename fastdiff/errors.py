"""User-facing errors. The CLI prints these as one line and exits non-zero; anything else is a bug."""


class FastdiffError(Exception):
    """An error caused by input or environment that the user can fix; the message says how."""


class ConfigError(FastdiffError, ValueError):
    """An unknown preset, dataset, option value or an inconsistent combination of options."""


class DataError(FastdiffError):
    """Missing, corrupt or malformed dataset files."""


class CheckpointError(FastdiffError):
    """A missing, incomplete or incompatible checkpoint."""


class TrainingDiverged(FastdiffError):
    """The loss became NaN or infinite."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, a scheduler's time limit, docker stop), raised where the process is, as Ctrl-C's
    KeyboardInterrupt is: the same cleanup runs (temporary files removed, the run's log says where it stopped)."""
