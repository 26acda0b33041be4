"""Runs the `interpret` op tests (the Triton kernels on the CPU) in a process started with TRITON_INTERPRET=1.

Triton decides between compiling and interpreting when it decorates a kernel, i.e. at import, so the variable must
be set before the process imports triton; this test is how `make test` (and `pytest -m interpret`) runs them.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastdiff.ops.dispatch import triton_available, triton_interpreting

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.interpret
@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.skipif(triton_interpreting(), reason="this is the interpreter process")
def test_kernels_under_the_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "FASTDIFF_BACKEND"}
    env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "interpret", "-p", "no:cacheprovider", "tests/ops"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    report = out.stdout[-6000:] + out.stderr[-2000:]
    assert out.returncode == 0, report
    assert " passed" in out.stdout.splitlines()[-1] and " failed" not in out.stdout.splitlines()[-1], report
