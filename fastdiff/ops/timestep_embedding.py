"""Sinusoidal timestep embedding [cos(t*f), sin(t*f)] (guided-diffusion order)."""

from __future__ import annotations

from fastdiff import reference
from fastdiff.ops.dispatch import backend_for

SUPPORTED = ("torch",)


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """[B] timesteps (float or integer) -> float32 [B, dim]; an odd dim is zero-padded."""
    backend_for(t, SUPPORTED)
    return reference.timestep_embedding(t, dim, max_period)
