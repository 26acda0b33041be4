"""Sinusoidal timestep embedding [cos(t*f), sin(t*f)] (guided-diffusion order), f_i = exp(-ln(max_period) i/half).

One launch writes the whole [B, dim] table. The frequencies are computed in the kernel, in float64 and rounded
once to float32, so no frequency tensor is read and f_i is at least as accurate as the reference's (whose float32
exponent (-ln(max_period) * i) / half carries up to ~1e-6 relative error, i.e. ~1e-3 in cos(t*f) at t = 1000).

A fused embedding + Linear + SiLU is deliberately not provided: the op is a few kilobytes ([B, dim] with B the
batch), dominated by launch latency, and the following Linear is a cuBLAS GEMM that a hand-written Triton GEMM
would only match at these sizes; inside the CUDA-graphed step the launch cost disappears as well.
"""

import torch

from fastdiff import reference
from fastdiff.ops._triton import launcher, tl, triton
from fastdiff.ops.dispatch import BenchCase, op


@triton.jit
def _timestep_embedding_kernel(
    t_ptr,  # [B] timesteps, float or integer, stride st
    out_ptr,  # [B, dim] float32, contiguous
    B, half, dim,
    max_period,  # float32 (exact for the usual integer periods)
    denom,  # half - freq_shift, float32
    st,
    ODD: tl.constexpr,  # dim is odd: column dim-1 is zero
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # program_id(0) -> block of rows, program_id(1) -> block of frequencies. Writes B*dim*4 bytes.
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)[:, None]
    i = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[None, :]
    rmask = rows < B
    mask = rmask & (i < half)
    t = tl.load(t_ptr + rows * st, mask=rmask, other=0).to(tl.float32)
    # f_i in float64 (libdevice exp on the GPU, not the approximate float32 exp), rounded once to float32.
    freqs = tl.exp(-tl.log(tl.cast(max_period, tl.float64)) * i.to(tl.float64) / denom).to(tl.float32)
    args = t * freqs
    row_base = out_ptr + rows.to(tl.int64) * dim
    tl.store(row_base + i, tl.cos(args), mask=mask)
    tl.store(row_base + half + i, tl.sin(args), mask=mask)
    if ODD:
        if tl.program_id(1) == 0:
            tl.store(row_base + (dim - 1), tl.full([BLOCK_B, 1], 0.0, tl.float32), mask=rmask)


@launcher
def timestep_embedding_fwd(t: torch.Tensor, dim: int, max_period: float, freq_shift: float = 0.0) -> torch.Tensor:
    """Launch the embedding kernel for t [B]; returns float32 [B, dim]."""
    B = t.shape[0]
    half = dim // 2
    out = torch.empty((B, dim), device=t.device, dtype=torch.float32)
    if B == 0 or dim == 0:
        return out
    if half == 0:  # dim == 1: only the zero pad column
        return out.zero_()
    # 1024 elements per program, 8 per thread: each costs a sin and a cos, and at 32 per thread the kernel took
    # 168-230 registers for sm_90 (two programs per SM; tests/ops/test_kernels_compile.py), at 8 it takes 56.
    block_h = min(triton.next_power_of_2(half), 512)
    block_b = max(1, min(triton.next_power_of_2(B), 1024 // block_h))
    grid = (triton.cdiv(B, block_b), triton.cdiv(half, block_h))
    _timestep_embedding_kernel[grid](
        t, out, B, half, dim, float(max_period), float(half - freq_shift), t.stride(0),
        ODD=dim % 2 == 1, BLOCK_B=block_b, BLOCK_H=block_h, num_warps=4,
    )
    return out


@torch.library.custom_op("fastdiff::timestep_embedding", mutates_args=())
def _timestep_embedding_op(t: torch.Tensor, dim: int, max_period: float, freq_shift: float = 0.0) -> torch.Tensor:
    return timestep_embedding_fwd(t, dim, max_period, freq_shift)


@_timestep_embedding_op.register_fake
def _(t, dim, max_period, freq_shift=0.0):
    return t.new_empty((t.shape[0], dim), dtype=torch.float32)


def _bench_cases(quick: bool) -> list[BenchCase]:
    """A large table and a typical training batch (one small table when quick)."""

    def case(batch, dim):
        def inputs(device):
            return torch.randint(0, 1000, (batch,), device=device), dim

        return BenchCase((batch, dim), torch.float32, inputs, batch * dim * 4 + batch * 8,
                         "batch * dim * 4 + batch * 8 (read t, write the float32 table)")

    return [case(*s) for s in ([(256, 128)] if quick else [(65536, 256), (1024, 128)])]


# No native kernel: under use_backend("native") it runs the reference.
@op(reference.timestep_embedding, bench=_bench_cases)
def timestep_embedding(t, dim: int, max_period: float = 10000.0, freq_shift: float = 0.0):
    """[B] timesteps (float or integer) -> float32 [B, dim]; an odd dim is zero-padded; freq_shift: see reference.
    The body is the Triton path (which runs the reference for a t that is not 1-D)."""
    if t.dim() == 1:
        return torch.ops.fastdiff.timestep_embedding(t, dim, float(max_period), float(freq_shift))
    return reference.timestep_embedding(t, dim, max_period, freq_shift)
