"""Learning-rate schedules as pure functions of the step: lr(step) depends on the run's config and the step only.

The training loop sets each optimizer group's lr to lr(step) before step `step`, so a resumed run uses the
uninterrupted run's learning rates, and a run resumed with a new --lr or --warmup uses the new schedule from the
resumed step on, exactly as if it had been configured so from the start (the optimizer's moments are kept).
"""

from __future__ import annotations

import math
from typing import Callable

LRSchedule = Callable[[int], float]


def warmup_lambda(warmup_steps: int) -> Callable[[int], float]:
    """The factor of linear warm-up: (step + 1) / warmup_steps, then 1 (also a torch LambdaLR lambda)."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def warmup_lr(lr: float, warmup_steps: int) -> LRSchedule:
    """lr after a linear warm-up of warmup_steps steps."""
    factor = warmup_lambda(warmup_steps)
    return lambda step: lr * factor(step)


def one_cycle_lr(max_lr: float, total_steps: int, pct_start: float = 0.1, div_factor: float = 25.0,
                 final_div_factor: float = 1e4) -> LRSchedule:
    """Smith's one-cycle shape (torch's OneCycleLR learning rate, cosine both ways): from max_lr / div_factor up
    to max_lr over pct_start of the run, then down to max_lr / div_factor / final_div_factor at its end."""
    initial = max_lr / div_factor
    return _one_cycle(initial, max_lr, initial / final_div_factor, total_steps, pct_start)


def one_cycle_momentum(total_steps: int, pct_start: float = 0.1, base: float = 0.85, top: float = 0.95) -> LRSchedule:
    """The momentum (Adam's beta1) that torch's OneCycleLR cycles against `one_cycle_lr`: from top down to base
    while the learning rate rises, then back up to top."""
    return _one_cycle(top, base, top, total_steps, pct_start)


def _one_cycle(first: float, middle: float, last: float, total_steps: int, pct_start: float) -> LRSchedule:
    """first -> middle over pct_start of the run, then -> last, cosine both ways, as torch's OneCycleLR computes it
    (bit for bit), except where its warm-up is one step (10 steps at pct_start 0.1): torch divides by zero there."""
    peak = float(pct_start * total_steps) - 1

    def cos_anneal(start: float, end: float, pct: float) -> float:
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)

    def at(step: int) -> float:
        if step <= peak:
            return cos_anneal(first, middle, step / peak if peak > 0 else 1.0)
        return cos_anneal(middle, last, min(1.0, (step - peak) / max(total_steps - 1 - peak, 1e-9)))

    return at
