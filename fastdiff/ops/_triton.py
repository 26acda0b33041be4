"""What the Triton kernels of every op share: the optional import, the interpreter flag, the in-kernel noise.

Triton is optional (the package must import where it is absent, e.g. macOS): without it, `triton.jit` below is a
stand-in that keeps the kernels defined (so their modules import) and refuses to launch them.

`triton.jit` interprets instead of compiling when TRITON_INTERPRET=1 was set before triton was imported (its own
`tl.sum`, `tl.sigmoid`, ... are decorated at that import, ours when the op modules are imported), so the mode is
fixed for the process: `INTERPRET` reads it once. The tests run the kernels under the interpreter in a process of
their own (tests/ops/test_interpreter.py).
"""

import contextlib
import functools
import os
import types

import torch

from fastdiff.errors import ConfigError

try:
    import triton
    import triton.language as tl
except ImportError:
    TRITON_INSTALLED = False

    class _Unavailable:
        """A kernel defined where triton is not installed: launching it is a clear error."""

        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            raise RuntimeError(f"{self.fn.__name__} needs triton, which is not installed")

    def _jit(fn=None, **_kwargs):
        return _Unavailable(fn) if fn is not None else _Unavailable

    triton = types.SimpleNamespace(jit=_jit)
    tl = types.SimpleNamespace(constexpr=None)  # the kernels' annotations
    INTERPRET = False
else:
    TRITON_INSTALLED = True
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_launchable(t) -> None:
    """Raise a clear error when a tensor cannot reach a Triton kernel (CPU without the interpreter)."""
    if not TRITON_INSTALLED:
        raise RuntimeError("the Triton backend needs triton (pip install triton); use_backend('torch') runs without")
    if t.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(f"Triton kernels need CUDA tensors or TRITON_INTERPRET=1 (set before fastdiff is "
                           f"imported), got a {t.device.type} tensor")


MAX_SAMPLE_OFFSET = 2**31 - 1  # the kernels' offsets within one sample are 32-bit (the sample's own is 64-bit)


def check_sample_size(t, name: str) -> None:
    """Refuse a sample whose last element lies beyond 32-bit offsets from its first (a kernel would address the
    wrong memory, silently)."""
    if t.numel() == 0 or t.dim() < 2:
        return
    last = sum((size - 1) * stride for size, stride in zip(t.shape[1:], t.stride()[1:]))
    if last > MAX_SAMPLE_OFFSET:
        raise ConfigError(f"{name}: one sample spans {last + 1} elements, beyond the Triton kernels' 32-bit "
                          "offsets (2^31); run this op on the torch backend (FASTDIFF_BACKEND=torch)")


def launcher(fn):
    """Decorator on a function that launches Triton kernels on the tensors it is given, the first of which names
    the device: checks that the tensor can reach Triton, and makes its GPU the current one around the call.

    Triton launches on the current CUDA device and that device's current stream, whatever device the tensors are
    on: without the guard, tensors on cuda:1 in a process whose current device is cuda:0 would get a kernel
    compiled and launched on the wrong GPU."""

    @functools.wraps(fn)
    def launch(t, *args, **kwargs):
        check_launchable(t)
        check_sample_size(t, fn.__name__)
        with torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext():
            return fn(t, *args, **kwargs)

    return launch


@triton.jit
def philox_normal4(seed, group, step, stream):
    """Four standard normals per Philox group: the noise of `fastdiff.reference.philox_normal` in Triton.

    seed: int64 scalar (key = (seed & 0xffffffff, seed >> 32)); group: uint32 block, the counter word g = element // 4;
    step, stream: uint32 counter words. Returns (z0, z1, z2, z3) for elements 4g, 4g+1, 4g+2, 4g+3, each of group's
    shape. Philox4x32-10 is Triton's own `tl.philox` (the reference's rounds, constants and key split); the
    uniforms u = ((r >> 9) + 0.5) * 2^-23 are exact in float32, then two Box-Muller pairs.
    """
    zero = group * 0
    r0, r1, r2, r3 = tl.philox(seed, group, zero + step, zero + stream, zero)
    u0 = ((r0 >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
    u1 = ((r1 >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
    u2 = ((r2 >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
    u3 = ((r3 >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
    rad01 = tl.sqrt_rn(-2.0 * tl.log(u0))
    th01 = 6.283185307179586 * u1
    rad23 = tl.sqrt_rn(-2.0 * tl.log(u2))
    th23 = 6.283185307179586 * u3
    return rad01 * tl.cos(th01), rad01 * tl.sin(th01), rad23 * tl.cos(th23), rad23 * tl.sin(th23)
