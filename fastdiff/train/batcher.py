"""The step-addressable data order: the batch of step k is a pure function of (seed, k), so a resumed run draws
the same batches as an uninterrupted one."""

from __future__ import annotations

import torch

from fastdiff.errors import ConfigError
from fastdiff.runtime import mix_seed


class Batcher:
    """Epochs of shuffled indices, addressable by step: batch(step) is the same in any run with this seed."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n == 0:
            raise ConfigError("the training set is empty")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, stream=7))
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def indices(self, step: int) -> torch.Tensor:
        pos = torch.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs, within = pos // self.n, pos % self.n
        out = torch.empty_like(pos)
        for e in epochs.unique().tolist():
            sel = epochs == e
            out[sel] = self._perm(e)[within[sel]]
        return out
