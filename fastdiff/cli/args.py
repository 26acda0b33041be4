"""What every subcommand's parser shares: the help formatter, the one-line usage errors, the checked number
types, the common flag groups (loop, monitor, resume, acceleration) and the --resume / --config layers."""

from __future__ import annotations

import argparse
import math
import sys

from fastdiff.config_checks import ETA_RANGE, GUIDANCE_RANGE
from fastdiff.errors import ConfigError


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help says it already (a None default must: "the
    preset's", "the run's", never "None"); line breaks inside a help are kept (the --preset lists)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text or "required" in text or not action.option_strings
                or default is None or default is False or default is argparse.SUPPRESS):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"

    def _split_lines(self, text, width):
        split = super()._split_lines  # (zero-argument super() does not work inside a comprehension)
        return [line for part in text.splitlines() for line in split(part, width)]


class Parser(argparse.ArgumentParser):
    """Usage errors as one line (`fastdiff sample: error: ...`), exit status 2, like every other error."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but a flag the command does not have is the command's error (`fastdiff eval: error: ...
        (see fastdiff eval --help)`), not the top-level parser's, whose help lists no command's flags."""
        ns, extra = self.parse_known_args(args, namespace)
        if extra:
            command = self
            for action in self._actions:
                if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001 - argparse has no public way
                    command = action.choices.get(getattr(ns, action.dest, None), self)
            command.error(f"unrecognized arguments: {' '.join(extra)}")
        return ns


# --- option checks: every CLI-only number is checked here, as it is parsed (config options: fastdiff.config_checks)

def _number(kind, lo=None, hi=None, *, lo_open=False, allowed: str = ""):
    """An argparse `type=`: a finite int or float in [lo, hi] ((lo, hi] with lo_open), else one message."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        ok = (math.isfinite(value) and (lo is None or (value > lo if lo_open else value >= lo))
              and (hi is None or value <= hi))
        if not ok:
            raise argparse.ArgumentTypeError(f"{text} is outside the allowed range {allowed}")
        return value
    return parse


COUNT = _number(int, 1, 2**31 - 1, allowed="1 and up")  # --n, --steps, --batch-size, ...
SEED = _number(int, 0, 2**62, allowed="0 to 2^62")
GUIDANCE = _number(float, **GUIDANCE_RANGE)  # the ranges of the Python API's sampling options (config_checks)
ETA = _number(float, **ETA_RANGE)
POSITIVE = _number(float, 0, lo_open=True, allowed="above 0, finite")
NON_NEGATIVE_INT = _number(int, 0, 2**31 - 1, allowed="0 and up")


def PATH(text: str) -> str:  # noqa: N802 - a type, as COUNT and the others
    """A file or folder flag's value (`config_checks.path_arg`): an empty one would be the current folder."""
    from fastdiff.config_checks import path_arg

    try:
        return path_arg("the value", text)
    except ConfigError:
        raise argparse.ArgumentTypeError("empty; give a file or folder name") from None


def preset_list(lead: str, descriptions: dict[str, str]) -> str:
    """A --preset help: `lead`, then one line per preset (fastdiff.config keeps the lines beside the presets)."""
    return lead + ":\n" + "\n".join(f"{name}: {text}" for name, text in descriptions.items())


def add_config_file_flag(p, what: str):
    p.add_argument("--config", metavar="FILE", type=PATH,
                   help=f"JSON or TOML file of config sections, e.g. {{\"train\": "
                   f"{{\"lr\": 0.001}}}} or [train] lr = 0.001; {what}; applied over the preset, under the flags "
                   "(default: none)")


def add_loop_flags(p, *, unit: str, ema: str, seed: str):
    """The training skeleton's options, which train and distill share: --amp, --ema-decay, --seed, --ckpt-every,
    --log-every."""
    p.add_argument("--amp", choices=["auto", "fp32", "bf16", "fp16"], help="autocast dtype of training; auto: "
                   "bf16 on a CPU with bf16 instructions (AMX or AVX-512 BF16), else fp32 (`fastdiff env` shows the "
                   "choice) (default: the preset's, auto)")
    p.add_argument("--ema-decay", type=float, help=f"decay of {ema}, after a warm-up: the decay at step n is "
                   "min(decay, (1+n)/(10+n)) (n from 0), so 0.999 from step 8991 on (default: the preset's)")
    p.add_argument("--seed", type=int, help=f"seed of {seed} (default: the preset's, 0)")
    p.add_argument("--ckpt-every", type=int, help=f"checkpoint every N {unit} (default: the preset's)")
    p.add_argument("--log-every", type=int, help=f"log line and stats.jsonl record every N {unit} (default: the "
                   "preset's)")


def add_monitor_flags(p):
    p.add_argument("--sample-every", type=int, help="EMA sample grid every N steps into RUN/samples/step-N.png "
                   "(N in nine digits; default: at each checkpoint; 0: none)")
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                   help="also write scalars and sample grids as TensorBoard events under RUN/tb (default: off)")


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (ValueError, OSError):  # closed
        return False


def show_progress(args) -> bool:
    """A progress bar on stderr: unless --no-progress, where stderr is a terminal (in a log file its redraws would
    be carriage returns between the lines)."""
    return not args.no_progress and stderr_is_terminal()


def add_resume_flags(p, command, warmup: bool = True):
    """--resume (its help names --warmup where the command has it), --dry-run and --no-progress."""
    p.add_argument("--resume", action="store_true",
                   help=f"continue the run in --out from its latest checkpoint; --steps may grow, and --lr"
                   f"{' / --warmup' if warmup else ''} may change: the optimizer state is kept and the new "
                   "learning-rate schedule applies from the resumed step (e.g. after the NaN guard stopped a run: "
                   f"{command} --out RUN --resume --lr 1e-4{' --warmup 1000' if warmup else ''})")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr (log lines go to stderr "
                   "plainly)")


def add_accel_flags(p):
    g = p.add_argument_group("acceleration (defaults: on with a CUDA device, off on the CPU)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on with a CUDA device)")
    g.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="capture each step as a CUDA graph, one replay per step (default: on with a CUDA device)")
    g.add_argument("--compile-mode", help="torch.compile mode (default: Inductor's default)")
    return g


def accel_options(args, device, **extra):
    """AccelOptions for the device's defaults, overridden by the flags the user passed."""
    from fastdiff.runtime import AccelOptions

    return AccelOptions.for_device(device, compile=args.compile, cuda_graphs=args.cuda_graphs,
                                   compile_mode=args.compile_mode, **extra).check(device)


# The flags whose argparse dest is not their name (tests/test_cli.py checks that every name flag_name gives parses).
FLAG_NAMES = {"warmup_steps": "--warmup", "spectral_norm": "--no-spectral-norm"}


def flag_name(dest: str) -> str:
    """The command-line flag of an argparse dest."""
    return FLAG_NAMES.get(dest, "--" + dest.replace("_", "-"))


def _flags(names) -> str:
    return ", ".join(sorted(flag_name(k) for k in names))


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def resumed_config(args, given: dict, keys: dict, not_on_resume: dict, kind: str, parse=None):
    """The run's saved config on `--resume` (`saved_run_config`; None without --resume; an error where --out holds
    none, as the run would refuse it: a dry run printed a new run's config), after
    checking that no flag in `not_on_resume` is given and that `given` (dest -> value; `keys`: dest -> its
    "section.option") changes only the options a resume of `kind` may change (`config.RESUMABLE`, which the
    training loop enforces too; here first, naming the flags, before a dry run prints anything): any other change
    would make the checkpoint and the config disagree (a flag that repeats the run's own value changes nothing),
    and that the run is of this command's `kind` (`config.RUN_KINDS`: a student resumed by train went on as a DDPM
    run). `parse` reads the saved dict (default: config.load_config's checks)."""
    from fastdiff.checkpoint import read_json
    from fastdiff.config import RESUMABLE, load_config
    from fastdiff.train.rundir import check_run_kind, no_checkpoint, saved_run_config

    if not args.resume:
        return None
    saved = saved_run_config(args.out)
    if saved is None:
        raise no_checkpoint(args.out)
    check_run_kind(args.out, kind)  # here too, before --dry-run prints a config of the wrong kind
    d = read_json(saved, error=ConfigError)
    extra = [k for k, v in not_on_resume.items() if v and v != d.get(k)]  # --preset NAME of the run's own: the same
    if extra:
        raise ConfigError(f"--resume continues the run with its own config; drop {_flags(extra)}")
    cfg = load_config(saved) if parse is None else parse(d)
    old = cfg.to_dict()

    def saved_value(dest):
        section, option = keys[dest].split(".")
        return old.get(section, {}).get(option)

    resumable = {dest for dest, key in keys.items() if key in RESUMABLE[kind]}
    changed = {k for k in set(given) - resumable if _plain(given[k]) != _plain(saved_value(k))}
    if changed:
        raise ConfigError(f"{_flags(changed)} cannot change on --resume (only {_flags(resumable)} can)")
    return cfg


def config_file_layer(args, **keys):
    """The --config layer (fastdiff.config_file; empty without --config)."""
    from fastdiff.config_file import ConfigFile, read_config_file

    return read_config_file(args.config, **keys) if args.config else ConfigFile()


def echo_stderr(line: str) -> None:
    print(line, file=sys.stderr)


def absolute_data_dir(overrides: dict, key: str = "data.data_dir") -> dict:
    """overrides with the data folder `key` (a flag's or a --config file's) as an absolute path: recorded as typed,
    a relative one stopped resolving for a distillation or a refiner started from another folder."""
    import os

    value = overrides.get(key)
    if isinstance(value, str) and value.strip():  # "~/data" from a config file too (the shell expands a flag's)
        overrides = {**overrides, key: os.path.abspath(os.path.expanduser(value))}
    return overrides
