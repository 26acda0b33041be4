"""One fused denoising step: x0 = p*x + q*out (clamped), x_prev = A*x0 + B*x + sigma*z, z from in-kernel Philox."""

from __future__ import annotations

from fastdiff import reference
from fastdiff.ops.dispatch import backend_for

SUPPORTED = ("torch",)


def sampler_step(x, model_out, p, q, A, B, sigma, seeds, step, clip=None, return_x0: bool = False):
    """See `fastdiff.reference.sampler_step`; `step` is an int or a 0-d integer tensor."""
    backend_for(x, SUPPORTED)
    return reference.sampler_step(x, model_out, p, q, A, B, sigma, seeds, step, clip, return_x0)
