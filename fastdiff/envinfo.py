"""`fastdiff env`: versions, the device, and whether each kernel backend can run here."""

from __future__ import annotations

import platform


def _native_status() -> str:
    """Whether fastdiff._C runs here, and if not, why (not built, or built for another torch)."""
    from fastdiff.ops import native

    if native.available():
        return f"built (fastdiff._C, {'CPU and CUDA' if native.cuda_available() else 'CPU'} kernels)"
    return f"unavailable (optional): {native.unavailable_reason('cpu')}"


def _triton_status(cuda: bool) -> tuple[str | None, str]:
    try:
        import triton
    except ImportError:
        return None, "not installed"
    from fastdiff.ops.dispatch import triton_interpreting

    if cuda:
        return triton.__version__, "usable on the GPU"
    if triton_interpreting():
        return triton.__version__, "usable on the CPU through TRITON_INTERPRET=1 (slow)"
    return triton.__version__, "installed; needs a CUDA GPU (or TRITON_INTERPRET=1 on the CPU)"


def _cpu_ops() -> str:
    """The op backend that CPU tensors run here (`ops.dispatch`: the automatic choice, or FASTDIFF_BACKEND's)."""
    from fastdiff.errors import ConfigError
    from fastdiff.ops import dispatch

    try:
        backend = dispatch.backend_on("cpu")
    except ConfigError as e:
        return f"none: {e}"
    if dispatch.current_backend() is not None:
        return f"{backend} (forced by FASTDIFF_BACKEND)"
    if backend == "torch":  # every CPU measured prefers the native ops (runtime.cpu_choice)
        return "torch (the native ops would be faster here: build the extension, README)"
    return {"native": "native (fastdiff._C)"}.get(backend, backend)


def collect() -> dict:
    import torch

    from fastdiff import __version__
    from fastdiff.runtime import cpu_choice, cpu_flags, malloc_setting

    cuda = torch.cuda.is_available()
    triton_version, triton_status = _triton_status(cuda)
    info = {
        "fastdiff": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "device": "cuda" if cuda else "cpu",
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "cpu_threads": torch.get_num_threads(),
        "triton_kernels": triton_status,
        "native_extension": _native_status(),
        "malloc": malloc_setting(),
    }
    if not cuda:  # what sample, train and the Python API use here by default, and why (README, "CPU defaults")
        flags = cpu_flags()
        info["cpu_features"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
        choice = cpu_choice(flags)
        info["cpu_defaults"] = choice.to_dict()
        info["cpu_ops"] = _cpu_ops()
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["compute_capability"] = f"{props.major}.{props.minor}"
        try:
            import pynvml

            pynvml.nvmlInit()
            info["driver"] = pynvml.nvmlSystemGetDriverVersion()
            pynvml.nvmlShutdown()
        except Exception as e:  # noqa: BLE001 - telemetry is optional
            info["driver"] = f"unknown ({type(e).__name__})"
    return info
