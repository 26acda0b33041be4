"""How the Triton kernels follow TRITON_INTERPRET, and what happens where they cannot run."""

import os
import subprocess
import sys

import pytest
import torch

from fastdiff.ops import _triton
from fastdiff.ops.dispatch import triton_available
from fastdiff.ops.timestep_embedding import _timestep_embedding_kernel, timestep_embedding_fwd

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def test_package_works_without_triton():
    # sys.modules[name] = None makes `import triton` fail as on a machine without it (macOS).
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch; from fastdiff import ops, reference\n"
        "x = torch.randn(2, 4, 3, 3)\n"
        "assert torch.equal(ops.group_norm_silu(x, 2), reference.group_norm_silu(x, 2))\n"
        "assert ops.timestep_embedding(torch.tensor([1.0]), 8).shape == (1, 8)\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTDIFF_BACKEND")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@needs_triton
def test_kernel_is_decorated_once_per_mode(monkeypatch):
    import triton

    t = torch.tensor([1.0, 2.0])
    with monkeypatch.context() as m:
        m.setenv("TRITON_INTERPRET", "1")
        timestep_embedding_fwd(t, 4, 10000.0)
    interpreted = _timestep_embedding_kernel._decorated[True]
    assert not isinstance(interpreted, triton.JITFunction)  # the interpreter's function, not a compiled one
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not _triton.interpreting()
    _timestep_embedding_kernel[(1,)]  # decorates for the compiler (launching would need a GPU)
    assert isinstance(_timestep_embedding_kernel._decorated[False], triton.JITFunction)
    assert _timestep_embedding_kernel._decorated[True] is interpreted


@needs_triton
def test_cpu_tensor_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="need CUDA tensors or TRITON_INTERPRET=1"):
        timestep_embedding_fwd(torch.tensor([1.0]), 4, 10000.0)


def test_block_helpers():
    assert [_triton.next_power_of_2(n) for n in (0, 1, 2, 3, 17, 64)] == [1, 1, 2, 4, 32, 64]
    assert [_triton.cdiv(a, 4) for a in (0, 1, 4, 5)] == [0, 1, 1, 2]
