"""Every launch the launchers make, compiled ahead of time for an H100 (sm_90) without a GPU.

The interpreter runs the kernels' Python on numpy, so it cannot see what only the compiler checks (types,
layouts, lowering to PTX). Here each launcher runs with a recording stand-in for the kernel; the recorded
arguments become a Triton signature (pointers and integers divisible by 16 marked as the runtime would, ints equal
to 1 specialised) and `triton.compile` lowers it to PTX and a cubin with the ptxas that ships with triton.
"""

import pytest
import torch

from fastdiff.ops import _triton
from fastdiff.ops.dispatch import triton_available, triton_interpreting

pytestmark = [pytest.mark.skipif(not triton_available(), reason="triton is not installed"),
              pytest.mark.skipif(triton_interpreting(), reason="the kernels are interpreted in this process")]

_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
          torch.int32: "i32"}


def _record_launches(monkeypatch, launch):
    """Run `launch()` on CPU tensors with every kernel launch recorded instead; returns [(kernel, args, kwargs)]."""
    import triton

    calls = []

    def getitem(self, grid):
        return lambda *args, **kwargs: calls.append((self, args, kwargs))

    monkeypatch.setattr(triton.JITFunction, "__getitem__", getitem)
    monkeypatch.setattr(_triton, "INTERPRET", True)  # let the launchers take CPU tensors
    launch()
    return calls


def _signature(kernel, args, kwargs):
    """(signature, constexprs, attrs) the way the runtime would specialise this launch."""
    names = kernel.arg_names
    unspecialized = {p.name for p in kernel.params if p.do_not_specialize}
    constexprs = {k: v for k, v in kwargs.items() if k in names}
    signature, attrs = {}, {}
    for name, value in zip(names, args):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
            attrs[(names.index(name),)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1 and name not in unspecialized:
                constexprs[name] = 1
                continue
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0 and name not in unspecialized:
                attrs[(names.index(name),)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    for name in constexprs:
        signature[name] = "constexpr"
    return signature, constexprs, attrs


def _compile_all(calls):
    """Compile each distinct specialisation once; returns their PTX in launch order."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    seen, ptxs = set(), []
    for kernel, args, kwargs in calls:
        signature, constexprs, attrs = _signature(kernel, args, kwargs)
        key = repr((kernel.fn.__name__, signature, constexprs, attrs, kwargs.get("num_warps")))
        if key in seen:
            continue
        seen.add(key)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": kwargs.get("num_warps", 4)})
        assert compiled.asm["cubin"], f"{kernel.fn.__name__}: no cubin"
        ptxs.append(compiled.asm["ptx"])
    return ptxs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_group_norm_silu_kernels_compile_for_sm90(monkeypatch, dtype):
    from fastdiff.ops.group_norm_silu import forced_path, group_norm_silu_bwd, group_norm_silu_fwd

    def launch():
        # (size, channels_last, max_fused = chunk, path): fused, split on a tiny and on a 2048-element tile, looped
        for size, channels_last, max_fused, path in [(16, False, 1 << 14, None), (16, True, 1 << 14, None),
                                                     (16, False, 64, "split"), (32, False, 2048, "split"),
                                                     (32, False, 2048, "looped"), (32, True, 2048, "looped")]:
            x = torch.randn(2, 64, size, size, dtype=dtype)
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            w, b = torch.ones(64, dtype=dtype), torch.zeros(64, dtype=dtype)
            mean = torch.zeros(16)
            with forced_path(path):
                group_norm_silu_fwd(x, w, b, 8, 1e-5, max_fused=max_fused, chunk=max_fused)
                group_norm_silu_bwd(x, x, w, None, mean, mean, 8, max_fused=max_fused, chunk=max_fused)

    calls = _record_launches(monkeypatch, launch)
    names = [kernel.fn.__name__ for kernel, _, _ in calls]
    assert names[12:] == ["_group_norm_silu_fwd_loop_kernel", "_group_norm_silu_bwd_loop_kernel"] * 2
    ptxs = _compile_all(calls)
    # fused fwd, bwd per layout; split (stats + normalise, fwd and bwd) per tile; looped fwd, bwd per layout
    assert len(ptxs) == 16
    assert all("ld.global.v4" in p for p in ptxs[:4]), "the fused kernels should load 16-byte vectors"
    assert all("ld.global.v4" in p for p in ptxs[8:14]), "split and looped NCHW kernels should load 16-byte vectors"


def _resource_usage(cubin: bytes) -> str:
    """cuobjdump's resource usage (registers, stack, local memory) of a compiled kernel, by the cuobjdump beside
    the ptxas triton compiled it with."""
    import os
    import subprocess
    import tempfile

    try:
        from triton.backends.nvidia.compiler import get_ptxas

        cuobjdump = os.path.join(os.path.dirname(get_ptxas(90).path), "cuobjdump")
    except Exception as e:  # noqa: BLE001 - another triton's layout: no report
        pytest.skip(f"triton's CUDA tools not found: {e}")
    if not os.path.exists(cuobjdump):
        pytest.skip("triton ships no cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _compiled_usage(kernel, args, kwargs) -> dict[str, int]:
    """{"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..} of one launch compiled for sm_90."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = _signature(kernel, args, kwargs)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": kwargs.get("num_warps", 4)})
    usage = _resource_usage(compiled.asm["cubin"])
    found = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    assert set(found) == {"REG", "STACK", "SHARED", "LOCAL"}, usage
    return {k: int(v) for k, v in found.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_group_norm_silu_looped_kernels_at_bench_sizes_do_not_spill(monkeypatch, dtype):
    # The looped launches of the bench's GroupNorm+SiLU rows at their real sizes (both layouts, forward and
    # backward): a kernel whose registers spill to local memory would make its row time a slowed kernel.
    from fastdiff.ops.group_norm_silu import _bench_cases, forced_path, group_norm_silu_bwd, group_norm_silu_fwd

    def launch():
        for case in _bench_cases(quick=False):
            if case.dtype != dtype or "looped" not in case.variants:
                continue
            x = torch.empty(case.shape, dtype=dtype)
            if case.note == "channels_last":
                x = x.to(memory_format=torch.channels_last)
            w, mean = torch.empty(case.shape[1], dtype=dtype), torch.empty(case.shape[0] * 32)
            with forced_path("looped"):
                if case.backward:
                    group_norm_silu_bwd(x, x, w, w, mean, mean, 32)
                else:
                    group_norm_silu_fwd(x, w, w, 32, 1e-5)

    calls = _record_launches(monkeypatch, launch)
    assert {kernel.fn.__name__ for kernel, _, _ in calls} == {"_group_norm_silu_fwd_loop_kernel",
                                                              "_group_norm_silu_bwd_loop_kernel"}
    for kernel, args, kwargs in calls:
        usage = _compiled_usage(kernel, args, kwargs)
        assert usage["STACK"] == 0 and usage["LOCAL"] == 0, f"{kernel.fn.__name__} {kwargs}: {usage}"


def test_sampler_step_kernels_compile_for_sm90(monkeypatch):
    from fastdiff.ops.sampler_step import sampler_step_fwd

    def launch():
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(4, 3, 32, 32, dtype=dtype)
            coefs = [torch.ones(4) for _ in range(5)]
            sampler_step_fwd(x, x, *coefs, torch.arange(4), torch.tensor(3), 0, 1.0, True)
            sampler_step_fwd(x.to(memory_format=torch.channels_last), x, *coefs, torch.arange(4), None, 3, None,
                             False)

    ptxs = _compile_all(_record_launches(monkeypatch, launch))
    assert len(ptxs) == 4
    assert "ld.global.v4" in ptxs[0], "the NCHW sampler step should load 16-byte vectors"


def test_timestep_embedding_kernel_compiles_for_sm90(monkeypatch):
    from fastdiff.ops.timestep_embedding import timestep_embedding_fwd

    calls = _record_launches(monkeypatch, lambda: [timestep_embedding_fwd(torch.arange(8), d, 1e4) for d in (32, 33)])
    assert len(_compile_all(calls)) == 2


def test_timestep_embedding_programs_leave_room_for_many_per_sm(monkeypatch):
    # Every element costs a sin and a cos (libdevice's, whose slow path for huge arguments is inlined: the stack it
    # reports is that path's buffer, not a spill). With 32 elements per thread the kernel took 230 registers (Triton
    # 3.6; 168 with 3.9), so two 4-warp programs fitted an SM; at most 64 lets eight in. Sizes: the bench's cases
    # and a UNet's table (batch 64, 128 channels).
    from fastdiff.ops.timestep_embedding import _bench_cases, timestep_embedding_fwd

    def launch():
        for case in _bench_cases(quick=False) + [None]:
            t, dim = case.inputs("cpu") if case is not None else (torch.arange(64), 128)
            timestep_embedding_fwd(t, dim, 1e4)

    for kernel, args, kwargs in _record_launches(monkeypatch, launch):
        usage = _compiled_usage(kernel, args, kwargs)
        assert usage["REG"] <= 64 and usage["LOCAL"] == 0, f"{kwargs}: {usage}"
