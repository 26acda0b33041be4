"""Modules built on the fused ops. Models use these, so switching the ops backend (`fastdiff.ops.use_backend`)
switches every model."""

from __future__ import annotations

import torch
from torch import nn

from fastdiff import ops


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

    def __init__(self, dim: int, hidden_dim: int, max_period: float = 10000.0):
        super().__init__()
        self.dim = dim
        self.max_period = max_period
        self.linear_1 = nn.Linear(dim, hidden_dim)
        self.linear_2 = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = ops.timestep_embedding(t, self.dim, self.max_period).to(self.linear_1.weight.dtype)
        return self.linear_2(nn.functional.silu(self.linear_1(emb)))
