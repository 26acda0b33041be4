"""Modules built on the fused ops. Models use these, so switching the ops backend (`fastdiff.ops.use_backend`)
switches every model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff import ops


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over the last two dims ([..., tokens, d]), as F.scaled_dot_product_attention.

    On CPU tensors: two float32 matmuls around a float32 softmax, the result in v's dtype. torch's fused CPU
    kernel ran forward+backward 2.64x slower than that in channels_last bf16 at mnist5k's 49 tokens, and level
    or slower elsewhere (0.93-1.37x), with an error against float64 no smaller (benchmarks/attention_cpu.py;
    README, "CPU defaults"). Other devices keep the fused kernel, given a last dimension of stride 1, which the
    fused kernels (flash, memory-efficient) need: the heads of an NCHW UNet (`unet.split_heads`) have stride h*w
    there, and would fall back to the unfused math kernel.
    """
    if q.device.type != "cpu":
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v)
    with torch.autocast("cpu", enabled=False):  # float32 throughout, as the fused kernel accumulates
        qf, kf, vf = q.float(), k.float(), v.float()
        scores = (qf * q.shape[-1] ** -0.5) @ kf.transpose(-1, -2)
        return (scores.softmax(-1) @ vf).to(v.dtype)


class GroupNormSiLU(nn.Module):
    """silu(GroupNorm(x)) through `fastdiff.ops.group_norm_silu`; same parameters as nn.GroupNorm."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"num_channels={num_channels} is not divisible by num_groups={num_groups}")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_channels)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}"


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of t, then Linear -> SiLU -> Linear (as in DDPM and guided-diffusion)."""

    def __init__(self, dim: int, hidden_dim: int, max_period: float = 10000.0, *, flip_sin_to_cos: bool = True,
                 freq_shift: float = 0.0):
        super().__init__()
        self.dim = dim
        self.max_period = max_period
        self.flip_sin_to_cos = flip_sin_to_cos  # False: [sin, cos] (diffusers' option of that name)
        self.freq_shift = freq_shift
        self.linear_1 = nn.Linear(dim, hidden_dim)
        self.linear_2 = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = ops.timestep_embedding(t, self.dim, self.max_period, self.freq_shift)
        if not self.flip_sin_to_cos:
            half = self.dim // 2
            emb = torch.cat([emb[:, half : 2 * half], emb[:, :half], emb[:, 2 * half :]], dim=1)
        emb = emb.to(self.linear_1.weight.dtype)
        return self.linear_2(nn.functional.silu(self.linear_1(emb)))
