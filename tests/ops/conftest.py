"""Fixtures for the op tests: each test runs once under the Triton interpreter on the CPU (marked `interpret`,
tiny shapes) and once compiled on a GPU (marked `gpu`, real sizes).

TRITON_INTERPRET is set with monkeypatch, so it is restored after every test and never leaks into other tests.
The kernels in `fastdiff.ops` are decorated on first launch, once per mode (`fastdiff.ops._triton.Kernel`), so
they pick the variable up whenever it changes, on triton 3.6 as on 3.9.
"""

import pytest
import torch

from fastdiff.ops.dispatch import triton_available


@pytest.fixture(
    params=[
        pytest.param("cpu", marks=pytest.mark.interpret, id="interpret"),
        pytest.param("cuda", marks=pytest.mark.gpu, id="gpu"),
    ]
)
def device(request, monkeypatch):
    """The device a Triton kernel runs on: CPU under TRITON_INTERPRET=1, or CUDA compiled."""
    if not triton_available():
        pytest.skip("triton is not installed")
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    if request.param == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return torch.device(request.param)


def _assert_lowp_close(out, out_lowp_torch, truth, name="", atol=1e-3):
    err = (out.float() - truth.float()).abs().max().item()
    ref_err = (out_lowp_torch.float() - truth.float()).abs().max().item()
    mean_err = (out.float() - truth.float()).abs().mean().item()
    assert err <= 2 * ref_err + atol, f"{name}: max err {err:.3g} (mean {mean_err:.3g}) vs torch's {ref_err:.3g}"


@pytest.fixture
def assert_lowp_close():
    """Low precision: the kernel's error against the fp32 truth is at most 2x torch's own plus a small atol."""
    return _assert_lowp_close
