"""Every Python block of the README's "Use it from Python" section runs as written (README-python.md until the
section is in README.md), each in a fresh namespace, in a folder holding the `runs/digits` run of `make demo`
(here a tiny one)."""

import importlib.util
import os
import re
from pathlib import Path

import pytest

from fastdiff.config import apply_overrides, preset_config
from fastdiff.train import train_ddpm

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Use it from Python"


def section_text() -> str:
    readme = (ROOT / "README.md").read_text()
    if SECTION not in readme:
        readme = (ROOT / "README-python.md").read_text()
    start = readme.index(SECTION) + len(SECTION)
    end = readme.find("\n## ", start)
    return readme[start : end if end >= 0 else None]


BLOCKS = re.findall(r"```python\n(.*?)```", section_text(), flags=re.S)


def test_the_section_has_examples():
    assert len(BLOCKS) >= 3, "the README's Python section lost its examples"


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    tiny = {"model.base_channels": 16, "model.num_groups": 4, "train.batch_size": 16, "train.steps": 2,
            "train.ckpt_every": 2, "train.log_every": 1, "train.warmup_steps": 1}
    train_ddpm(apply_overrides(preset_config("digits"), tiny), root / "runs" / "digits", progress=False,
               echo=lambda s: None)
    return root


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_block_runs(code, demo_dir):
    if "diffusers" in code.replace("fastdiff.schedulers", ""):
        pytest.importorskip("diffusers")
    if "fastdiff.schedulers" in code and importlib.util.find_spec("fastdiff.schedulers") is None:
        pytest.skip("fastdiff.schedulers is not in this checkout (it comes with the interop work)")
    cwd = os.getcwd()
    os.chdir(demo_dir)
    try:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    finally:
        os.chdir(cwd)
