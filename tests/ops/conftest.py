"""Fixtures for the op tests: each test runs once under the Triton interpreter on the CPU (marked `interpret`,
tiny shapes) and once compiled on a GPU (marked `gpu`, real sizes).

Triton interprets only when TRITON_INTERPRET=1 is set before it is imported, so the `interpret` tests run in a
process of their own: `tests/ops/test_interpreter.py` starts `pytest -m interpret tests/ops` with the variable set
(part of `make test`); in any other process they skip. Both kinds run under the automatic backend choice, whatever
FASTDIFF_BACKEND says.
"""

import pytest
import torch

from fastdiff.ops import use_backend
from fastdiff.ops.dispatch import triton_available, triton_interpreting

INTERPRETER_PROCESS = "runs in the TRITON_INTERPRET=1 process of tests/ops/test_interpreter.py"


@pytest.fixture(
    params=[
        pytest.param("cpu", marks=pytest.mark.interpret, id="interpret"),
        pytest.param("cuda", marks=pytest.mark.gpu, id="gpu"),
    ]
)
def device(request):
    """The device a Triton kernel runs on: CPU under the interpreter, or CUDA compiled."""
    if not triton_available():
        pytest.skip("triton is not installed")
    if (request.param == "cpu") != triton_interpreting():
        pytest.skip(INTERPRETER_PROCESS if request.param == "cpu" else "compiled kernels: not in the interpreter")
    with use_backend(None):
        yield torch.device(request.param)


def _assert_lowp_close(out, out_lowp_torch, truth, name="", atol=1e-3):
    err = (out.float() - truth.float()).abs().max().item()
    ref_err = (out_lowp_torch.float() - truth.float()).abs().max().item()
    mean_err = (out.float() - truth.float()).abs().mean().item()
    assert err <= 2 * ref_err + atol, f"{name}: max err {err:.3g} (mean {mean_err:.3g}) vs torch's {ref_err:.3g}"


@pytest.fixture
def assert_lowp_close():
    """Low precision: the kernel's error against the fp32 truth is at most 2x torch's own plus a small atol."""
    return _assert_lowp_close
