"""The small CNN that `fastdiff eval` trains on a dataset: its penultimate features define FD_cls, and its
predictions define class-conditional accuracy. Deterministic given the seed; cached as safetensors."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm


@dataclass
class ClassifierConfig:
    in_channels: int = 1
    num_classes: int = 10
    width: int = 32
    feature_dim: int = 64


class Classifier(nn.Module):
    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        w, f = cfg.width, cfg.feature_dim

        def block(cin, cout, stride=1):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.SiLU())

        self.body = nn.Sequential(block(cfg.in_channels, w), block(w, w), block(w, 2 * w, 2), block(2 * w, 2 * w),
                                  block(2 * w, f, 2))
        self.head = nn.Linear(f, cfg.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def config_dict(self) -> dict:
        return asdict(self.cfg)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translations of up to 1/8 of the image (reflect-padded), so features are not pixel-exact."""
    b, _, h, w = x.shape
    pad = max(1, h // 8)
    xp = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (dy.view(b, 1) + torch.arange(h).view(1, h)).to(x.device)
    cols = (dx.view(b, 1) + torch.arange(w).view(1, w)).to(x.device)
    idx_b = torch.arange(b, device=x.device).view(b, 1, 1)
    return xp.permute(0, 2, 3, 1)[idx_b, rows.view(b, h, 1), cols.view(b, 1, w)].permute(0, 3, 1, 2)


def fit_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, steps: int, batch_size: int,
                   lr: float, seed: int, log=None, name: str = "classifier", progress: bool = False) -> nn.Module:
    """Train `model` (already on its device) to classify images in [-1, 1], [N, C, H, W]: AdamW with a one-cycle
    schedule, random translations, label smoothing 0.1, batches drawn from a generator seeded by `seed`. Returns
    it in eval mode. Shared by the evaluation classifier and the ADD discriminator's ViT backbone. progress: a
    tqdm bar of its steps, with ETA, on stderr (it trains for minutes on a CPU; a `log` that writes to stderr
    then writes through `tqdm.write`)."""
    from fastdiff.train.lr import one_cycle_lr, one_cycle_momentum  # (fastdiff.train imports the models)

    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    lr_at, beta1_at = one_cycle_lr(lr, steps), one_cycle_momentum(steps)  # torch's OneCycleLR failed at 10 steps
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with tqdm(total=steps, desc=name, unit="step", disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
        for step in range(steps):
            idx = torch.randint(0, len(images), (batch_size,), generator=gen)
            x = _augment(images[idx].to(device), gen)
            loss = F.cross_entropy(model(x), labels[idx].to(device), label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for group in opt.param_groups:
                group["lr"], group["betas"] = lr_at(step), (beta1_at(step), group["betas"][1])
            opt.step()
            bar.update()
            if log and (step + 1) % 500 == 0:
                log(f"{name} step {step + 1}/{steps} loss {loss.item():.3f}")
    return model.eval()


def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int, *, steps: int = 1500,
                     batch_size: int = 128, lr: float = 2e-3, seed: int = 0, device="cpu", log=None,
                     progress: bool = False) -> Classifier:
    """images: float in [-1, 1], [N, C, H, W]."""
    torch.manual_seed(seed)
    model = Classifier(ClassifierConfig(images.shape[1], num_classes)).to(device)
    return fit_classifier(model, images, labels, steps=steps, batch_size=batch_size, lr=lr, seed=seed, log=log,
                          progress=progress)
