"""One fused denoising step: x0 = p*x + q*out (clamped), x_prev = A*x0 + B*x + sigma*z, z from in-kernel Philox.

The noise is the stream of `fastdiff.reference.philox_normal` (Philox4x32-10 keyed by the sample's seed, counter
(element // 4, step, 0, 0), two Box-Muller pairs per call), drawn inside the kernel by `_triton.philox_normal4`: no
noise tensor is read or written, and the Triton and torch backends agree to the float32 rounding of log/sqrt/sin/cos.
"""

import math

import torch

from fastdiff import reference
from fastdiff.ops._triton import launcher, philox_normal4, tl, triton
from fastdiff.ops.dispatch import BenchCase, op

_MASK32 = 0xFFFFFFFF
_TILE = 2048  # elements per program: 16 per thread with 4 warps, enough loads in flight to cover DRAM latency


@triton.jit(do_not_specialize=["step"])
def _sampler_step_kernel(
    x_ptr,  # x_t, viewed per sample as [R, L]: element (r, l) has logical NCHW index e = r*L + l
    out_ptr,  # model output, same logical shape as x
    y_ptr,  # x_prev (written), dtype of x
    x0_ptr,  # x0 (written when WRITE_X0), same strides as y
    p_ptr, q_ptr, a_ptr, b_ptr, sigma_ptr,  # [N] per-sample coefficients, any float dtype, strides below
    seed_ptr,  # [N] int64 seeds (Philox key = (seed & 0xffffffff, seed >> 32))
    step_ptr,  # 0-d int64 step on the device (read when STEP_FROM_PTR, so the caller never syncs)
    step,  # the step as an int (used when not STEP_FROM_PTR), already masked to 32 bits
    clip,  # x0 is clamped to [-clip, clip] when HAS_CLIP
    R, L,  # the per-sample view; L % 4 == 0 or R == 1 (then BLOCK_R == 1), so no group of 4 straddles two rows
    tiles_r, tiles_l,  # tiles per sample along R and L
    sxn, sxr, sxl,  # strides of x in the [N, R, L] view
    son, sor, sol,  # strides of out
    syn, syr, syl,  # strides of y and x0
    sp, sq, sa, sb, ssig, sseed,  # strides of the [N] vectors (0 for expanded views)
    HAS_CLIP: tl.constexpr,
    WRITE_X0: tl.constexpr,
    STEP_FROM_PTR: tl.constexpr,
    BLOCK_R: tl.constexpr,  # rows per tile
    BLOCK_Q: tl.constexpr,  # Philox groups per row per tile (4 elements each)
):
    # program_id -> (sample n, row tile, column tile). Memory-bound: reads x and out once, writes x_prev (and x0)
    # once: (2 + 1 [+1]) * numel * itemsize bytes; Philox + Box-Muller run once per 4 elements.
    pid = tl.program_id(0)
    tiles = tiles_r * tiles_l
    n = pid // tiles
    rem = pid % tiles
    r0 = (rem // tiles_l) * BLOCK_R
    l0 = (rem % tiles_l) * (4 * BLOCK_Q)
    n64 = n.to(tl.int64)

    rows = r0 + tl.arange(0, BLOCK_R)[:, None]  # [BLOCK_R, 1]
    cols = l0 + tl.arange(0, 4 * BLOCK_Q)[None, :]  # [1, 4*BLOCK_Q]
    if BLOCK_R == 1:  # one run per sample: leave rows out of the offsets so the loads vectorise
        mask = cols < L
        x_offs = n64 * sxn + cols * sxl
        o_offs = n64 * son + cols * sol
        y_offs = n64 * syn + cols * syl
    else:
        mask = (rows < R) & (cols < L)
        x_offs = n64 * sxn + rows * sxr + cols * sxl
        o_offs = n64 * son + rows * sor + cols * sol
        y_offs = n64 * syn + rows * syr + cols * syl
    x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(out_ptr + o_offs, mask=mask, other=0.0).to(tl.float32)

    p = tl.load(p_ptr + n * sp).to(tl.float32)
    q = tl.load(q_ptr + n * sq).to(tl.float32)
    A = tl.load(a_ptr + n * sa).to(tl.float32)
    B = tl.load(b_ptr + n * sb).to(tl.float32)
    sigma = tl.load(sigma_ptr + n * ssig).to(tl.float32)

    x0 = p * x + q * o
    if HAS_CLIP:  # where-based so that NaN propagates like torch.clamp
        x0 = tl.where(x0 > clip, clip, tl.where(x0 < -clip, -clip, x0))
    y = A * x0 + B * x

    if sigma != 0.0:  # deterministic steps (DDIM eta=0, the last DDPM step) skip the generator
        seed = tl.load(seed_ptr + n * sseed)
        if STEP_FROM_PTR:
            step_u32 = (tl.load(step_ptr) & 0xFFFFFFFF).to(tl.uint32)
        else:
            step_u32 = step.to(tl.uint32)
        # Counter (g, step, 0, 0) for the Philox group g = e // 4 of every 4 consecutive logical elements.
        g = (tl.arange(0, BLOCK_R)[:, None] + r0) * (L // 4) + (l0 // 4) + tl.arange(0, BLOCK_Q)[None, :]
        z0, z1, z2, z3 = philox_normal4(seed, g.to(tl.uint32), step_u32, 0)
        # Interleave to elements 4g, 4g+1, 4g+2, 4g+3: [.., j, k] holds z_(2j+k).
        z = tl.join(tl.join(z0, z2), tl.join(z1, z3))
        z = tl.reshape(z, [BLOCK_R, 4 * BLOCK_Q])
        y = y + sigma * z

    tl.store(y_ptr + y_offs, y, mask=mask)
    if WRITE_X0:
        tl.store(x0_ptr + y_offs, x0, mask=mask)


def _view_strides(t: torch.Tensor, rows: int, cols: int):
    """Strides (n, r, l) of t [N, C, H, W] seen as [N, rows, cols] with rows in (1, C), or None if not a view."""
    N, C, H, W = t.shape
    sn, sc, sh, sw = t.stride()
    if rows == 1:  # each sample must be one run in logical order (size-1 dims may have any stride)
        ok = (W == 1 or sw == 1) and (H == 1 or sh == W) and (C == 1 or sc == H * W)
        return (sn, 0, 1) if ok else None
    if H == 1 or sh == W * sw:  # h and w merge into one index of stride sw
        return (sn, sc, sw)
    return None


def _pick_view(x, model_out, y):
    """The [R, L] per-sample view that all three tensors share, preferring one run per sample."""
    N, C, H, W = x.shape
    candidates = [(1, C * H * W)] + ([(C, H * W)] if (H * W) % 4 == 0 else [])
    for rows, cols in candidates:
        strides = [_view_strides(t, rows, cols) for t in (x, model_out, y)]
        if all(s is not None for s in strides):
            return rows, cols, strides
    return None


@launcher
def sampler_step_fwd(x, model_out, p, q, A, B, sigma, seeds, step_tensor, step_int: int, clip, return_x0: bool):
    """Launch the Triton sampler step on 4-D x; returns (x_prev, x0), x0 empty unless return_x0."""
    y = torch.empty_like(x)
    x0 = torch.empty_like(x) if return_x0 else x.new_empty(0)
    view = _pick_view(x, model_out, y)
    if view is None:  # e.g. channels_last with H*W % 4 != 0: run on contiguous copies, then restore the layout
        xc, oc = x.contiguous(), model_out.contiguous()
        yc, x0c = sampler_step_fwd(xc, oc, p, q, A, B, sigma, seeds, step_tensor, step_int, clip, return_x0)
        y.copy_(yc)
        if return_x0:
            x0.copy_(x0c)
        return y, x0
    rows, cols, (sx, so, sy) = view
    N = x.shape[0]
    seeds = seeds.to(device=x.device, dtype=torch.int64)  # no-ops in the samplers (already int64 on the device)
    if step_tensor is not None:  # int64, as the kernel reads it (an int32 step overflowed its 32-bit mask)
        step_tensor = step_tensor.to(device=x.device, dtype=torch.int64)
    block_r = min(triton.next_power_of_2(rows), 64)  # 1 exactly when rows == 1
    block_q = max(1, min(_TILE // (4 * block_r), triton.next_power_of_2(triton.cdiv(cols, 4))))
    tiles_r, tiles_l = triton.cdiv(rows, block_r), triton.cdiv(cols, 4 * block_q)
    x0_out = x0 if return_x0 else y
    step_ptr = step_tensor if step_tensor is not None else seeds
    _sampler_step_kernel[(N * tiles_r * tiles_l,)](
        x, model_out, y, x0_out, p, q, A, B, sigma, seeds, step_ptr, step_int & _MASK32,
        float(clip) if clip is not None else 0.0,
        rows, cols, tiles_r, tiles_l, *sx, *so, *sy,
        p.stride(0), q.stride(0), A.stride(0), B.stride(0), sigma.stride(0), seeds.stride(0),
        HAS_CLIP=clip is not None, WRITE_X0=return_x0, STEP_FROM_PTR=step_tensor is not None,
        BLOCK_R=block_r, BLOCK_Q=block_q, num_warps=4,
    )
    return y, x0


@torch.library.custom_op("fastdiff::sampler_step", mutates_args=())
def _sampler_step_op(
    x: torch.Tensor, model_out: torch.Tensor, p: torch.Tensor, q: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
    sigma: torch.Tensor, seeds: torch.Tensor, step_tensor: torch.Tensor | None, step_int: int, clip: float | None,
    return_x0: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return sampler_step_fwd(x, model_out, p, q, A, B, sigma, seeds, step_tensor, step_int, clip, return_x0)


@_sampler_step_op.register_fake
def _(x, model_out, p, q, A, B, sigma, seeds, step_tensor, step_int, clip, return_x0):
    return torch.empty_like(x), (torch.empty_like(x) if return_x0 else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, model_out, p, q, A, B, sigma, seeds, step_tensor, step_int, clip, return_x0 = inputs
    ctx.save_for_backward(x, model_out, p, q, A, B, sigma, seeds, step_tensor)
    ctx.step_int, ctx.clip, ctx.return_x0 = step_int, clip, return_x0


def _backward(ctx, grad_prev, grad_x0):
    """The reference's gradients, recomputed (`reference.sampler_step_grads`, as the native op's backward)."""
    *saved, step_tensor = ctx.saved_tensors
    step = step_tensor if step_tensor is not None else ctx.step_int
    grads = reference.sampler_step_grads(saved, ctx.needs_input_grad[:7], step, ctx.clip, grad_prev,
                                         grad_x0 if ctx.return_x0 else None)
    return (*grads, None, None, None, None, None)


_sampler_step_op.register_autograd(_backward, setup_context=_setup_context)


def _bench_cases(quick: bool) -> list[BenchCase]:
    """sigma > 0 and the step read from a device tensor, at >= 64 MB per tensor (one small shape when quick); the
    first two (fp32 and bf16: each has a target) lead the GPU suite."""
    shapes = [((16, 3, 32, 32), torch.float32)] if quick else [
        ((512, 3, 128, 128), torch.float32), ((512, 3, 128, 128), torch.bfloat16), ((1024, 4, 64, 64), torch.float32)]

    def case(shape, dtype, headline):
        def inputs(device):
            n = shape[0]
            x, out = torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype)
            p, q, A, B, sigma = (torch.rand(n, device=device) + 0.1 for _ in range(5))
            return x, out, p, q, A, B, sigma, torch.arange(n, device=device), torch.tensor(7, device=device)

        return BenchCase(shape, dtype, inputs, 3 * math.prod(shape) * dtype.itemsize,
                         "3 * numel * itemsize (read x, model_out; write x_prev; noise drawn in-kernel)",
                         "sigma > 0, step from a device tensor", headline=headline)

    return [case(shape, dtype, shape == shapes[0][0]) for shape, dtype in shapes]


# Native CPU kernel: 16-35x the reference (benchmarks/bench_native_cpu.py, 2-core AVX2 CPU, digits and mnist UNet
# shapes; the README has the table), so CPU tensors use it automatically where fastdiff._C is built.
@op(reference.sampler_step, native="sampler_step", bench=_bench_cases)
def sampler_step(x, model_out, p, q, A, B, sigma, seeds, step, clip=None, return_x0: bool = False):
    """One denoising step (see `fastdiff.reference.sampler_step`) on the backend chosen for x.

    x, model_out: [N, C, H, W] (NCHW or channels_last); p, q, A, B, sigma: [N] (expanded views are fine);
    seeds: [N] int64; step: an int or a 0-d int64 tensor on x's device (read in the kernel: no host sync, no
    recompile). Returns x_prev, or (x_prev, x0) with return_x0, in x's dtype. The body is the Triton path.
    """
    if x.dim() != 4:  # the kernel sees [N, C, H, W]; any other rank runs as [N, 1, 1, numel/N]
        shape = x.shape
        out = sampler_step(x.reshape(shape[0], 1, 1, -1), model_out.reshape(shape[0], 1, 1, -1), p, q, A, B,
                           sigma, seeds, step, clip, return_x0)
        return tuple(t.reshape(shape) for t in out) if return_x0 else out.reshape(shape)
    if isinstance(step, torch.Tensor):
        step_tensor, step_int = step.reshape(()), 0
    else:
        step_tensor, step_int = None, int(step)
    clip = float(clip) if clip is not None else None
    x_prev, x0 = torch.ops.fastdiff.sampler_step(x, model_out, p, q, A, B, sigma, seeds, step_tensor, step_int, clip,
                                                 return_x0)
    return (x_prev, x0) if return_x0 else x_prev
