"""Triton's two modes (compiled, interpreted: fixed per process by TRITON_INTERPRET at import), and what happens
where the kernels cannot run."""

import os
import subprocess
import sys

import pytest
import torch

from fastdiff.ops import _triton
from fastdiff.ops.dispatch import triton_available, triton_interpreting
from fastdiff.ops.timestep_embedding import _timestep_embedding_kernel, timestep_embedding_fwd

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def test_package_works_without_triton():
    # sys.modules[name] = None makes `import triton` fail as on a machine without it (macOS).
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch; from fastdiff import ops, reference\n"
        "from fastdiff.ops.timestep_embedding import timestep_embedding_fwd\n"
        "x = torch.randn(2, 4, 3, 3)\n"
        # the reference, or the native kernel where fastdiff._C is built (equal to float32 rounding)
        "torch.testing.assert_close(ops.group_norm_silu(x, 2), reference.group_norm_silu(x, 2))\n"
        "assert ops.timestep_embedding(torch.tensor([1.0]), 8).shape == (1, 8)\n"
        "try:\n    timestep_embedding_fwd(torch.tensor([1.0]), 4, 1e4)\n"
        "except RuntimeError as e:\n    assert 'needs triton' in str(e), e\n"
        "else:\n    raise AssertionError('launched without triton')\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTDIFF_BACKEND")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@needs_triton
def test_kernels_are_plain_jit_functions_of_the_process_mode():
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    kind = InterpretedFunction if triton_interpreting() else triton.JITFunction
    assert isinstance(_timestep_embedding_kernel, kind) and isinstance(_triton.philox_normal4, kind)
    assert triton_interpreting() == (os.environ.get("TRITON_INTERPRET") == "1")


@needs_triton
@pytest.mark.skipif(triton_interpreting(), reason="the interpreter runs CPU tensors")
def test_cpu_tensor_without_interpreter_is_a_clear_error():
    with pytest.raises(RuntimeError, match="need CUDA tensors or TRITON_INTERPRET=1"):
        timestep_embedding_fwd(torch.tensor([1.0]), 4, 10000.0)


@needs_triton
@pytest.mark.skipif(triton_interpreting(), reason="the interpreter runs CPU tensors")
def test_forced_triton_on_cpu_without_interpreter_is_a_clear_error():
    from fastdiff import ops
    from fastdiff.errors import ConfigError

    with ops.use_backend("triton"), pytest.raises(ConfigError, match="needs TRITON_INTERPRET=1 set before"):
        ops.timestep_embedding(torch.tensor([1.0]), 4)


def test_a_launch_runs_with_the_tensors_gpu_current(monkeypatch):
    """Triton launches on the current CUDA device: `launcher` makes the tensor's GPU current around the call (here
    with torch.cuda.device recorded, so that it runs without GPUs; the test below launches on a second GPU)."""
    current = [torch.device("cuda", 0)]

    class Guard:  # torch.cuda.device: the current device is the given one inside the block
        def __init__(self, device):
            self.device = torch.device(device)

        def __enter__(self):
            current.append(self.device)

        def __exit__(self, *exc):
            current.pop()

    monkeypatch.setattr(torch.cuda, "device", Guard)
    monkeypatch.setattr(_triton, "check_launchable", lambda t: None)
    monkeypatch.setattr(_triton, "check_sample_size", lambda t, name: None)

    class OnSecondGpu:
        device = torch.device("cuda", 1)

    @_triton.launcher
    def launch(t, extra, *, key):
        return current[-1], extra, key

    assert launch(OnSecondGpu(), 3, key="k") == (torch.device("cuda", 1), 3, "k")
    assert current == [torch.device("cuda", 0)]  # restored after the call


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_kernels_run_on_a_second_gpu_while_the_first_is_current():
    from fastdiff.ops.group_norm_silu import group_norm_silu_fwd

    # the same kernels on the first GPU give the answer, bit for bit
    torch.cuda.set_device(0)
    t = torch.arange(8, device="cuda:1", dtype=torch.float32) * 37.0
    assert torch.equal(timestep_embedding_fwd(t, 64, 10000.0).cpu(), timestep_embedding_fwd(t.cuda(0), 64, 1e4).cpu())
    x = torch.randn(2, 8, 5, 5, device="cuda:1")
    y, _, _ = group_norm_silu_fwd(x, None, None, 4, 1e-5)
    assert torch.equal(y.cpu(), group_norm_silu_fwd(x.cuda(0), None, None, 4, 1e-5)[0].cpu())


def test_a_sample_beyond_32_bit_offsets_is_refused(monkeypatch):
    # the kernels' offsets within a sample are 32-bit: a larger sample is a clear error, not a wrong address
    from fastdiff.errors import ConfigError

    monkeypatch.setattr(_triton, "check_launchable", lambda t: None)
    launched = []

    @_triton.launcher
    def launch(t):
        launched.append(t.shape)

    launch(torch.empty((4, 2**31), device="meta"))  # meta tensors: shapes without memory; last offset 2^31 - 1
    with pytest.raises(ConfigError, match="one sample spans 2147483649 elements, beyond"):
        launch(torch.empty((1, 2**31 + 1), device="meta"))
    with pytest.raises(ConfigError, match="beyond"):  # a strided view: few elements, far apart
        launch(torch.empty((2, 3 * 2**30), device="meta")[:, ::2**30])  # 3 elements, 2^30 apart
    assert launched == [(4, 2**31)]
