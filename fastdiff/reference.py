"""Plain-PyTorch ground truth for every fused op (never imports triton).

Tests and benchmarks import these functions; the Triton kernels in `fastdiff.ops` and the native kernels in
`kernels/` must agree with them. All three ops keep one signature across the three implementations.

Noise. `sampler_step` draws its Gaussian noise from a counter-based generator, so that no noise tensor is
stored and a sample's noise is a pure function of (its seed, the step, the element index). The generator
is Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011):

    key     = (seed & 0xffffffff, seed >> 32)
    counter = (element // 4, step, stream, 0)

and its four 32-bit outputs become four normals by two Box-Muller transforms, written to elements
4g, 4g+1, 4g+2, 4g+3 of the sample (element indices are logical NCHW indices within one sample, so the
memory format does not change the noise). Uniforms are u = (r >> 9 + 0.5) * 2**-23, exact in float32 and
never 0 or 1. Stream 0 is the per-step noise of `sampler_step`; stream 1 is the initial noise x_T.
This is the torch definition; the same generator is `fastdiff.ops._triton.philox_normal4` in Triton (on Triton's
`tl.philox`) and kernels/philox.h in C++/CUDA, and the tests compare both with this one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF

STREAM_STEP = 0
STREAM_INIT = 1


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    # a < 2**32 and m < 2**32 held in int64: the product wraps modulo 2**64, which keeps every bit we need.
    prod = a * m
    return (prod >> 32) & MASK32, prod & MASK32


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 on int64 tensors holding uint32 values; returns the four output words."""
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def _uniform(r: torch.Tensor) -> torch.Tensor:
    return ((r >> 9).to(torch.float32) + 0.5) * (2.0**-23)


def philox_normal(seeds: torch.Tensor, step, numel: int, stream: int = STREAM_STEP) -> torch.Tensor:
    """Standard normals of shape [len(seeds), numel] from (seed, step, element index, stream).

    `step` is an int or a 0-d integer tensor (a device tensor keeps the call free of host syncs).
    """
    device = seeds.device
    seeds = seeds.to(torch.int64).view(-1, 1)
    k0 = seeds & MASK32
    k1 = (seeds >> 32) & MASK32
    groups = (numel + 3) // 4
    c0 = torch.arange(groups, device=device, dtype=torch.int64).view(1, -1)
    if isinstance(step, torch.Tensor):
        c1 = (step.to(device=device, dtype=torch.int64) & MASK32).view(1, 1)
    else:  # torch.full, not torch.tensor: a fill kernel instead of a host-to-device copy
        c1 = torch.full((1, 1), int(step) & MASK32, device=device, dtype=torch.int64)
    zeros = torch.zeros((1, 1), device=device, dtype=torch.int64)
    c2 = torch.full((1, 1), stream & MASK32, device=device, dtype=torch.int64)
    shape = (seeds.shape[0], groups)
    r0, r1, r2, r3 = philox4x32(c0.expand(shape), c1.expand(shape), c2.expand(shape), zeros.expand(shape), k0, k1)
    rad01 = torch.sqrt(-2.0 * torch.log(_uniform(r0)))
    th01 = (2.0 * math.pi) * _uniform(r1)
    rad23 = torch.sqrt(-2.0 * torch.log(_uniform(r2)))
    th23 = (2.0 * math.pi) * _uniform(r3)
    z = torch.stack(
        [rad01 * torch.cos(th01), rad01 * torch.sin(th01), rad23 * torch.cos(th23), rad23 * torch.sin(th23)], -1
    )
    return z.reshape(seeds.shape[0], groups * 4)[:, :numel]


def seeded_randn(seeds: torch.Tensor, shape: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
    """Initial noise x_T: one sample of `shape` per seed, from stream 1 of the same generator."""
    numel = math.prod(shape)
    return philox_normal(seeds, 0, numel, stream=STREAM_INIT).view(len(seeds), *shape).to(dtype)


def sampler_step(x, model_out, p, q, A, B, sigma, seeds, step, clip: float | None = None, return_x0: bool = False):
    """One denoising step in the common form of DDPM, DDIM(eta) and the few-step student sampler.

    x0 = p*x + q*model_out  (clamped to [-clip, clip] when clip is given)
    x_prev = A*x0 + B*x + sigma*z,   z = philox_normal(seeds, step, ...)

    p, q, A, B, sigma are per-sample vectors of shape [batch]. Arithmetic is in float32; the outputs have
    x's dtype. Returns x_prev, or (x_prev, x0) when return_x0.
    """
    bshape = (-1,) + (1,) * (x.dim() - 1)
    xf = x.float()
    x0 = p.float().view(bshape) * xf + q.float().view(bshape) * model_out.float()
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    z = philox_normal(seeds, step, math.prod(x.shape[1:]), STREAM_STEP).view(x.shape)
    x_prev = A.float().view(bshape) * x0 + B.float().view(bshape) * xf + sigma.float().view(bshape) * z
    x_prev = x_prev.to(x.dtype)
    if return_x0:
        return x_prev, x0.to(x.dtype)
    return x_prev


def sampler_step_grads(saved, needs, step, clip, grad_prev, grad_x0):
    """The gradients of `sampler_step` for (x, model_out, p, q, A, B, sigma), by autograd through this reference,
    recomputed: what a fused kernel's backward returns (it keeps no graph; backward is rare, e.g. a loss through a
    sampling step). saved: those seven and seeds; needs: which of the seven want a gradient (None for the rest);
    grad_x0: None where the caller's step returned no x0."""
    diff = [t.detach().requires_grad_(need) for t, need in zip(saved[:7], needs)]
    with torch.enable_grad():
        outs = sampler_step(*diff, saved[7], step, clip, True)
        wanted = [t for t in diff if t.requires_grad]
        # x0 depends on x, model_out, p and q only: with none of them wanted it has no graph to go back through
        pairs = [(o, g) for o, g in zip(outs, (grad_prev, grad_x0)) if o.requires_grad and g is not None]
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
    return [next(grads) if t.requires_grad else None for t in diff]


def group_norm_silu(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5, upcast: bool = False):
    """silu(group_norm(x)). With upcast, computed in float32 and returned in float32 (the truth for tests)."""
    if upcast:
        x = x.float()
        weight = weight.float() if weight is not None else None
        bias = bias.float() if bias is not None else None
    return F.silu(F.group_norm(x, num_groups, weight, bias, eps))


def timestep_embedding(t, dim: int, max_period: float = 10000.0, freq_shift: float = 0.0):
    """Sinusoidal features [cos(t*f), sin(t*f)], f_i = exp(-ln(max_period) * i / (half - freq_shift)), half = dim // 2.

    t has shape [B] (float or integer); an odd dim gets a zero last column. Returns float32 [B, dim].
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32)
                      / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb
