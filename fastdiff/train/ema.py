"""Exponential moving average of a network's weights (the weights that sampling uses by default)."""

from __future__ import annotations

import copy
import math

import torch


def warmed_decay(decay: float, step: int) -> float:
    """The decay of the update after optimizer step `step` (0-based): the usual warm-up (diffusers' `EMAModel`
    without `use_ema_warmup`), d = min(decay, (1+n)/(10+n)), so that early weights are not averaged in for long."""
    return min(decay, (1 + step) / (10 + step))


def describe(decay: float, steps: int) -> str:
    """`decay` for a training log line, with what the warm-up makes of it in a run of `steps` steps: a decay of 0.999
    is only reached at step 8991 (counting from 1, as the log does), and in a shorter run the warm-up alone sets the
    EMA (any decay above the last step's warm-up gives the same weights)."""
    n = max(0, math.ceil((10 * decay - 1) / (1 - decay)))  # the first n with (1+n)/(10+n) >= decay,
    if n > 0 and n / (9 + n) >= decay:  # after the quotient's rounding
        n -= 1
    if n < steps:
        return f"{decay:g}" + (f" (from step {n + 1})" if n > 0 else "")
    return (f"{decay:g} (not reached: the warm-up (1+n)/(10+n) sets it, {warmed_decay(decay, steps - 1):.4f} at the "
            f"last step; {decay:g} comes at step {n + 1})")


class EMA:
    """Exponential moving average of a model's weights, with the warm-up of `warmed_decay`."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = warmed_decay(self.decay, step)
        ema_p = [p for p in self.model.parameters()]
        src_p = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)
