"""`fastdiff train | sample | eval | env | bench | distill | train-refiner | export | plot`.

Errors that the user can fix (FastdiffError) print one line and exit with status 2; anything else is a bug
and keeps its traceback. A FastdiffWarning prints one line too, and the command goes on. Every command first has
glibc's malloc keep freed memory for the next call (`runtime.apply_malloc_setting`; FASTDIFF_MALLOC=default leaves
glibc's rules) and refuses a bad FASTDIFF_BACKEND. Each subcommand's parser function sits beside its command
function: `training` holds train, distill and train-refiner, `sampling` sample, eval and the tools, `args` what
their parsers share.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings

from fastdiff.cli import sampling, training
from fastdiff.cli.args import HelpFormatter, Parser
from fastdiff.cli.sampling import add_sampling_args, sampling_overrides
from fastdiff.errors import FastdiffError, FastdiffWarning, Terminated, terminate, terminating
from fastdiff.ops.dispatch import current_backend
from fastdiff.runtime import apply_malloc_setting

__all__ = ["HelpFormatter", "add_sampling_args", "build_parser", "main", "sampling_overrides"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fastdiff", description="Fast diffusion training and sampling.")
    sub = parser.add_subparsers(dest="command", required=True)
    training.add_train(sub)
    sampling.add_sample(sub)
    sampling.add_eval(sub)
    sampling.add_env(sub)
    training.add_distill(sub)
    training.add_train_refiner(sub)
    sampling.add_bench(sub)
    sampling.add_export(sub)
    sampling.add_plot(sub)
    return parser


COMMANDS = {"train": training.cmd_train, "sample": sampling.cmd_sample, "eval": sampling.cmd_eval,
            "env": sampling.cmd_env, "distill": training.cmd_distill, "train-refiner": training.cmd_train_refiner,
            "bench": sampling.cmd_bench, "export": sampling.cmd_export, "plot": sampling.cmd_plot}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    handle = main_thread and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if handle:
        terminating(reset=True)
        signal.signal(signal.SIGTERM, terminate)  # cleaned up as Ctrl-C is, not killed mid-write
    try:
        apply_malloc_setting()  # before the command allocates (README, "CPU defaults")
        current_backend()  # a bad FASTDIFF_BACKEND: its one line now, not at the first op call (or never, in env)
        with warnings.catch_warnings():  # restores the caller's showwarning (main is also called in-process)
            warnings.showwarning = _one_line(args.command, warnings.showwarning)
            code = COMMANDS[args.command](args)
        sys.stdout.flush()  # here, not at exit, so that a closed pipe is the BrokenPipeError below
        return code
    except FastdiffError as e:
        print(f"fastdiff {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        return _stopped(args.command, e)
    except BrokenPipeError:  # stdout closed early (`| head`): the rest of the output has no reader
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that exit's flush cannot fail again
        except (OSError, ValueError):  # a stdout without a file descriptor (captured)
            pass
        return 141
    except Exception as e:  # a Ctrl-C or SIGTERM raised inside an import or a C callback, which wrapped it
        stop = e.__cause__ or e.__context__
        if not isinstance(stop, KeyboardInterrupt):
            raise
        return _stopped(args.command, stop)
    finally:
        if handle:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _one_line(command: str, show):
    """warnings.showwarning printing a FastdiffWarning as `fastdiff COMMAND: warning: ...` (no file and line of
    fastdiff's source); any other warning as `show` does."""
    def one_line(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, FastdiffWarning):
            print(f"fastdiff {command}: warning: {' '.join(str(message).split())}", file=file or sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)
    return one_line


def _stopped(command: str, e: KeyboardInterrupt) -> int:
    """The line and exit status of a command stopped by Ctrl-C (130) or SIGTERM (143)."""
    terminated = isinstance(e, Terminated)
    print(f"fastdiff {command}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
    return 143 if terminated else 130
