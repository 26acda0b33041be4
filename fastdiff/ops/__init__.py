"""Fused ops, one file each. `fastdiff.ops.<op>` picks the backend per call (see `fastdiff.ops.dispatch`)."""

from fastdiff.ops.group_norm_silu import group_norm_silu
from fastdiff.ops.sampler_step import sampler_step
from fastdiff.ops.timestep_embedding import timestep_embedding

__all__ = ["group_norm_silu", "sampler_step", "timestep_embedding"]
