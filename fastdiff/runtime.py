"""The bottom floor: devices, AMP dtypes and autocast, deterministic seeding, synchronisation, peak memory, and
the acceleration options (`AccelOptions`, `compile_fn`) that sampling and training both read.

Imports nothing from fastdiff but `errors`, so every other module may import it.

Randomness is a pure function of (seed, step, stream): the data order, timesteps, noise, label dropout and
dropout masks of training step k are the same whether a run got there in one go or was killed and resumed.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import os
import resource
import shlex
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from fastdiff.errors import ConfigError

AMP_MODES = ("fp32", "bf16", "fp16")


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): a padded batch size, a kernel's block (triton's own needs
    triton, which a planner must not)."""
    return 1 << max(n - 1, 0).bit_length()


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """"auto" (or None): CUDA when available, else the CPU; otherwise the named device, checked."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)  # a torch.device too: checked as its name is
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    name = str(device) if isinstance(name, torch.device) else name
    if device.type not in ("cpu", "cuda"):  # mps, xpu, meta: fastdiff's paths are the CPU's and CUDA's
        raise ConfigError(f"device {name!r} is not one fastdiff runs on; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r} requested but there are {torch.cuda.device_count()} GPUs; use cuda:0 to "
                          f"cuda:{torch.cuda.device_count() - 1}")
    return device


def amp_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype of an --amp mode (None for fp32)."""
    if amp not in AMP_MODES:
        raise ConfigError(f"unknown --amp {amp!r}; use one of {', '.join(AMP_MODES)}")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def check_amp(amp: str, device) -> None:
    """An --amp mode that the device can run (fp16 needs CUDA: its loss scale and kernels are GPU-only here)."""
    amp_dtype(amp)
    if amp == "fp16" and torch.device(device).type != "cuda":
        raise ConfigError("--amp fp16 needs a CUDA device; on CPU use --amp bf16 or fp32")


def autocast(device, amp: str, *, cache_enabled: bool = True):
    """torch.autocast for an --amp mode, a no-op context for fp32.

    cache_enabled=False where the autocast weight cache must not outlive a CUDA graph capture.
    """
    dtype = amp_dtype(amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype, cache_enabled=cache_enabled)


def grad_scaler(device, amp: str) -> torch.amp.GradScaler:
    """A loss scaler for fp16 (bf16 and fp32 need none: it is then a disabled pass-through)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=(amp == "fp16"))


def mix_seed(seed: int, step: int, stream: int = 0) -> int:
    """A 63-bit seed for (seed, step, stream), decorrelated by odd multipliers (splitmix64 constants)."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    return x & (2**63 - 1)


def isolated_rng(device):
    """A context that restores the global random state (CPU, and `device`'s on a GPU) on exit: what a run derives
    inside it (teacher pairs, a pretrained backbone, samples) leaves the run's own draws as they were, so a run is
    the same whether it made such a file or read it from the cache (and on every process of a distributed run)."""
    return torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else [])


def step_generator(seed: int, step: int, device, stream: int = 0) -> torch.Generator:
    return torch.Generator(device).manual_seed(mix_seed(seed, step, stream))


def synchronize(device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device) -> float:
    """Peak allocated CUDA memory, or the process's peak resident set size on the CPU, in MiB."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


@dataclass
class AccelOptions:
    """Which fast paths to use. `for_device` gives every fast path on a GPU and `cpu_choice` on the CPU."""

    channels_last: bool = False
    amp: str = "fp32"  # sampling autocast (training uses the run's own --amp)
    compile: bool = False
    compile_mode: str | None = None  # torch.compile mode; None is Inductor's default (we do our own graphs)
    compile_backend: str = "inductor"
    cuda_graphs: bool = False
    fullgraph: bool = True  # a graph break is an error: our ops are torch.library ops
    # The most rows one sampling call of the model runs (guidance doubles a batch's rows); a larger call runs in
    # chunks of at most this many, with the same outputs up to the convolutions' rounding. 0: no limit.
    max_rows: int = 0

    @classmethod
    def for_device(cls, device, **overrides) -> "AccelOptions":
        given = {k: v for k, v in overrides.items() if v is not None}
        if torch.device(device).type == "cuda":
            opts = cls(channels_last=True, amp="bf16", compile=True, cuda_graphs=True)
        else:
            choice = cpu_choice()
            # The choice's row limit was measured for its own precision and layout: with another (--amp fp32 on
            # an AMX CPU), the general limit (128 fp32 rows faulted, in 533 MiB against 436, and ran level)
            own = (given.get("amp", choice.sample_amp), given.get("channels_last", choice.sample_channels_last)) == \
                (choice.sample_amp, choice.sample_channels_last)
            opts = cls(channels_last=choice.sample_channels_last, amp=choice.sample_amp,
                       max_rows=choice.sample_max_rows if own else SAMPLE_ROWS)
        return dataclasses.replace(opts, **given)

    @property
    def plain(self) -> bool:
        return not (self.channels_last or self.compile or self.cuda_graphs or self.amp != "fp32"
                    or self.max_rows != 0)

    def check(self, device) -> "AccelOptions":
        device = torch.device(device)
        check_amp(self.amp, device)
        from fastdiff.config_checks import flag  # here: config_checks reads runtime's AMP_MODES

        for name in ("channels_last", "compile", "cuda_graphs", "fullgraph"):  # "no" was taken as true
            flag(name, getattr(self, name))
        if isinstance(self.max_rows, bool) or not isinstance(self.max_rows, int) or self.max_rows < 0:
            raise ConfigError(f"max_rows={self.max_rows!r} must be a whole number: the most rows per model call, "
                              "or 0 for no limit")
        if device.type != "cuda" and self.cuda_graphs:
            raise ConfigError("CUDA graphs need a CUDA device; drop --cuda-graphs or use --device cuda")
        if self.compile_mode is not None:
            from torch import _inductor

            modes = tuple(_inductor.list_mode_options())
            if self.compile_mode not in modes:
                raise ConfigError(f"unknown --compile-mode {self.compile_mode!r}; use one of {', '.join(modes)}")
            if not self.compile:
                raise ConfigError("--compile-mode applies to a compiled run only; add --compile or drop --compile-mode")
        if self.compile and self.cuda_graphs and self.compile_mode in ("reduce-overhead", "max-autotune"):
            raise ConfigError(f"--compile-mode {self.compile_mode} makes CUDA graphs of its own inside ours; use "
                              "max-autotune-no-cudagraphs (or the default mode), or --no-cuda-graphs")
        return self

    def describe(self) -> str:
        parts = [self.amp] + [name for name in ("channels_last", "compile", "cuda_graphs") if getattr(self, name)]
        if self.max_rows:
            parts.append(f"rows<={self.max_rows}")
        return "+".join(parts)


def compile_fn(fn: Callable, options: AccelOptions) -> Callable:
    """torch.compile(fn) with the options' mode and backend, static shapes, and no graph breaks allowed unless
    the options say so (`fullgraph`: off under DDP, `World.adjust`); `fn` itself when compilation is off. A
    compiled module shares its parameters with the module."""
    if not options.compile:
        return fn
    return torch.compile(fn, fullgraph=options.fullgraph, dynamic=False, mode=options.compile_mode,
                         backend=options.compile_backend)


@functools.cache
def hardware_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo, read once; empty elsewhere): the instructions it runs."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_flags() -> frozenset[str]:
    """The flags the CPU defaults (`cpu_choice`) follow: the hardware's; empty selects the fp32 defaults. (The
    test suite replaces this function to check another CPU class's defaults; what the native library may run is
    the hardware's own, `hardware_flags`.)"""
    return hardware_flags()


SAMPLE_ROWS = 64  # the CPU's sampling row limit (`cpu_choice`), except AMX's bf16 channels_last with native ops


@dataclass(frozen=True)
class CpuChoice:
    """The fast paths fastdiff uses on this CPU by default, and why (see `cpu_choice`)."""

    sample_channels_last: bool
    train_channels_last: bool
    sample_amp: str
    train_amp: str
    why: str
    # AccelOptions.max_rows of sampling: the rows that keep one call's activations small enough for glibc's
    # malloc to reuse (see cpu_choice); 0 would be no limit
    sample_max_rows: int
    sample_batch_size: int = 64  # sampling batch: 64 beat 16-256 in both precisions (1.5x fp32, 1.7x bf16 over 256)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _rows_why(rows: int) -> str:
    return f"sampling calls of at most {rows} rows (their activations stay within what malloc reuses)"


def _native_ops_run() -> bool:
    """Whether CPU tensors run the native extension's ops here now (built, and FASTDIFF_BACKEND or `use_backend`
    not forcing another backend)."""
    from fastdiff.errors import ConfigError
    from fastdiff.ops import dispatch  # here, not at the top: runtime imports nothing of fastdiff but errors

    try:
        return dispatch.backend_on("cpu") == "native"
    except ConfigError:  # a bad FASTDIFF_BACKEND: the first op call raises it, as one line
        return False


def cpu_choice(flags: frozenset[str] | None = None, native: bool | None = None) -> CpuChoice:
    """The CPU defaults for a CPU with `flags` (this one's by default) where the native extension's ops run CPU
    tensors or not (`native`; None: as they do here now), chosen by measurement (benchmarks/cpu_defaults.py and
    cpu_allocator.py: mnist5k's UNet at batch 64, DDIM-20 and a training step, every candidate interleaved, on
    five 2-core machines). The figures are in README, "CPU defaults"; the rules:

    - bf16 arithmetic in hardware (amx_bf16 or avx512_bf16): bf16 autocast (oneDNN's bf16 kernels), at fp32's
      FD_cls; in channels_last with the native ops (1.15-1.54x NCHW bf16 with the torch ops in sampling, 1.06-1.37x
      in training), else NCHW (torch's GroupNorm is slow in channels_last under autocast).
    - otherwise (AVX2 only, or AVX-512 without BF16) fp32 in channels_last, with the native ops where they run
      (bf16 autocast without bf16 instructions sampled 2-17x and trained 2-9x slower than fp32).
    - sampling calls of the model run at most 64 rows (`AccelOptions.max_rows`): classifier-free guidance makes a
      batch of 64 images 128 rows, whose widest activations (mnist5k: 96 channels at 28x28, 38.5 MB in fp32)
      exceed glibc malloc's 32 MiB ceiling for reusing freed blocks, so every call had the kernel map and
      zero-fill them afresh (peak RSS and page faults fell, speed level). With AMX and the native ops 128 rows:
      their bf16 channels_last activations stay within malloc's reuse, and sampled 1.07-1.11x 64-row calls. A
      sampling run in another precision or layout than the choice's takes 64 (`AccelOptions.for_device`).
    torch.compile (Inductor C++) is off: 30-85 s of compiling with a cold cache, more than it saves in a run or a
    1000-image evaluation, and level with today's default (0.88-1.09x).
    """
    flags = cpu_flags() if flags is None else flags
    native = _native_ops_run() if native is None else native
    rows = 128 if native and "amx_bf16" in flags else SAMPLE_ROWS
    if "amx_bf16" in flags or "avx512_bf16" in flags:
        unit = "AMX (amx_bf16)" if "amx_bf16" in flags else "AVX-512 BF16 (avx512_bf16)"
        if native:
            return CpuChoice(sample_channels_last=True, train_channels_last=True, sample_amp="bf16",
                             train_amp="bf16", sample_max_rows=rows,
                             why=f"{unit}: bf16 autocast on oneDNN's bf16 kernels, channels_last and the native "
                                 f"extension's ops (measured fastest); {_rows_why(rows)}")
        return CpuChoice(sample_channels_last=False, train_channels_last=False, sample_amp="bf16", train_amp="bf16",
                         sample_max_rows=rows,
                         why=f"{unit}: bf16 autocast on oneDNN's bf16 kernels, NCHW, as the native extension's "
                             "ops do not run here (not built, or another backend forced, which cpu_ops names; with "
                             f"them channels_last is faster, README); {_rows_why(rows)}")
    return CpuChoice(sample_channels_last=True, train_channels_last=True, sample_amp="fp32", train_amp="fp32",
                     sample_max_rows=rows,
                     why="no bf16 instructions (AVX2, or AVX-512 without BF16): fp32, channels_last, and the native "
                         "extension's ops where it is built (each measured faster; bf16 without them is many times "
                         f"slower); {_rows_why(rows)}")


MALLOC_ENV = "FASTDIFF_MALLOC"  # keep (what every fastdiff command sets) | default (glibc's own rules)
MMAP_THRESHOLD, TRIM_THRESHOLD = 32 * 2**20, 2**30  # glibc's largest mmap threshold; 1 GiB
_malloc = "glibc default"  # what this process's malloc does: `malloc_setting`


def glibc_version() -> str | None:
    """"glibc 2.36" where the C library is glibc, else None."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") or None
    except (AttributeError, ValueError, OSError):  # no confstr (Windows), or a C library without the name
        return None


def keep_freed_memory() -> str | None:
    """Have glibc's malloc keep freed memory for the next allocation, for the rest of the process: the mmap
    threshold fixed at glibc's largest (32 MiB) and the trim threshold at 1 GiB. A UNet's forward frees and
    allocates the same activations every call; by glibc's own rules the larger ones are unmapped or trimmed
    when freed, so the next call faults their pages in and zero-fills them again. Returns the setting as a
    sentence, or None where the C library is not glibc (nothing changes then). Every `fastdiff` command calls
    it (`apply_malloc_setting`); a program using the Python API may call it once at its start (README, "CPU
    defaults"). It holds for the whole process, so a library does not call it on its own."""
    global _malloc
    glibc = glibc_version()
    if not glibc:
        return None
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    mallopt = ctypes.CDLL(None).mallopt
    if mallopt(m_mmap_threshold, MMAP_THRESHOLD) != 1 or mallopt(m_trim_threshold, TRIM_THRESHOLD) != 1:
        return None
    _malloc = (f"keep freed memory ({glibc}: mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold "
               f"{TRIM_THRESHOLD >> 30} GiB)")
    return _malloc


def apply_malloc_setting() -> str:
    """What a `fastdiff` command does to this process's malloc before it starts: `keep_freed_memory`, unless
    FASTDIFF_MALLOC=default, or glibc's own MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ variables are set
    (the user's choice then stands). Returns `malloc_setting()`."""
    global _malloc
    choice = os.environ.get(MALLOC_ENV, "keep").strip().lower() or "keep"
    if choice not in ("keep", "default"):
        raise ConfigError(f"{MALLOC_ENV}={os.environ[MALLOC_ENV]!r} is not a malloc setting: use keep (keep freed "
                          "memory for the next call, the default) or default (glibc's own rules)")
    own = [v for v in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_") if v in os.environ]
    if choice == "default":
        _malloc = f"glibc default ({MALLOC_ENV}=default)"
    elif own:
        _malloc = f"glibc, as {' and '.join(own)} in the environment set it"
    elif keep_freed_memory() is None:
        _malloc = "the C library's own rules (not glibc, or it refused the setting)"
    return _malloc


def malloc_setting() -> str:
    """This process's malloc setting as a sentence (`fastdiff env` and every bench report name it)."""
    return _malloc


def sample_batch_size(device) -> int:
    """Images per sampling batch unless asked otherwise: 256 on a GPU, `cpu_choice`'s on the CPU (larger batches
    leave the CPU's caches and run slower per image)."""
    return 256 if torch.device(device).type == "cuda" else cpu_choice().sample_batch_size


def train_defaults(device) -> tuple[str, bool]:
    """(amp, channels_last) of a training run that leaves them "auto": fp32 and channels_last on a GPU (bf16 is
    asked for with --amp bf16), `cpu_choice` on the CPU."""
    if torch.device(device).type == "cuda":
        return "fp32", True
    choice = cpu_choice()
    return choice.train_amp, choice.train_channels_last


def command_line(argv: list[str] | None = None) -> str:
    """The command this process runs, as it could be typed again (a program given by its full path, such as a
    console script in a virtual environment, by its name; a module's __main__.py as `python -m <package>`, e.g.
    torchrun's `-m fastdiff.cli`): what a bench report and a run's log.txt record."""
    argv = list(sys.argv if argv is None else argv)
    if argv and os.path.basename(argv[0]) == "__main__.py":
        folder, names = os.path.dirname(os.path.abspath(argv[0])), []
        while True:  # up through the packages (folders with an __init__.py) to the top one
            names.insert(0, os.path.basename(folder))
            parent = os.path.dirname(folder)
            if not os.path.exists(os.path.join(parent, "__init__.py")) or parent == folder:
                break
            folder = parent
        return shlex.join(["python", "-m", ".".join(names), *argv[1:]])
    if argv and os.path.isabs(argv[0]):
        argv[0] = os.path.basename(argv[0])
    return shlex.join(argv)
