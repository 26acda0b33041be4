"""`--help` of every command: each subcommand is described, each option says what it does and its default
(never "None"), and --preset lists every preset with its one-line description."""

import argparse
import re

import pytest

from fastdiff import distill_table
from fastdiff.cli import HelpFormatter, build_parser
from fastdiff.config import DISTILL_PRESET_HELP, DISTILL_PRESETS, PRESET_HELP, PRESETS

COMMANDS = ("train", "sample", "eval", "env", "bench", "distill", "train-refiner", "export", "plot")


def _subcommands(parser):
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub


PARSERS = {**_subcommands(build_parser()).choices, "distill_table": distill_table.build_parser()}


def test_every_subcommand_has_a_description_and_a_summary():
    sub = _subcommands(build_parser())
    assert set(sub.choices) == set(COMMANDS)
    summaries = {a.dest: a.help for a in sub._choices_actions}
    for name in COMMANDS:
        assert sub.choices[name].description, f"fastdiff {name} has no description"
        assert summaries.get(name), f"fastdiff {name} has no one-line help in `fastdiff --help`"


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_option_has_help_and_shows_its_default(name):
    parser = PARSERS[name]
    formatter = HelpFormatter(parser.prog)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        what = f"{name} {'/'.join(action.option_strings) or action.dest}"
        assert action.help and action.help.strip(), f"{what} has no help"
        flag_off = action.nargs == 0 and action.default is False  # a plain switch: off unless given
        if action.option_strings and not flag_off:
            shown = formatter._get_help_string(action)
            assert "default" in shown or "required" in shown, f"{what} does not say its default: {shown!r}"
    text = parser.format_help()
    assert "default: None" not in text and "(None)" not in text


def test_formatter_appends_a_set_default_once():
    text = PARSERS["sample"].format_help()
    assert "(default: 100)" in " ".join(text.split())  # --n, appended
    assert text.count("(default: 256 on a GPU") == 1  # --batch-size says it itself: not appended a second time
    assert "(default: ops sample train)" in " ".join(PARSERS["bench"].format_help().split())  # a list default


@pytest.mark.parametrize("presets, descriptions, command",
                         [(PRESETS, PRESET_HELP, "train"), (DISTILL_PRESETS, DISTILL_PRESET_HELP, "distill")])
def test_preset_help_names_every_preset(presets, descriptions, command):
    assert set(descriptions) == set(presets), "every preset needs a one-line description in fastdiff/presets.py"
    for text in descriptions.values():
        assert text.strip() and "\n" not in text
    lines = [line.strip() for line in PARSERS[command].format_help().splitlines()]
    for name in presets:
        assert any(line.startswith(f"{name}: ") for line in lines), f"{command} --help does not list preset {name}"


@pytest.mark.parametrize("name", ["train", "distill", "train-refiner", "sample", "eval", "bench", "distill_table"])
def test_no_progress_is_everywhere_there_is_a_progress_bar(name):
    options = {s for a in PARSERS[name]._actions for s in a.option_strings}
    assert "--no-progress" in options


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_flag_a_help_names_is_one_of_its_commands(name):
    # train-refiner's --resume help told users to pass --warmup, which it does not have
    parser = PARSERS[name]
    options = {s for a in parser._actions for s in a.option_strings}
    text = " ".join([parser.description or "", parser.epilog or "", *(a.help or "" for a in parser._actions)])
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))
    assert named <= options, f"{name}'s help names flags it does not have: {sorted(named - options)}"
