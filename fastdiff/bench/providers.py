"""The providers of every `fastdiff bench` row: one vocabulary for ops, sampling and training.

A row names its provider and dtype; ratios are taken against the torch-eager, torch-compile and diffusers rows of
the same case in the same run (`report.add_ratios`).
"""

from __future__ import annotations

import torch

from fastdiff.bench import diffusers_ref
from fastdiff.ops import dispatch, native, use_backend
from fastdiff.runtime import AccelOptions

PROVIDERS = {
    "torch-eager": "the plain PyTorch reference: reference ops (use_backend('torch')), NCHW, no compile, no "
                   "graphs; `run_table` for sampling, the eager train step",
    "torch-compile": "the reference ops under torch.compile (an op alone; the whole denoising step for sampling, "
                     "the model for training), NCHW, no CUDA graphs",
    "fastdiff": "what fastdiff runs by default on the device: an op's fused Triton kernel; for sampling and "
                "training every fast path of `fastdiff.sampling.fast` / `fastdiff.train.step` on a GPU (fused ops, "
                "channels_last, torch.compile, CUDA graphs), on the CPU the layout and ops of "
                "`fastdiff.runtime.cpu_choice` (at the row's dtype)",
    "fastdiff-native": "the kernels of the optional extension fastdiff._C (use_backend('native'): its C++ CPU or "
                       "CUDA GroupNorm+SiLU and sampler step) in the torch-eager loop",
    "diffusers": "diffusers' UNet2DModel at the same configuration with its DDPM/DDIM scheduler loop, eager",
}


def backend_of(provider: str) -> str | None:
    """The op backend a provider runs under (`fastdiff.ops.use_backend`; None: the automatic choice). Compilation
    bakes it in, so a provider's calls run under it from the first (compiling) one on."""
    if provider == "fastdiff-native":
        return "native"
    return "torch" if provider in ("torch-eager", "torch-compile") else None


def with_backend(provider: str, fn):
    """fn, called under the provider's op backend (each call: providers alternate in the timer)."""
    def run():
        with use_backend(backend_of(provider)):
            return fn()

    return run


def provider_options(provider: str, dtype: str, device: torch.device) -> AccelOptions:
    """fastdiff: what `fastdiff sample` / `fastdiff train` use by default on this device; torch-compile: compile
    alone; the others the plain path at `dtype`."""
    if provider == "torch-compile":
        return AccelOptions(amp=dtype, compile=True)
    if provider == "fastdiff":
        return AccelOptions.for_device(device, amp=dtype)
    return AccelOptions(amp=dtype)


def describe(provider: str, opts: AccelOptions, device: torch.device) -> str:
    if provider == "diffusers":
        return f"{opts.amp}+UNet2DModel"
    backend = backend_of(provider)
    if backend is None:  # the automatic choice on this device
        with use_backend(None):
            backend = dispatch.backend_on(device)
    ops = {"torch": "reference-ops", "native": "native-ops"}.get(backend, "fused-ops")
    return f"{opts.describe()}+{ops}"


def unavailable(provider: str, device: torch.device, quick: bool) -> str | None:
    """Why `provider` cannot run its end-to-end rows here (the row says so), or None."""
    if provider == "torch-compile" and device.type == "cpu" and quick:
        return "skipped: --quick on the CPU (Inductor's C++ compile takes minutes on a small CPU)"
    if provider == "fastdiff-native":
        reason = native.unavailable_reason(device)
        return f"skipped: {reason}" if reason else None
    if provider == "diffusers":
        return None if diffusers_ref.available() else "skipped: diffusers is not installed (pip install diffusers)"
    return None
