"""Recording a denoising trajectory for the DDPM paper's figure (`fastdiff.images.save_trajectory`)."""

from __future__ import annotations

import torch


class TrajectoryRecorder:
    """A sampler callback keeping x_t and the x0 prediction of the first `rows` samples at ~`cols` steps, from as
    many batches as hold them (`sample(..., callback_rows=recorder.rows)`)."""

    def __init__(self, total_steps: int, rows: int = 4, cols: int = 10):
        self.rows = rows
        self.total_steps = total_steps
        picks = torch.linspace(0, total_steps - 1, min(cols, total_steps)).round().long().tolist()
        self.keep = set(picks)
        self._frames: dict[int, tuple[str, list[torch.Tensor], list[torch.Tensor]]] = {}

    def __call__(self, i, t, x, x0):
        if i not in self.keep:
            return
        label, xs, x0s = self._frames.setdefault(i, (f"step {i + 1}/{self.total_steps}\nt={int(t[0])}", [], []))
        need = self.rows - sum(len(a) for a in xs)
        if need > 0:
            xs.append(x[:need].float().cpu())
            x0s.append(x0[:need].float().cpu())

    @property
    def frames(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """[(column label, x [rows, C, H, W], x0 [rows, C, H, W])] in step order."""
        return [(label, torch.cat(xs), torch.cat(x0s)) for _, (label, xs, x0s) in sorted(self._frames.items())]


__all__ = ["TrajectoryRecorder"]
