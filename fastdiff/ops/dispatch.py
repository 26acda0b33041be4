"""Backend selection for the fused ops.

CUDA tensors go to the Triton kernels; CPU tensors go to the plain-PyTorch reference, or to the Triton kernels
when TRITON_INTERPRET=1 (the Triton interpreter runs them on the CPU), or to the native extension
(fastdiff._C) when it is built. FASTDIFF_BACKEND=torch|triton|native forces one backend for every op.

The choice is made in Python at call (or trace) time, so torch.compile bakes it into the graph.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from fastdiff.errors import ConfigError
from fastdiff.ops import native as _native

# Probe the optional extension now, outside any torch.compile trace: dispatch reads the answer as a constant.
_native._load()

BACKENDS = ("torch", "triton", "native")


# Probed once at import for the same reason (Dynamo would trace through a functools.cache wrapper).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_INSTALLED


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def native_available() -> bool:
    """True when the optional native extension fastdiff._C is built and loads."""
    return _native.available()


# Ops whose native CPU kernel was measured faster than the reference (benchmarks/bench_native_cpu.py, 2-core
# AVX2 CPU, digits and mnist UNet shapes: sampler step 16-35x; GroupNorm+SiLU forward 1.2-1.7x, forward+backward
# 1.5-3.1x; the README has the table). CPU tensors go to the native kernel of these automatically when it is built.
NATIVE_FASTER_ON_CPU = frozenset({"sampler_step", "group_norm_silu"})


def native_preferred_on_cpu(op: str | None) -> bool:
    """Use the native kernel of `op` automatically on CPU tensors: built, and measured faster."""
    return op in NATIVE_FASTER_ON_CPU and native_available()


def _native_unavailable_error() -> ConfigError:
    from fastdiff.ops import native

    reason = native.load_error() or "the extension fastdiff._C is not available"
    return ConfigError(
        f"FASTDIFF_BACKEND=native but {reason}; build it with "
        "`FASTDIFF_BUILD_EXT=1 pip install --no-build-isolation -e .` (see README)"
    )


def forced_backend() -> str | None:
    name = os.environ.get("FASTDIFF_BACKEND", "").strip().lower()
    if not name or name == "auto":
        return None
    if name not in BACKENDS:
        raise ConfigError(f"FASTDIFF_BACKEND={name!r} is not a backend; use one of {', '.join(BACKENDS)} or unset it")
    return name


def backend_for(x: torch.Tensor, supported: tuple[str, ...] = BACKENDS, op: str | None = None) -> str:
    """The backend that runs an op on tensor x; `supported` lists the backends that op implements, `op` names
    it (for the per-op choice of the native kernels on CPU)."""
    forced = forced_backend()
    if forced is not None:
        if forced not in supported:
            return "torch"
        if forced == "triton" and not triton_available():
            raise ConfigError("FASTDIFF_BACKEND=triton but triton is not installed; pip install triton")
        if forced == "triton" and x.device.type == "cpu" and not triton_interpreting():
            raise ConfigError("FASTDIFF_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 (or use a CUDA device)")
        if forced == "native" and not native_available():
            raise _native_unavailable_error()
        if forced == "native" and x.device.type == "cuda":
            from fastdiff.ops import native

            if not native.cuda_available():
                raise ConfigError("FASTDIFF_BACKEND=native on CUDA tensors, but fastdiff._C was built without CUDA "
                                  "kernels; rebuild it where a CUDA toolkit and a CUDA build of torch are installed")
        return forced
    if x.device.type == "cuda":
        return "triton" if "triton" in supported and triton_available() else "torch"
    if x.device.type == "cpu":
        if "triton" in supported and triton_interpreting() and triton_available():
            return "triton"
        if "native" in supported and native_preferred_on_cpu(op):
            return "native"
    return "torch"
