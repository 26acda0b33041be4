"""What the Triton kernels of every op share: the optional import, per-mode decoration, block-size helpers.

Triton is optional (the package must import where it is absent, e.g. macOS). Kernels are written as plain
functions and wrapped in `kernel`, which decorates them with `triton.jit` on first launch, once per mode:
`triton.jit` decides between compiling and interpreting from TRITON_INTERPRET *when it decorates*, so a kernel
decorated at import time would ignore a later change of the variable (tests set it per test). The kernels use
only Triton builtins plus `tl.reduce` with the `add` combine function below: Triton's `@jit` helpers
(`tl.sum`, `tl.sigmoid`, `tl.zeros`, `tl.cdiv`, ...) are decorated once, when triton is first imported, and
then fail in the other mode.
"""

import os
import types

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernels below are still defined (annotations need `tl.constexpr`) but never launched
    triton = None
    tl = types.SimpleNamespace(constexpr=None)


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (on CPU tensors) instead of being compiled."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class Kernel:
    """A Triton kernel decorated on first launch, once for the compiler and once for the interpreter.

    `Kernel(fn)[grid](*args)` launches like a `triton.jit` function; `jit_kwargs` go to `triton.jit`.
    """

    def __init__(self, fn, **jit_kwargs):
        self.fn = fn
        self.jit_kwargs = jit_kwargs
        self._decorated = {}

    def __getitem__(self, grid):
        if triton is None:
            raise RuntimeError(f"{self.fn.__name__} needs triton, which is not installed")
        mode = interpreting()
        if mode not in self._decorated:
            self._decorated[mode] = triton.jit(self.fn, **self.jit_kwargs)
        return self._decorated[mode][grid]


def kernel(fn=None, **jit_kwargs):
    """Decorator: `@kernel` or `@kernel(do_not_specialize=[...])` makes a lazily decorated `Kernel`."""
    if fn is None:
        return lambda f: Kernel(f, **jit_kwargs)
    return Kernel(fn, **jit_kwargs)


def _add(a, b):
    return a + b


def _sum_combine():
    """The combine function of every sum reduction (`tl.reduce(x, axis, add)`).

    Triton's own sum combine where it exists (3.0 to 3.9 at least): the interpreter recognises it and sums with
    numpy, while any other combine function is called from Python once per element (about 100x slower). Else our
    own, built with `triton.JITFunction` rather than `triton.jit` so that it is never an interpreter-only object.
    The interpreter calls `combine_fn.fn`, the compiler inlines the JITFunction: one object serves both modes.
    """
    if triton is None:
        return _add
    return getattr(getattr(tl, "standard", None), "_sum_combine", None) or triton.JITFunction(_add)


add = _sum_combine()


def next_power_of_2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_launchable(t) -> None:
    """Raise a clear error when a tensor cannot reach a Triton kernel (CPU without the interpreter)."""
    if triton is None:
        raise RuntimeError("the Triton backend needs triton (pip install triton); use FASTDIFF_BACKEND=torch")
    if t.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"Triton kernels need CUDA tensors or TRITON_INTERPRET=1, got a {t.device.type} tensor")
