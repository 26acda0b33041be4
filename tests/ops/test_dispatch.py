"""The backend choice of the fused ops: automatic per device, forced with use_backend, FASTDIFF_BACKEND a default
read once; and the registry every op declares itself in."""

import os
import subprocess
import sys
import types

import pytest
import torch

from fastdiff import ops, reference
from fastdiff.errors import ConfigError
from fastdiff.ops import current_backend, dispatch, use_backend
from fastdiff.ops.dispatch import backend_for

GN = dispatch.REGISTRY["group_norm_silu"]
TEMB = dispatch.REGISTRY["timestep_embedding"]


def test_cpu_defaults_to_reference(monkeypatch):
    if dispatch.triton_interpreting():
        pytest.skip("the interpreter process sends CPU tensors to Triton")
    monkeypatch.setattr(dispatch, "CPU_NATIVE", False)  # a CPU whose choice is the torch ops, or no extension
    x = torch.randn(2, 4, 3, 3)
    with use_backend(None):
        assert backend_for(x, GN) == "torch" and backend_for(x, TEMB) == "torch"
        torch.testing.assert_close(ops.group_norm_silu(x, 2), reference.group_norm_silu(x, 2))
        t = torch.tensor([0.0, 10.0])
        torch.testing.assert_close(ops.timestep_embedding(t, 8), reference.timestep_embedding(t, 8))


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ConfigError, match="use_backend='cuda-magic' is not a backend"):
        with use_backend("cuda-magic"):
            pass
    code = "from fastdiff import ops\nimport torch\nops.group_norm_silu(torch.zeros(1, 2, 1, 1), 1)\n"
    env = {**os.environ, "FASTDIFF_BACKEND": "cuda-magic"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode != 0 and "FASTDIFF_BACKEND='cuda-magic' is not a backend" in out.stderr, out.stderr


def test_a_forced_kernel_backend_on_another_device_is_one_error():
    # Forcing the native or Triton ops on mps or xpu tensors (here meta ones) failed inside the op with a
    # NotImplementedError traceback; the torch ops run every device.
    x = torch.empty(2, 4, 3, 3, device="meta")
    for forced in ("native", "triton"):
        with use_backend(forced), pytest.raises(ConfigError, match=f"'{forced}' runs CPU and CUDA tensors, not meta"):
            backend_for(x, GN)
    with use_backend("torch"):
        assert backend_for(x, GN) == "torch"


def test_forced_torch():
    with use_backend("torch"):
        assert backend_for(torch.zeros(1), GN) == "torch" and current_backend() == "torch"


def test_use_backend_sets_and_restores_without_touching_the_environment():
    before = os.environ.get("FASTDIFF_BACKEND")
    outer = current_backend()
    with use_backend("torch"):
        assert current_backend() == "torch"
        with use_backend("auto"):
            assert current_backend() is None
        assert current_backend() == "torch"
        assert os.environ.get("FASTDIFF_BACKEND") == before
    assert current_backend() == outer
    with pytest.raises(ZeroDivisionError), use_backend("torch"):
        1 / 0
    assert current_backend() == outer


def test_blocks_of_two_threads_that_close_out_of_order_leave_nothing_forced():
    """A enters torch, B enters native, A closes, B closes: B put back the 'torch' it had saved, forced for good."""
    import threading

    outer = current_backend()
    steps = [threading.Event() for _ in range(3)]

    def a():
        with use_backend("torch"):
            steps[0].set()
            steps[1].wait(10)
        steps[2].set()

    thread = threading.Thread(target=a)
    thread.start()
    steps[0].wait(10)
    with use_backend("native"):
        steps[1].set()
        steps[2].wait(10)  # A has closed its block: B's is the open one
        assert current_backend() == "native"
    thread.join()
    assert current_backend() == outer


def test_environment_is_the_default_read_once():
    code = ("import os; from fastdiff import ops\n"
            "assert ops.current_backend() == 'torch'\n"
            "os.environ['FASTDIFF_BACKEND'] = 'native'\n"  # too late: read once, at import
            "assert ops.current_backend() == 'torch'\n"
            "with ops.use_backend(None):\n    assert ops.current_backend() is None\n"
            "print('ok')\n")
    env = {**os.environ, "FASTDIFF_BACKEND": "Torch"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_every_op_is_registered_and_public():
    assert set(dispatch.REGISTRY) == set(ops.__all__) - {"current_backend", "use_backend"}
    assert {"group_norm_silu", "sampler_step", "timestep_embedding"} <= set(dispatch.REGISTRY)
    for name, spec in dispatch.REGISTRY.items():
        assert getattr(ops, name).__name__ == name and spec.triton.__name__ == name
        assert spec.reference is getattr(reference, name)
        if spec.native is not None:
            assert callable(getattr(dispatch._native, spec.native))

    def group_norm_silu(x):
        return x

    with pytest.raises(RuntimeError, match="registered twice"):
        dispatch.op(reference.group_norm_silu)(group_norm_silu)
    assert dispatch.REGISTRY["group_norm_silu"] is GN


def test_choice_is_guarded_under_compile():
    # Read at trace time, no graph break: the same choice reuses the graph, another one traces again.
    x = torch.randn(2, 4, 3, 3)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    fn = torch.compile(lambda x: ops.group_norm_silu(x, 2), fullgraph=True, backend="eager")
    with use_backend("torch"):
        fn(x)
        torch.testing.assert_close(fn(x), reference.group_norm_silu(x, 2))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    with use_backend(None):
        torch.testing.assert_close(fn(x), reference.group_norm_silu(x, 2), atol=2e-5, rtol=2e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


def test_native_cuda_kernels_run_only_when_forced(monkeypatch):
    # They are built with the extension where a CUDA toolkit is present but have not run on a GPU: CUDA tensors go to
    # Triton (or the reference) unless use_backend("native") asks for them.
    monkeypatch.setattr(dispatch, "native_available", lambda: True)
    monkeypatch.setattr(dispatch._native, "cuda_available", lambda: True)
    on_cuda = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)  # what backend_for reads
    with use_backend(None):
        assert {backend_for(on_cuda, spec) for spec in dispatch.REGISTRY.values()} <= {"triton", "torch"}
    with use_backend("native"):
        assert backend_for(on_cuda, GN) == "native"


def test_backend_on_names_the_float32_choice_whatever_the_default_dtype(monkeypatch):
    """After torch.set_default_dtype(float64), `fastdiff env` and cpu_choice read a float64 probe, which the
    automatic choice sends to the reference: "torch", and "build the extension" where it is built."""
    monkeypatch.setattr(dispatch, "CPU_NATIVE", True)  # as on a CPU whose choice is the extension's ops
    with use_backend(None):
        want = dispatch.backend_on("cpu")
        assert want != "torch"
        before = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            assert dispatch.backend_on("cpu") == want
        finally:
            torch.set_default_dtype(before)
