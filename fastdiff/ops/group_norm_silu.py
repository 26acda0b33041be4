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
1) costs no precision.
"""

import contextlib
import functools
import math

import torch

from fastdiff import reference
from fastdiff.errors import ConfigError
from fastdiff.ops._triton import launcher, tl, triton
from fastdiff.ops.dispatch import BenchCase, op

MAX_FUSED_FWD = 16384  # elements of one group held in registers by the fused forward (64 KB in fp32)
MAX_FUSED_BWD = 8192  # the backward holds x and dy
CHUNK = 4096  # elements per program on the split path
STATS, FUSED, SPLIT = 0, 1, 2  # the MODE of a launch: chunk statistics only, one-pass, normalise with chunk stats
PATHS = ("split", "looped")  # how a group split into chunks runs (`forced_path`); the plan's choice by default
# A group split into chunks runs "split" (many programs per group) by default, not "looped" (one program per group):
# the one that has been reviewed. Which is faster on a GPU is for the bench's GroupNorm+SiLU rows to say (a row
# per path: `fastdiff[looped]` beside `fastdiff`); flip this once they have. Even then a launch with fewer groups
# than SMs stays split (looped would leave SMs idle: batch 1 at high resolution). (A third way, one program
# holding a whole 32768-element group in registers, was left out: at the headline size its forward took 105-128
# registers per thread and one program per SM, spilling with Triton 3.9, and its backward spilled with 3.6 too.)
SPLIT_BY_DEFAULT = True


@triton.jit
def _tile_moments(x, mask, count):
    """(mean, m2) of the masked tile x (count elements): the mean, then the sum of squared deviations from it with
    the first mean's rounding error corrected."""
    mean0 = tl.sum(x) / count
    d = tl.where(mask, x - mean0, 0.0)
    sd = tl.sum(d)
    return mean0 + sd / count, tl.sum(d * d) - sd * sd / count


@triton.jit
def _load_affine(w_ptr, b_ptr, g, c, cmask, Cg: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """The group's [BLOCK_C, 1] weight and bias as float32 (1 and 0 where absent)."""
    if HAS_W:
        w = tl.load(w_ptr + g * Cg + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        w = tl.full(c.shape, 1.0, tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + g * Cg + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        b = tl.full(c.shape, 0.0, tl.float32)
    return w, b


@triton.jit
def _normalise_silu(x, mean, rstd, w, b, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    h = (x - mean) * rstd
    if HAS_W:
        h = h * w
    if HAS_B:
        h = h + b
    return h * tl.sigmoid(h)  # silu


@triton.jit
def _looped_group(G, sxn, sxc, Cg: tl.constexpr, BLOCK_C: tl.constexpr):
    """A looped program's group: (index n*G + g, g, [BLOCK_C, 1] channels, their mask, their offsets)."""
    ng = tl.program_id(0)
    n = ng // G
    g = ng % G
    c = tl.arange(0, BLOCK_C)[:, None]
    return ng, g, c, c < Cg, n.to(tl.int64) * sxn + (g * Cg + c) * sxc


@triton.jit
def _load_chunk(ptr, base, chunk, cmask, HW, sxhw, BLOCK_HW: tl.constexpr):
    """(offsets, mask, values as float32) of a looped program's chunk `chunk` of its group (base: the group's
    [BLOCK_C, 1] channel offsets)."""
    hw = chunk * BLOCK_HW + tl.arange(0, BLOCK_HW)[None, :]
    mask = cmask & (hw < HW)
    offs = base + hw * sxhw
    return offs, mask, tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _backward_tile(x, dy, mask, mean, rstd, w, b, HAS_B: tl.constexpr):
    """(xhat, dh, dxhat) of a tile (see _group_norm_silu_bwd_kernel), zero outside the mask."""
    xhat = (x - mean) * rstd
    h = xhat * w
    if HAS_B:
        h = h + b
    s = tl.sigmoid(h)
    dh = tl.where(mask, dy * s * (1.0 + h * (1.0 - s)), 0.0)
    return xhat, dh, dh * w


@triton.jit
def _group_norm_silu_fwd_kernel(
    x_ptr,  # [N, C, H, W], group (n, g) element (c, hw) at n*sxn + (g*Cg + c)*sxc + hw*sxhw
    y_ptr,  # output, same strides as x
    w_ptr, b_ptr,  # [C] weight and bias (read when HAS_W / HAS_B)
    mean_ptr, rstd_ptr,  # [N*G] float32, written by chunk 0 of each group (saved for the backward)
    part_ptr,  # [N*G, num_chunks, 2] float32 chunk (mean, m2): written in STATS mode, read in SPLIT mode
    HW, G, num_chunks,
    eps,
    sxn, sxc, sxhw,  # strides of x and y
    Cg: tl.constexpr,  # channels per group; constexpr so that the channel mask folds away (vector loads)
    MODE: tl.constexpr,  # STATS=0, FUSED=1, SPLIT=2
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_C: tl.constexpr,  # >= Cg (the whole group's channels)
    BLOCK_HW: tl.constexpr,  # spatial positions per program (all of HW when FUSED)
    BLOCK_CHUNKS: tl.constexpr,  # >= num_chunks
):
    # program_id -> (group n*G + g, chunk). Bytes: FUSED reads x once and writes y once; STATS reads x once.
    pid = tl.program_id(0)
    if MODE == 2:  # in reverse: the chunks the statistics pass read last may still be in L2 (see _plan)
        pid = tl.num_programs(0) - 1 - pid
    ng = pid // num_chunks
    chunk = pid % num_chunks
    n = ng // G
    g = ng % G
    c = tl.arange(0, BLOCK_C)[:, None]
    hw = chunk * BLOCK_HW + tl.arange(0, BLOCK_HW)[None, :]
    mask = (c < Cg) & (hw < HW)
    offs = n.to(tl.int64) * sxn + (g * Cg + c) * sxc + hw * sxhw
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)

    if MODE == 2:  # merge the chunks' (mean, m2): Chan, Golub & LeVeque (1983)
        k = tl.arange(0, BLOCK_CHUNKS)
        kmask = k < num_chunks
        mean_k = tl.load(part_ptr + (ng * num_chunks + k) * 2, mask=kmask, other=0.0)
        m2_k = tl.load(part_ptr + (ng * num_chunks + k) * 2 + 1, mask=kmask, other=0.0)
        count_k = tl.where(kmask, Cg * tl.minimum(BLOCK_HW, HW - k * BLOCK_HW), 0).to(tl.float32)
        total = Cg * HW * 1.0
        mean = tl.sum(count_k * mean_k, 0) / total
        dev = mean_k - mean
        var = (tl.sum(m2_k, 0) + tl.sum(count_k * dev * dev, 0)) / total
    else:  # two passes over the tile in registers
        count = Cg * tl.minimum(BLOCK_HW, HW - chunk * BLOCK_HW) * 1.0
        mean, m2 = _tile_moments(x, mask, count)
        var = m2 / count

    if MODE == 0:
        tl.store(part_ptr + (ng * num_chunks + chunk) * 2, mean)
        tl.store(part_ptr + (ng * num_chunks + chunk) * 2 + 1, m2)
    else:
        rstd = 1.0 / tl.sqrt_rn(tl.maximum(var, 0.0) + eps)
        tl.store(mean_ptr + ng, mean, mask=chunk == 0)
        tl.store(rstd_ptr + ng, rstd, mask=chunk == 0)
        w, b = _load_affine(w_ptr, b_ptr, g, c, c < Cg, Cg, HAS_W, HAS_B)
        tl.store(y_ptr + offs, _normalise_silu(x, mean, rstd, w, b, HAS_W, HAS_B), mask=mask)


@triton.jit
def _group_norm_silu_fwd_loop_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr,  # as in _group_norm_silu_fwd_kernel
    HW, G,
    eps,
    sxn, sxc, sxhw,
    Cg: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,  # spatial positions per iteration
    NUM_CHUNKS: tl.constexpr,  # iterations: a constant trip count (and numpy 2.5's interpreter loops need one)
):
    # The "looped" path: program_id -> group; its chunks twice, statistics then normalise. Bytes: x is read twice
    # by the program, the second time just after the first, so L2 may serve it. The statistics are per-position
    # sums of x - K and (x - K)^2, reduced once after the loop (no block-wide reduction, so no barrier, per
    # chunk); K, the first chunk's mean, keeps a large mean from costing precision. Chunk 0 is always full: a
    # group is split into chunks only when it is larger than one (`_plan`).
    ng, g, c, cmask, base = _looped_group(G, sxn, sxc, Cg, BLOCK_C)
    offs, mask, x = _load_chunk(x_ptr, base, 0, cmask, HW, sxhw, BLOCK_HW)  # chunk 0 (full: the group is split)
    shift = tl.sum(x) / (Cg * BLOCK_HW * 1.0)
    s1 = tl.where(mask, x - shift, 0.0)
    s2 = s1 * s1
    for chunk in range(1, NUM_CHUNKS):
        offs, mask, x = _load_chunk(x_ptr, base, chunk, cmask, HW, sxhw, BLOCK_HW)
        d = tl.where(mask, x - shift, 0.0)
        s1 += d
        s2 += d * d
    count = Cg * HW * 1.0
    sum1 = tl.sum(s1)
    mean = shift + sum1 / count
    m2 = tl.sum(s2) - sum1 * sum1 / count
    rstd = 1.0 / tl.sqrt_rn(tl.maximum(m2 / count, 0.0) + eps)
    tl.store(mean_ptr + ng, mean)
    tl.store(rstd_ptr + ng, rstd)
    w, b = _load_affine(w_ptr, b_ptr, g, c, cmask, Cg, HAS_W, HAS_B)
    for chunk in range(0, NUM_CHUNKS):
        offs, mask, x = _load_chunk(x_ptr, base, chunk, cmask, HW, sxhw, BLOCK_HW)
        tl.store(y_ptr + offs, _normalise_silu(x, mean, rstd, w, b, HAS_W, HAS_B), mask=mask)


@triton.jit
def _group_norm_silu_bwd_kernel(
    dy_ptr,  # gradient of the output, same strides as x
    x_ptr,  # the forward input
    dx_ptr,  # gradient of x (written unless STATS), same strides as x
    w_ptr, b_ptr,  # [C] weight and bias (read when HAS_W / HAS_B)
    mean_ptr, rstd_ptr,  # [N*G] float32 from the forward
    part_ptr,  # [N*G, num_chunks, 2] float32 chunk sums of (dxhat, dxhat*xhat): written in STATS, read in SPLIT
    dwdb_ptr,  # [2, N*G, num_chunks, Cg] float32 partial dweight, dbias (written in STATS and FUSED)
    HW, G, num_chunks, NG,
    sxn, sxc, sxhw,  # strides of x, dy and dx
    Cg: tl.constexpr,  # channels per group
    MODE: tl.constexpr,  # STATS=0, FUSED=1, SPLIT=2
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    BLOCK_CHUNKS: tl.constexpr,
):
    # program_id -> (group, chunk). Bytes: FUSED reads x and dy once and writes dx once.
    # With xhat = (x - mean) * rstd, h = w*xhat + b, y = silu(h):
    #   dh = dy * s * (1 + h * (1 - s)), s = sigmoid(h);  dw = sum(dh * xhat), db = sum(dh);  dxhat = dh * w
    #   dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))   (means over the group)
    pid = tl.program_id(0)
    if MODE == 2:  # in reverse, as in the forward
        pid = tl.num_programs(0) - 1 - pid
    ng = pid // num_chunks
    chunk = pid % num_chunks
    n = ng // G
    g = ng % G
    c = tl.arange(0, BLOCK_C)[:, None]
    hw = chunk * BLOCK_HW + tl.arange(0, BLOCK_HW)[None, :]
    cmask = c < Cg
    mask = cmask & (hw < HW)
    offs = n.to(tl.int64) * sxn + (g * Cg + c) * sxc + hw * sxhw
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + ng)
    rstd = tl.load(rstd_ptr + ng)

    w, b = _load_affine(w_ptr, b_ptr, g, c, cmask, Cg, HAS_W, HAS_B)
    xhat, dh, dxhat = _backward_tile(x, dy, mask, mean, rstd, w, b, HAS_B)

    if MODE != 2:  # per-channel partial dweight, dbias of this chunk
        cvec = tl.arange(0, BLOCK_C)
        dst = dwdb_ptr + (ng * num_chunks + chunk) * Cg + cvec
        tl.store(dst, tl.sum(dh * xhat, 1), mask=cvec < Cg)
        tl.store(dst + NG * num_chunks * Cg, tl.sum(dh, 1), mask=cvec < Cg)
    if MODE == 0:
        tl.store(part_ptr + (ng * num_chunks + chunk) * 2, tl.sum(dxhat))
        tl.store(part_ptr + (ng * num_chunks + chunk) * 2 + 1, tl.sum(dxhat * xhat))
    else:
        if MODE == 2:
            k = tl.arange(0, BLOCK_CHUNKS)
            kmask = k < num_chunks
            sum_dxhat = tl.sum(tl.load(part_ptr + (ng * num_chunks + k) * 2, mask=kmask, other=0.0), 0)
            sum_dxhat_xhat = tl.sum(tl.load(part_ptr + (ng * num_chunks + k) * 2 + 1, mask=kmask, other=0.0), 0)
        else:
            sum_dxhat = tl.sum(dxhat)
            sum_dxhat_xhat = tl.sum(dxhat * xhat)
        total = Cg * HW * 1.0
        dx = rstd * (dxhat - sum_dxhat / total - xhat * (sum_dxhat_xhat / total))
        tl.store(dx_ptr + offs, dx, mask=mask)


@triton.jit
def _group_norm_silu_bwd_loop_kernel(
    dy_ptr, x_ptr, dx_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr,  # as in _group_norm_silu_bwd_kernel
    dwdb_ptr,  # [2, N*G, 1, Cg] float32 partial dweight, dbias of each group
    HW, G, NG,
    sxn, sxc, sxhw,
    Cg: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,  # as in the forward
):
    # The "looped" backward: program_id -> group; its chunks twice, the sums (and dweight, dbias) then dx. The
    # sums are per-position accumulators reduced once after the loop: dweight and dbias of each channel, then
    # sum(dxhat) = sum_c w_c dbias_c and sum(dxhat * xhat) = sum_c w_c dweight_c.
    ng, g, c, cmask, base = _looped_group(G, sxn, sxc, Cg, BLOCK_C)
    mean = tl.load(mean_ptr + ng)
    rstd = tl.load(rstd_ptr + ng)
    w, b = _load_affine(w_ptr, b_ptr, g, c, cmask, Cg, HAS_W, HAS_B)
    acc_dw = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
    acc_db = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
    for chunk in range(0, NUM_CHUNKS):
        offs, mask, x = _load_chunk(x_ptr, base, chunk, cmask, HW, sxhw, BLOCK_HW)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xhat, dh, _ = _backward_tile(x, dy, mask, mean, rstd, w, b, HAS_B)
        acc_dw += dh * xhat
        acc_db += dh
    cvec = tl.arange(0, BLOCK_C)
    tl.store(dwdb_ptr + ng * Cg + cvec, tl.sum(acc_dw, 1), mask=cvec < Cg)
    tl.store(dwdb_ptr + (NG + ng) * Cg + cvec, tl.sum(acc_db, 1), mask=cvec < Cg)
    sum_dxhat = tl.sum(acc_db * w)
    sum_dxhat_xhat = tl.sum(acc_dw * w)
    total = Cg * HW * 1.0
    for chunk in range(0, NUM_CHUNKS):
        offs, mask, x = _load_chunk(x_ptr, base, chunk, cmask, HW, sxhw, BLOCK_HW)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xhat, dh, dxhat = _backward_tile(x, dy, mask, mean, rstd, w, b, HAS_B)
        dx = rstd * (dxhat - sum_dxhat / total - xhat * (sum_dxhat_xhat / total))
        tl.store(dx_ptr + offs, dx, mask=mask)


def _group_strides(x: torch.Tensor):
    """(s_n, s_c, s_hw) when h and w of x merge into one index (NCHW, channels_last), else None."""
    N, C, H, W = x.shape
    sn, sc, sh, sw = x.stride()
    if H == 1 or sh == W * sw:
        return sn, sc, (sw if W > 1 else sh)
    return None


def _pow2(n: int) -> int:
    """The smallest power of two >= n (triton.next_power_of_2, without needing triton: the bench plans anywhere)."""
    return 1 << max(n - 1, 0).bit_length()


def _plan(N: int, C: int, HW: int, G: int, max_fused: int, chunk: int, num_sms: int = 0):
    """Block sizes and chunk count: one chunk when the group fits in max_fused elements.

    Groups are split as well when there are fewer groups than SMs and each is large (batch 1 at high
    resolution), so that the whole GPU works; the extra read is cheaper than idle SMs. A split launch reads x
    twice (statistics, then normalise); its second pass runs the programs in reverse order, so that it starts on
    the chunks the first pass read last, which an activation up to about the L2's size leaves there (one read
    from DRAM instead of two for those; unmeasured until a GPU run: the bench's GroupNorm+SiLU rows).
    """
    Cg = C // G
    block_c = _pow2(Cg)
    block_hw = _pow2(max(HW, 1))
    starved = N * G < num_sms and Cg * HW >= 4 * chunk
    if block_c * block_hw > max_fused or starved:
        block_hw = max(1, min(block_hw, _pow2(max(chunk // block_c, 1))))
    num_chunks = -(-HW // block_hw)
    warps = min(16, max(1, (block_c * block_hw) // 1024))
    return Cg, block_c, block_hw, num_chunks, _pow2(max(num_chunks, 1)), warps


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
    y = torch.empty_like(x)
    strides = _group_strides(x)
    if strides is None or y.stride() != x.stride():  # rare layouts: run contiguous, copy back
        y_c, mean, rstd = group_norm_silu_fwd(x.contiguous(), weight, bias, num_groups, eps, max_fused, chunk)
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
    dx = torch.empty_like(x)
    strides = _group_strides(x)
    if strides is None or dx.stride() != x.stride():  # rare layouts: run contiguous, copy back
        dx_c, dw, db = group_norm_silu_bwd(dy, x.contiguous(), weight, bias, mean, rstd, num_groups, max_fused, chunk)
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
    """Forward, then forward + backward, at >= 64 MB per activation (one small shape when quick); the first forward
    leads the GPU suite."""
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

    return ([case(*s, False, headline=i == 0) for i, s in enumerate(shapes)]
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
