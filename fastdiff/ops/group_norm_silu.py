"""Fused GroupNorm + SiLU: silu(group_norm(x, num_groups, weight, bias, eps))."""

from __future__ import annotations

from fastdiff import reference
from fastdiff.ops.dispatch import backend_for

SUPPORTED = ("torch",)


def group_norm_silu(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5):
    """silu(group_norm(x)) for 4-D x (NCHW or channels_last), with gradients for x, weight and bias."""
    backend_for(x, SUPPORTED)
    return reference.group_norm_silu(x, num_groups, weight, bias, eps)
