"""Which implementation runs a fused op: the registry of ops and the one backend choice.

Each op file declares itself with `@op(reference, native=..., bench=...)` on its Triton path; the
decorator records the op in `REGISTRY` (where `fastdiff.bench.ops` finds its benchmark cases) and returns the public
function, which picks the backend per call:

- the automatic choice (the default): CUDA tensors -> Triton (the reference where triton is not installed).
  CPU tensors -> Triton when this process interprets Triton (TRITON_INTERPRET=1 before import), else the native
  kernel (fastdiff._C) where the extension is built and the op has one (measured faster on every CPU, once their
  silu stopped computing subnormals and their bf16 loads and stores vectorised: benchmarks/cpu_defaults.py;
  `runtime.cpu_choice` picks the layout by whether they run), else the reference.
  The CUDA kernels of the extension are never chosen automatically: they have not run on a GPU yet. Tensors of
  another dtype than float32, float16 and bfloat16 (float64) run the reference, which keeps their precision.
- a forced backend, `use_backend("torch" | "triton" | "native")`: every op runs it; an op without that backend
  (no native kernel) runs the reference.

The choice is one plain module global, `_choice`. Its default is FASTDIFF_BACKEND, read once when this module is
imported; after that only `use_backend` changes it (nothing writes the environment). It is read in Python at call
time, so under torch.compile it is read at trace time and guarded: the graph runs the backend chosen when it was
traced, and calling it under another choice traces again (no graph break either way).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from fastdiff.errors import ConfigError
from fastdiff.ops import native as _native
from fastdiff.ops._triton import INTERPRET, TRITON_INSTALLED

# Probe the optional extension now, outside any torch.compile trace: dispatch reads the answer as a constant.
_native._load()


# CPU tensors run the native kernels by default wherever they are built: they were measured faster on every
# CPU (`runtime.cpu_choice`, whose layout follows whether they run). Read by backend_for.
CPU_NATIVE = _native.available()

BACKENDS = ("torch", "triton", "native")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the fused kernels compute for (automatically)


@dataclass
class Op:
    """One fused op: its name, its implementations and whether its native kernel is the CPU default."""

    name: str
    reference: Callable  # fastdiff.reference.<name>: the truth, and the torch backend
    triton: Callable  # the Triton path, with the reference's signature
    native: str | None = None  # the function of fastdiff.ops.native that runs its native kernel, if any
    bench: Callable[[bool], list[BenchCase]] | None = None  # quick -> its `fastdiff bench` cases


@dataclass
class BenchCase:
    """One benchmark case of an op, declared in the op's file so that a new op needs no edit in the benchmark
    harness: `fastdiff.bench.ops` times the op's reference, Triton path and native kernel on `inputs`."""

    shape: tuple
    dtype: torch.dtype
    inputs: Callable[[torch.device], tuple]  # device -> the op's positional arguments (built when the case runs)
    nbytes: int  # the bytes one call must move, by byte_formula
    byte_formula: str
    note: str = ""
    # Time forward + backward (rows named <op>_fwd_bwd): gradients of every floating-point tensor argument, for an
    # output gradient shaped like the first argument.
    backward: bool = False
    headline: bool = False  # among the rows the GPU suite leads with
    # Other ways the Triton path may run this case, each timed as a provider of its own (`fastdiff[<name>]`):
    # name -> a zero-argument context manager factory that selects it (e.g. GroupNorm+SiLU's `forced_path`).
    variants: dict[str, Callable[[], contextlib.AbstractContextManager]] = field(default_factory=dict)


REGISTRY: dict[str, Op] = {}


def op(reference: Callable, *, native: str | None = None,
       bench: Callable[[bool], list[BenchCase]] | None = None):
    """Decorator on an op's Triton path: registers the op under the function's name and returns its public,
    dispatching function (with the decorated function's name and docstring)."""

    def register(triton_fn: Callable) -> Callable:
        spec = Op(triton_fn.__name__, reference, triton_fn, native, bench)
        if spec.name in REGISTRY:
            raise RuntimeError(f"fastdiff.ops: the op {spec.name!r} is registered twice")
        REGISTRY[spec.name] = spec

        @functools.wraps(triton_fn)
        def dispatched(x, *args, **kwargs):
            backend = backend_for(x, spec)
            if backend == "triton":
                return triton_fn(x, *args, **kwargs)
            if backend == "native":  # looked up per call, so that a test can wrap it
                return getattr(_native, spec.native)(x, *args, **kwargs)
            return reference(x, *args, **kwargs)

        return dispatched

    return register


def _parse(name: str | None, source: str) -> str | None:
    """A backend name, or None for the automatic choice ("auto" or empty)."""
    if name is None:
        return None
    key = name.strip().lower()
    if key in ("", "auto"):
        return None
    if key not in BACKENDS:
        raise ConfigError(f"{source}={name!r} is not a backend; use one of {', '.join(BACKENDS)} or auto")
    return key


def _from_environment() -> tuple[str | None, ConfigError | None]:
    try:
        return _parse(os.environ.get("FASTDIFF_BACKEND"), "FASTDIFF_BACKEND"), None
    except ConfigError as e:  # raised by the first op call, where the CLI prints it as one line
        return None, e


_ENVIRONMENT = _from_environment()  # the choice outside every use_backend block
_choice, _env_error = _ENVIRONMENT
_blocks: list[tuple[object, str | None]] = []  # the open use_backend blocks, oldest first
_blocks_lock = threading.Lock()


def current_backend() -> str | None:
    """The forced backend, or None for the automatic choice."""
    if _env_error is not None:
        raise _env_error
    return _choice


@contextlib.contextmanager
def use_backend(name: str | None):
    """Run every fused op on `name` ("torch", "triton" or "native"; None or "auto": the automatic choice) inside
    the block. The choice is process-wide (not per thread): the newest open block's, and once every block has
    closed, FASTDIFF_BACKEND's again. Blocks nest; blocks of two threads that close out of order (each had saved
    the other's choice) left one forced for good."""
    global _choice, _env_error
    new = _parse(name, "use_backend")
    token = object()
    with _blocks_lock:
        _blocks.append((token, new))
        _choice, _env_error = new, None
    try:
        yield
    finally:
        with _blocks_lock:
            _blocks[:] = [block for block in _blocks if block[0] is not token]
            _choice, _env_error = (_blocks[-1][1], None) if _blocks else _ENVIRONMENT


def triton_available() -> bool:
    return TRITON_INSTALLED


def triton_interpreting() -> bool:
    """True when this process runs the Triton kernels in the interpreter (on CPU tensors)."""
    return INTERPRET


def native_available() -> bool:
    """True when the optional native extension fastdiff._C is built and loads."""
    return _native.available()


def _forced(forced: str, x: torch.Tensor, spec: Op) -> str:
    # an mps or xpu tensor met a NotImplementedError traceback inside the op
    elsewhere = x.device.type not in ("cpu", "cuda")
    if elsewhere and (forced == "triton" or (forced == "native" and spec.native is not None)):
        raise ConfigError(f"the ops backend '{forced}' runs CPU and CUDA tensors, not {x.device.type} ones; use the "
                          "automatic choice (unset FASTDIFF_BACKEND) or 'torch'")
    if forced == "triton":
        if not TRITON_INSTALLED:
            raise ConfigError("the ops backend is 'triton' but triton is not installed; pip install triton")
        if x.device.type == "cpu" and not INTERPRET:
            raise ConfigError("the ops backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before fastdiff "
                              "is imported (or use a CUDA device)")
        return "triton"
    if forced == "native" and spec.native is not None:
        if not native_available():
            reason = _native.load_error() or "the extension fastdiff._C is not available"
            raise ConfigError(f"the ops backend is 'native' but {reason}; build it with "
                              "`FASTDIFF_BUILD_EXT=1 pip install --no-build-isolation -e .` (see README)")
        if x.device.type == "cuda" and not _native.cuda_available():
            raise ConfigError("the ops backend 'native' on CUDA tensors needs fastdiff._C built with CUDA kernels; "
                              "rebuild it where a CUDA toolkit and a CUDA build of torch are installed")
        return "native"
    return "torch"


def backend_on(device) -> str:
    """The backend that the GroupNorm+SiLU (an op with every backend) runs on `device`'s tensors now: what
    `fastdiff env` and the bench's rows name."""
    return backend_for(torch.empty(0, device=device, dtype=torch.float32), REGISTRY["group_norm_silu"])


def backend_for(x: torch.Tensor, spec: Op) -> str:
    """The backend ("torch", "triton" or "native") that runs the op `spec` on tensor x."""
    forced = current_backend()
    if forced is not None:
        return _forced(forced, x, spec)
    if x.dtype not in KERNEL_DTYPES:  # float64 (or another): the reference keeps its precision; the kernels compute
        return "torch"  # in float32 and would hand back float32's error labelled float64
    if x.device.type == "cuda":
        return "triton" if TRITON_INSTALLED else "torch"
    if x.device.type == "cpu" and INTERPRET:
        return "triton"
    if x.device.type == "cpu" and CPU_NATIVE and spec.native is not None:
        return "native"
    return "torch"
