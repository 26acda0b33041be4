"""`--config FILE` of `fastdiff train` and `fastdiff distill`: a JSON or TOML file of config sections.

The file is one layer of the resolved config: preset < file < command-line flags. It holds sections of
options ({"train": {"lr": 0.001}} or `[train]` / `lr = 0.001`) and top-level names (the preset; distill's
teacher). Every key is checked here against the config dataclasses, so that a typo is one error naming the
valid keys; the values are checked where the flags' are, when the overrides are applied (fastdiff.config).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fastdiff.config import SECTIONS
from fastdiff.config_checks import check_types, no_clip
from fastdiff.errors import ConfigError


@dataclass
class ConfigFile:
    """What a config file sets: `names` (top-level strings: preset, teacher) and `overrides` ({"section.option":
    value}, the form of `fastdiff.config.apply_overrides`). The empty default is "no --config"."""

    names: dict[str, str] = field(default_factory=dict)
    overrides: dict[str, object] = field(default_factory=dict)


def _unique_keys(pairs: list) -> dict:
    """A JSON object whose keys are all different: of two "train" sections, json.loads kept the last alone."""
    keys = [k for k, _ in pairs]
    if repeated := sorted({k for k in keys if keys.count(k) > 1}):
        raise ValueError(f"key(s) {repeated} given twice in one object; give each once")
    return dict(pairs)


def _parse(path: Path, text: str) -> object:
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            return json.loads(text, object_pairs_hook=_unique_keys)
        except RecursionError:  # nested deeper than the interpreter's stack (a traceback)
            raise ConfigError(f"config file {path} is nested too deep to be a config") from None
        except ValueError as e:  # JSONDecodeError too
            raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    if suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:
            try:
                import tomli as tomllib
            except ImportError:
                raise ConfigError(f"reading {path} needs Python 3.11+ or `pip install tomli`; or write the config "
                                  "as JSON") from None
        try:
            return tomllib.loads(text)
        except RecursionError:
            raise ConfigError(f"config file {path} is nested too deep to be a config") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    raise ConfigError(f"config file {path} must end in .json or .toml")


def read_config_file(path, *, sections: tuple[str, ...], names: tuple[str, ...] = ("preset",),
                     excluded: tuple[str, ...] = ()) -> ConfigFile:
    """The layer a config file sets; `sections` and `names` are the top-level keys it may have, `excluded` the
    "section.option" keys it may not (set elsewhere, e.g. distill.teacher from the teacher's path).

    One ConfigError naming the file for a missing or unparsable file, an unknown key (with the valid keys) and a
    value of the wrong type (ranges are checked with the whole config, `config_checks.validate`).
    """
    path = Path(path)
    if path.suffix.lower() not in (".json", ".toml"):  # before reading it (/dev/zero would never end)
        raise ConfigError(f"config file {path} must end in .json or .toml")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {getattr(e, 'strerror', None) or e}") from None
    doc = _parse(path, text)
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {path} must hold an object of sections, got {type(doc).__name__}")
    layer = ConfigFile()
    for key, value in doc.items():
        if key in names:
            if not isinstance(value, str):
                raise ConfigError(f"{path}: {key} must be a string, got {value!r}")
            layer.names[key] = value
        elif key in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: section {key!r} must be an object of options, got {repr(value)[:60]}")
            valid = [f.name for f in dataclasses.fields(SECTIONS[key]) if f"{key}.{f.name}" not in excluded]
            value = dict(value)
            for option, v in value.items():
                if option not in valid:
                    raise ConfigError(f"{path}: unknown key '{key}.{option}'; the keys of section {key!r} are: "
                                      f"{', '.join(valid)}")
                if f"{key}.{option}" == "sample.clip" and no_clip(v):  # TOML has no null: clip = "none" or inf
                    value[option] = v = None
                layer.overrides[f"{key}.{option}"] = v
            check_types(SECTIONS[key], value, f"{path}: {key}")  # a value of the wrong type names the file too
        else:
            section, _, option = key.partition(".")
            hint = (f" (a section's option goes inside it: {{\"{section}\": {{\"{option}\": ...}}}})"
                    if option and section in sections else "")
            raise ConfigError(f"{path}: unknown key {key!r}{hint}; the valid top-level keys are: "
                              f"{', '.join((*names, *sections))}")
    return layer
