"""The native kernels of the optional extension fastdiff._C, with the signatures of `fastdiff.reference`.

fastdiff._C holds C++17/OpenMP CPU kernels and, when built with a CUDA toolkit against a CUDA build of torch,
CUDA C++ kernels (sources in kernels/). They are registered as `torch.ops.fastdiff_native.*` (a namespace of
their own, so they load beside the Triton ops of `fastdiff`), group_norm_silu with its autograd in C++; this
module loads the library, registers the fake (meta) implementations that torch.compile traces, and exposes the
ops as plain functions. Build it with `FASTDIFF_BUILD_EXT=1 pip install --no-build-isolation -e .` or with
cmake (see the README); without it, `available()` is False and the rest of fastdiff never needs it.

- `sampler_step`: the noise is the reference's Philox stream, equal to float32 rounding. The forward is native
  also when an input requires grad (so a run gives the same values with and without autograd); the backward
  is the reference's (its vector-Jacobian product at the same inputs, which draws the same noise).
- `group_norm_silu`: forward and backward are native (fp32 statistics; float32, float16, bfloat16).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import operator
from pathlib import Path

import torch

from fastdiff import reference
from fastdiff.checkpoint import read_json
from fastdiff.errors import CheckpointError
from fastdiff.runtime import hardware_flags

NAMESPACE = "fastdiff_native"
BUILD_INFO = "_C.json"  # beside the library: the torch it was built against, its CUDA kernels
_OPS = None  # torch.ops.fastdiff_native once the library is loaded (a plain global: torch.compile reads it as is)
# _probe()'s answer, kept in a plain global rather than functools.cache: torch.compile ignores a cache wrapper and
# traces the function inside (a file read here, which would break the graph), but reads a global as a constant.
_STATE: tuple[dict | None, str | None] | None = None


def _load() -> tuple[dict | None, str | None]:
    """(build info, None) once fastdiff._C is loaded and its ops registered, else (None, why not)."""
    global _STATE
    if _STATE is None:
        _STATE = _probe()
    return _STATE


def _probe() -> tuple[dict | None, str | None]:
    spec = importlib.util.find_spec("fastdiff._C")
    if spec is None or spec.origin is None:
        return None, "the extension fastdiff._C is not built"
    library = Path(spec.origin)
    try:
        info = read_json(library.with_name(BUILD_INFO))  # the record of this library, wherever it was found
    except CheckpointError as e:
        return None, f"fastdiff._C has no readable build record ({e}); rebuild it"
    if info.get("torch_version") != torch.__version__:
        return None, (f"fastdiff._C was built against torch {info.get('torch_version')} but torch {torch.__version__} "
                      "is running; rebuild it")
    problem = _library_problem(library)
    if problem is not None:
        return None, f"fastdiff._C ({library}) {problem}; rebuild it"
    try:
        importlib.import_module("fastdiff._C")
    except ImportError as e:
        return None, f"fastdiff._C does not load ({e}); rebuild it"
    try:
        _register_fakes()
    except RuntimeError as e:  # an op of this fastdiff that the library does not register (another version's)
        return None, f"fastdiff._C lacks an op of this fastdiff ({str(e).splitlines()[0]}); rebuild it"
    global _OPS
    _OPS = getattr(torch.ops, NAMESPACE)
    return info, None


ISA_MARK = b"FASTDIFF_ISA:"  # kernels/module.cpp: the instruction sets the library was compiled for
_SOURCES = (".cpp", ".h", ".cu", ".cuh", ".in")  # what kernels/ compiles into the library (kernels/tests: not)


def _library_problem(library: Path) -> str | None:
    """What makes the library file unsafe to load or to run here, read from the file before dlopen: cut short
    (dlopen of a truncated file died of SIGBUS, the whole process with it), older than the kernel sources beside it
    (in a source tree: an older kernel's bugs came back without a word), or compiled for instructions this CPU
    lacks (-march=native on another machine: its first kernel would die of SIGILL)."""
    try:
        data = library.read_bytes()
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if len(data) < 64 or data[:5] != b"\x7fELF\x02":
        return "is no 64-bit ELF library"
    end = int.from_bytes(data[0x28:0x30], "little") + int.from_bytes(data[0x3A:0x3C], "little") * int.from_bytes(
        data[0x3C:0x3E], "little")  # the section header table, the end of an ELF file as the linker writes it
    if end > len(data):
        return f"is cut short ({len(data)} of its {end} bytes)"
    kernels = library.parent.parent / "kernels"
    if kernels.is_dir():
        built = library.stat().st_mtime
        newer = [p for p in kernels.rglob("*") if p.suffix in _SOURCES
                 and "tests" not in p.relative_to(kernels).parts and p.stat().st_mtime > built]
        if newer:
            return f"is older than its kernel sources ({newer[0].relative_to(kernels.parent)} changed since)"
    at = data.find(ISA_MARK)
    if at < 0:
        return "records no instruction sets (a build from before 2026-12-07)"
    needs = data[at + len(ISA_MARK): data.find(b";", at)].decode(errors="replace").split()
    have = hardware_flags()
    missing = [flag for flag in needs if have and flag not in have]
    if missing:
        return f"was compiled for instructions this CPU lacks ({', '.join(missing)}: -march=native elsewhere)"
    return None


def available() -> bool:
    """True when fastdiff._C is built for the running torch and loads."""
    return _load()[0] is not None


def load_error() -> str | None:
    """Why the extension is unavailable (None when it is available)."""
    return _load()[1]


def cuda_available() -> bool:
    """True when the extension also holds CUDA kernels."""
    info = _load()[0]
    return bool(info and info.get("with_cuda"))


def unavailable_reason(device) -> str | None:
    """Why the native kernels cannot run on tensors of `device` (None when they can)."""
    device = torch.device(device)
    info, error = _load()
    if info is None:
        return f"{error} (make ext, see README)"
    if device.type == "cuda" and not info.get("with_cuda"):
        return "fastdiff._C was built without CUDA kernels (rebuild it with a CUDA toolkit and a CUDA torch)"
    if device.type not in ("cpu", "cuda"):
        return f"fastdiff._C has no kernels for {device.type} tensors"
    return None


def _ops():
    if _OPS is None:
        info, error = _load()
        if info is None:
            raise RuntimeError(f"fastdiff.ops.native: {error}")
    return _OPS


# --- fake (meta) implementations: shapes, dtypes and strides of the outputs, for torch.compile -------------


def _dense_like(x: torch.Tensor) -> torch.Tensor:
    """An empty tensor laid out as the kernels write their outputs: channels_last for a 4-D channels_last x,
    else contiguous."""
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.empty_like(x, memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _sampler_step_fake(x, model_out, p, q, A, B, sigma, seeds, step, clip=None, return_x0=False):
    x0 = _dense_like(x) if return_x0 else x.new_empty((0,))
    return _dense_like(x), x0


def _group_norm_silu_fake(x, num_groups, weight=None, bias=None, eps=1e-5):
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return _dense_like(x), stats, torch.empty_like(stats)


def _group_norm_silu_backward_fake(grad_out, x, num_groups, weight, bias, mean, rstd):
    def param_grad(param):
        return param.new_empty(param.shape) if param is not None else x.new_empty((0,), dtype=torch.float32)

    return _dense_like(x), param_grad(weight), param_grad(bias)


def _philox_normal_fake(seeds, step, numel, stream=0):
    return seeds.new_empty((seeds.shape[0], numel), dtype=torch.float32)


def _register_fakes() -> None:
    fakes = {
        "sampler_step": _sampler_step_fake,
        "sampler_step.int": _sampler_step_fake,
        "group_norm_silu": _group_norm_silu_fake,
        "group_norm_silu_backward": _group_norm_silu_backward_fake,
        "philox_normal": _philox_normal_fake,
    }
    for name, fake in fakes.items():
        torch.library.register_fake(f"{NAMESPACE}::{name}", fake)


# --- the ops ---------------------------------------------------------------------------------------------------


def _sampler_step_fwd(x, model_out, p, q, A, B, sigma, seeds, step, clip, return_x0):
    op = _ops().sampler_step
    if isinstance(step, torch.Tensor):
        return op.default(x, model_out, p, q, A, B, sigma, seeds, step, clip, return_x0)
    return op.int(x, model_out, p, q, A, B, sigma, seeds, operator.index(step), clip, return_x0)


class _SamplerStep(torch.autograd.Function):
    """The native forward with the reference's backward (recomputed: backward is rare, e.g. a loss through a
    sampling step in distillation)."""

    @staticmethod
    def forward(ctx, x, model_out, p, q, A, B, sigma, seeds, step, clip, return_x0):
        ctx.save_for_backward(x, model_out, p, q, A, B, sigma, seeds)
        ctx.step, ctx.clip = step, clip
        x_prev, x0 = _sampler_step_fwd(x, model_out, p, q, A, B, sigma, seeds, step, clip, True)
        return x_prev, x0

    @staticmethod
    def backward(ctx, grad_prev, grad_x0):
        grads = reference.sampler_step_grads(ctx.saved_tensors, ctx.needs_input_grad[:7], ctx.step, ctx.clip,
                                             grad_prev, grad_x0)
        return (*grads, None, None, None, None)


def sampler_step(x, model_out, p, q, A, B, sigma, seeds, step, clip=None, return_x0: bool = False):
    """See `fastdiff.reference.sampler_step`; `step` is an int or a 0-d integer tensor (host or device)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, model_out, p, q, A, B, sigma)):
        x_prev, x0 = _SamplerStep.apply(x, model_out, p, q, A, B, sigma, seeds, step, clip, return_x0)
    else:
        x_prev, x0 = _sampler_step_fwd(x, model_out, p, q, A, B, sigma, seeds, step, clip, return_x0)
    return (x_prev, x0) if return_x0 else x_prev


def group_norm_silu(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5):
    """silu(group_norm(x)) for [N, C, *] x (NCHW or channels_last), with gradients for x, weight and bias."""
    return _ops().group_norm_silu.default(x, num_groups, weight, bias, eps)[0]


def philox_normal(seeds: torch.Tensor, step: int, numel: int, stream: int = reference.STREAM_STEP) -> torch.Tensor:
    """`fastdiff.reference.philox_normal` in one kernel: float32 [len(seeds), numel]."""
    return _ops().philox_normal(seeds, operator.index(step), numel, stream)


def seeded_randn(seeds: torch.Tensor, shape: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
    """`fastdiff.reference.seeded_randn` (the initial noise x_T) in one kernel."""
    z = philox_normal(seeds, 0, math.prod(shape), reference.STREAM_INIT)
    return z.view(len(seeds), *shape).to(dtype)


__all__ = ["available", "cuda_available", "group_norm_silu", "load_error", "philox_normal", "sampler_step",
           "seeded_randn", "unavailable_reason"]
