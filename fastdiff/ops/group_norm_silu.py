"""Fused GroupNorm + SiLU: silu(group_norm(x, num_groups, weight, bias, eps)), forward and backward.

Each (sample, group) is viewed as a [Cg, HW] matrix with strides (s_c, s_hw): (HW, 1) for NCHW, (1, C) for
channels_last, so one kernel serves both layouts. When a group fits on chip (<= MAX_FUSED_FWD elements) one program
holds it in registers: one read and one write of the activation. Otherwise the group is split into chunks along HW
and run one of two ways (`PATHS`): "split", many programs per group, a statistics pass over every chunk and then a
normalising pass (two launches; x read twice from DRAM unless L2 still holds it); or "looped", one program per
group looping over its chunks twice, statistics then normalise (one launch; the second read follows the first
within the program, so it can come from L2). `SPLIT_BY_DEFAULT` picks between them until a GPU run measures both
(the bench times each as its own row). Statistics are float32, computed two-pass on the tile (mean, then the
corrected sum of squared deviations), and chunks merge with Chan et al.'s formula, so a large mean (1e3 with std
1) costs no precision. The Triton kernels are in group_norm_silu_kernels.py; this file plans and launches them and
registers the op.
"""

import contextlib
import functools
import math

import torch

from fastdiff import reference
from fastdiff.errors import ConfigError
from fastdiff.ops._triton import launcher
from fastdiff.ops.dispatch import BenchCase, op
from fastdiff.ops.group_norm_silu_kernels import (
    FUSED,
    SPLIT,
    STATS,
    _group_norm_silu_bwd_kernel,
    _group_norm_silu_bwd_loop_kernel,
    _group_norm_silu_fwd_kernel,
    _group_norm_silu_fwd_loop_kernel,
)
from fastdiff.runtime import next_power_of_2

MAX_FUSED_FWD = 16384  # elements of one group held in registers by the fused forward (64 KB in fp32)
MAX_FUSED_BWD = 8192  # the backward holds x and dy
CHUNK = 4096  # elements per program on the split path
PATHS = ("split", "looped")  # how a group split into chunks runs (`forced_path`); the plan's choice by default
# A group split into chunks runs "split" (many programs per group) by default, not "looped" (one program per group):
# the one that has been reviewed. Which is faster on a GPU is for the bench's GroupNorm+SiLU rows to say (a row
# per path: `fastdiff[looped]` beside `fastdiff`); flip this once they have. Even then a launch with fewer groups
# than SMs stays split (looped would leave SMs idle: batch 1 at high resolution). (A third way, one program
# holding a whole 32768-element group in registers, was left out: compiled for sm_90 at the headline size, by an
# ad-hoc check like tests/ops/test_kernels_compile.py's, its backward spilled registers with Triton 3.6 and its
# forward with 3.9.)
SPLIT_BY_DEFAULT = True


def _group_strides(x: torch.Tensor):
    """(s_n, s_c, s_hw) when h and w of x merge into one index (NCHW, channels_last), else None."""
    N, C, H, W = x.shape
    sn, sc, sh, sw = x.stride()
    if H == 1 or W == 1 or sh == W * sw:  # a size-1 dim's stride is arbitrary (a transposed view's W of 1)
        return sn, sc, (sw if W > 1 else sh)
    return None


def _plan(N: int, C: int, HW: int, G: int, max_fused: int, chunk: int, num_sms: int = 0):
    """Block sizes and chunk count: one chunk when the group fits in max_fused elements.

    Groups are split as well when there are fewer groups than SMs and each is large (batch 1 at high
    resolution), so that the whole GPU works; the extra read is cheaper than idle SMs. A split launch reads x
    twice (statistics, then normalise); its second pass runs the programs in reverse order, so that it starts on
    the chunks the first pass read last, which an activation up to about the L2's size leaves there (one read
    from DRAM instead of two for those; unmeasured until a GPU run: the bench's GroupNorm+SiLU rows).
    """
    Cg = C // G
    block_c = next_power_of_2(Cg)
    block_hw = next_power_of_2(HW)
    starved = N * G < num_sms and Cg * HW >= 4 * chunk
    if block_c * block_hw > max_fused or starved:
        block_hw = min(block_hw, next_power_of_2(chunk // block_c))
    num_chunks = -(-HW // block_hw)
    warps = min(16, max(1, (block_c * block_hw) // 1024))
    return Cg, block_c, block_hw, num_chunks, next_power_of_2(num_chunks), warps


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


_forced: str | None = None  # `forced_path`'s choice; None: the plan's


@contextlib.contextmanager
def forced_path(path: str | None):
    """Run every GroupNorm+SiLU launch inside the block by `path` (one of PATHS; None: the plan's choice), for
    a group the plan splits into chunks (one that fits one program runs fused whatever the path): the bench's
    rows per path. Process-wide (not per thread), read at each launch: after any torch.compile trace, since the
    op is opaque to it, but a CUDA graph replays the launches of its capture, whatever the path is at replay."""
    global _forced
    if path is not None and path not in PATHS:
        raise ConfigError(f"group_norm_silu: unknown path {path!r}; use one of {', '.join(PATHS)} or None")
    saved, _forced = _forced, path
    try:
        yield
    finally:
        _forced = saved


def _launch_plan(x, num_groups: int, max_fused: int, chunk: int):
    """(_plan's tuple, looped) for this launch: the plan, its chunks run by the forced path or the default."""
    N, C, H, W = x.shape
    num_sms = _num_sms(x.device)
    plan = _plan(N, C, H * W, num_groups, max_fused, chunk, num_sms)
    looped = plan[3] > 1 and (_forced == "looped" or (_forced is None and not SPLIT_BY_DEFAULT
                                                      and N * num_groups >= num_sms))
    return plan, looped


def _looped_warps(block_c: int, block_hw: int) -> int:
    """Warps of a looped program: up to 8 on a 4096-element tile (16 elements per thread per tensor), since one
    program per group has fewer programs in flight than the split path's many per group."""
    return min(8, max(1, (block_c * block_hw) // 512))


def _dense(t):
    """weight or bias as the kernels read it, element c at offset c (a strided or expanded view copied)."""
    return t.contiguous() if t is not None else None


def _check_groups(x, num_groups: int) -> None:
    if x.dim() < 2 or num_groups <= 0 or x.shape[1] % num_groups:
        raise ConfigError(
            f"group_norm_silu: {x.shape[1] if x.dim() > 1 else 'no'} channels cannot be split into {num_groups} "
            "groups; use a num_groups that divides the channel count"
        )


@launcher
def group_norm_silu_fwd(x, weight, bias, num_groups: int, eps: float, max_fused: int = MAX_FUSED_FWD,
                        chunk: int = CHUNK):
    """Launch the forward on 4-D x; returns (y, mean, rstd), mean/rstd float32 [N * num_groups]."""
    _check_groups(x, num_groups)
    weight, bias = _dense(weight), _dense(bias)
    y = torch.empty_like(x)
    strides = _group_strides(x)
    if strides is None or y.stride() != x.stride():  # rare layouts: run on a plain NCHW copy, copy back
        y_c, mean, rstd = group_norm_silu_fwd(x.clone(memory_format=torch.contiguous_format), weight, bias, num_groups,
                                              eps, max_fused, chunk)
        return y.copy_(y_c), mean, rstd
    N, C, H, W = x.shape
    HW = H * W
    mean = torch.empty(N * num_groups, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    (Cg, block_c, block_hw, num_chunks, block_chunks, warps), looped = _launch_plan(x, num_groups, max_fused, chunk)
    dummy = mean  # stands in for an absent weight or bias (never read)
    w, b = weight if weight is not None else dummy, bias if bias is not None else dummy
    meta = dict(Cg=Cg, HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_C=block_c, BLOCK_HW=block_hw,
                num_warps=warps)
    if looped:
        meta["num_warps"] = _looped_warps(block_c, block_hw)
        _group_norm_silu_fwd_loop_kernel[(N * num_groups,)](x, y, w, b, mean, rstd, HW, num_groups, float(eps),
                                                             *strides, NUM_CHUNKS=num_chunks, **meta)
        return y, mean, rstd
    part = torch.empty((N * num_groups, num_chunks, 2), device=x.device, dtype=torch.float32)
    args = (x, y, w, b, mean, rstd, part, HW, num_groups, num_chunks, float(eps), *strides)
    meta["BLOCK_CHUNKS"] = block_chunks
    grid = (N * num_groups * num_chunks,)
    if num_chunks > 1:
        _group_norm_silu_fwd_kernel[grid](*args, MODE=STATS, **meta)
    _group_norm_silu_fwd_kernel[grid](*args, MODE=SPLIT if num_chunks > 1 else FUSED, **meta)
    return y, mean, rstd


@launcher
def group_norm_silu_bwd(dy, x, weight, bias, mean, rstd, num_groups: int, max_fused: int = MAX_FUSED_BWD,
                        chunk: int = CHUNK):
    """Launch the backward; returns (dx, dweight, dbias), the last two empty when weight / bias is None."""
    weight, bias = _dense(weight), _dense(bias)
    dx = torch.empty_like(x)
    strides = _group_strides(x)
    if strides is None or dx.stride() != x.stride():  # rare layouts: run on a plain NCHW copy, copy back
        dx_c, dw, db = group_norm_silu_bwd(dy, x.clone(memory_format=torch.contiguous_format), weight, bias, mean,
                                           rstd, num_groups, max_fused, chunk)
        return dx.copy_(dx_c), dw, db
    if dy.stride() != x.stride():
        dy = torch.empty_like(x).copy_(dy)
    N, C, H, W = x.shape
    HW = H * W
    (Cg, block_c, block_hw, num_chunks, block_chunks, warps), looped = _launch_plan(x, num_groups, max_fused, chunk)
    NG = N * num_groups
    w, b = weight if weight is not None else mean, bias if bias is not None else mean
    meta = dict(Cg=Cg, HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_C=block_c, BLOCK_HW=block_hw,
                num_warps=warps)
    if looped:  # one partial per group
        meta["num_warps"] = _looped_warps(block_c, block_hw)
        dwdb = torch.empty((2, N, num_groups, 1, Cg), device=x.device, dtype=torch.float32)
        _group_norm_silu_bwd_loop_kernel[(NG,)](dy, x, dx, w, b, mean, rstd, dwdb, HW, num_groups, NG, *strides,
                                                NUM_CHUNKS=num_chunks, **meta)
    else:
        part = torch.empty((NG, num_chunks, 2), device=x.device, dtype=torch.float32)
        dwdb = torch.empty((2, N, num_groups, num_chunks, Cg), device=x.device, dtype=torch.float32)
        args = (dy, x, dx, w, b, mean, rstd, part, dwdb, HW, num_groups, num_chunks, NG, *strides)
        grid = (NG * num_chunks,)
        if num_chunks > 1:
            _group_norm_silu_bwd_kernel[grid](*args, MODE=STATS, BLOCK_CHUNKS=block_chunks, **meta)
        _group_norm_silu_bwd_kernel[grid](*args, MODE=SPLIT if num_chunks > 1 else FUSED, BLOCK_CHUNKS=block_chunks,
                                          **meta)
    # Sum the partials over samples and chunks: [N, G, chunks, Cg] -> [G, Cg] -> [C] (two separate tensors).
    dw = dwdb[0].sum(dim=(0, 2)).reshape(C).to(weight.dtype) if weight is not None else x.new_empty(0)
    db = dwdb[1].sum(dim=(0, 2)).reshape(C).to(bias.dtype) if bias is not None else x.new_empty(0)
    return dx, dw, db


@torch.library.custom_op("fastdiff::group_norm_silu_fwd", mutates_args=())
def _group_norm_silu_fwd_op(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, num_groups: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return group_norm_silu_fwd(x, weight, bias, num_groups, eps)


@_group_norm_silu_fwd_op.register_fake
def _(x, weight, bias, num_groups, eps):
    stats = x.new_empty((x.shape[0] * num_groups,), dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("fastdiff::group_norm_silu_bwd", mutates_args=())
def _group_norm_silu_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, mean: torch.Tensor,
    rstd: torch.Tensor, num_groups: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return group_norm_silu_bwd(dy, x, weight, bias, mean, rstd, num_groups)


@_group_norm_silu_bwd_op.register_fake
def _(dy, x, weight, bias, mean, rstd, num_groups):
    dw = torch.empty_like(weight) if weight is not None else x.new_empty(0)
    db = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    return torch.empty_like(x), dw, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, num_groups, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.num_groups = num_groups


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db = torch.ops.fastdiff.group_norm_silu_bwd(dy, x, weight, bias, mean, rstd, ctx.num_groups)
    return dx, (dw if weight is not None else None), (db if bias is not None else None), None, None


# The autograd formula lives on the op itself (torch.library.register_autograd) rather than in a separate
# autograd.Function, so torch.compile and opcheck see one differentiable op.
_group_norm_silu_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _path_variants(shape, num_groups: int, backward: bool) -> dict:
    """The bench's other row for a case whose groups the plan splits into chunks: the path the default does not
    take ("looped" or "split")."""
    N, C, H, W = shape
    plan = _plan(N, C, H * W, num_groups, MAX_FUSED_BWD if backward else MAX_FUSED_FWD, CHUNK)
    if plan[3] == 1:
        return {}
    other = "looped" if SPLIT_BY_DEFAULT else "split"
    return {other: functools.partial(forced_path, other)}


def _bench_cases(quick: bool) -> list[BenchCase]:
    """Forward, then forward + backward, at >= 64 MB per activation (one small shape when quick). The first shape
    and dtype's forward leads the GPU suite in both layouts: NCHW, the issue's bandwidth target, and channels_last,
    the layout of the GPU's sampling and training (`AccelOptions.for_device`, `runtime.train_defaults`)."""
    bf16, fp32 = torch.bfloat16, torch.float32
    shapes = [((4, 64, 16, 16), fp32, False)] if quick else [
        ((32, 256, 64, 64), bf16, False), ((32, 256, 64, 64), bf16, True), ((32, 256, 64, 64), fp32, False),
        ((128, 128, 32, 32), bf16, False), ((8, 128, 256, 256), bf16, False)]

    def case(shape, dtype, channels_last, backward, headline=False):
        def inputs(device):
            x = torch.randn(shape, device=device, dtype=dtype)
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            return x, 32, torch.randn(shape[1], device=device, dtype=dtype), torch.randn(shape[1], device=device,
                                                                                          dtype=dtype)

        nbytes = math.prod(shape) * dtype.itemsize
        note = "channels_last" if channels_last else ""
        variants = _path_variants(shape, 32, backward)
        if backward:
            return BenchCase(shape, dtype, inputs, 5 * nbytes,
                             "5 * numel * itemsize (fwd: read x, write y; bwd: read x, dy, write dx)", note, True,
                             variants=variants)
        return BenchCase(shape, dtype, inputs, 2 * nbytes, "2 * numel * itemsize (read x, write y)", note,
                         headline=headline, variants=variants)

    return ([case(*s, False, headline=s[:2] == shapes[0][:2]) for s in shapes]
            + [case(*s, True) for s in shapes])


# Native CPU kernel: forward 1.2-1.7x, forward+backward 1.5-3.1x the reference (benchmarks/bench_native_cpu.py, 2-core
# AVX2 CPU, digits and mnist UNet shapes; the README has the table), so CPU tensors use it where fastdiff._C is built.
@op(reference.group_norm_silu, native="group_norm_silu", bench=_bench_cases)
def group_norm_silu(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5):
    """silu(group_norm(x)) for x [N, C, *] (NCHW or channels_last), with gradients for x, weight and bias.

    Statistics are float32 whatever x's dtype; the output has x's dtype. The body is the Triton path.
    """
    _check_groups(x, num_groups)
    if x.dim() != 4:  # [N, C, *] runs as [N, C, prod(*), 1]
        y = group_norm_silu(x.reshape(x.shape[0], x.shape[1], -1, 1), num_groups, weight, bias, eps)
        return y.reshape(x.shape)
    return torch.ops.fastdiff.group_norm_silu_fwd(x, weight, bias, num_groups, float(eps))[0]
