"""Fused ops, one file each; every op file registers itself (`fastdiff.ops.dispatch.op`) and is imported here.

`fastdiff.ops.<op>` picks its backend per call: automatically from the tensor's device, or the one forced with
`use_backend("torch" | "triton" | "native")` (default: FASTDIFF_BACKEND, read once at import). See `dispatch`.
"""

from fastdiff.ops.dispatch import current_backend, use_backend
from fastdiff.ops.group_norm_silu import group_norm_silu
from fastdiff.ops.sampler_step import sampler_step
from fastdiff.ops.timestep_embedding import timestep_embedding

__all__ = ["current_backend", "group_norm_silu", "sampler_step", "timestep_embedding", "use_backend"]
