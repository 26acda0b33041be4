"""The ADD discriminator: small trainable heads on the features of a (usually frozen) ViT backbone.

As in ADD (Sauer et al. 2023) and StyleGAN-T, each head reads the patch tokens of one backbone block and gives
one logit per token; class conditioning is by projection (Miyato & Koyama 2018): the logit adds
<embed(label), features> / sqrt(width) to the unconditional output. Inputs are augmented with differentiable
DiffAugment (Zhao et al. 2020) ops before the backbone, for real and generated images alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from fastdiff.errors import ConfigError
from fastdiff.models.vit import ViT, even_taps

HEAD_KINDS = ("conv", "mlp")
AUGMENTS = ("translation", "cutout", "brightness", "contrast")


def minibatch_std(tokens: torch.Tensor, group: int, labels: torch.Tensor | None = None,
                  num_classes: int = 0) -> torch.Tensor:
    """Append one channel (Karras et al. 2018, sec. 3): the standard deviation of every token feature over a set
    of samples, averaged over the features, so that D can see a lack of variety.

    The set is the samples of the batch with the same label (class-conditional D), or else groups of `group`
    samples. Real and generated images go through D in separate batches, so their sets never mix. With labels,
    `num_classes` (> every label) sizes the one-hot without reading the labels on the host.
    """
    b, n, d = tokens.shape
    # float32 statistics: under autocast the matmuls below would run in bf16 / fp16 (and an fp16 sum of squares
    # overflows at 65504), whatever the inputs' dtype
    with torch.autocast(tokens.device.type, enabled=False):
        x = tokens.float()
        if labels is not None:
            onehot = F.one_hot(labels, num_classes).float()  # [b, classes]
            count = onehot.sum(0).clamp(min=1)
            mean = (onehot.T @ x.flatten(1)) / count[:, None]  # per-class means [classes, n*d]
            dev = x.flatten(1) - mean[labels]  # centred, so that a large mean costs no precision
            var = (onehot.T @ dev.pow(2)) / count[:, None]
            std = (var + 1e-8).sqrt().view(-1, n, d).mean(-1)[labels]  # [b, n]
        else:
            g = math.gcd(b, group)
            std = x.view(g, b // g, n, d).var(dim=0, unbiased=False).add(1e-8).sqrt().mean(-1).repeat(g, 1)
    return torch.cat([tokens, std.unsqueeze(-1).to(tokens.dtype)], dim=-1)


class DiscHead(nn.Module):
    """Tokens [b, n, dim] on a grid x grid layout -> per-token logits [b, n].

    conv: 1x1 conv, LeakyReLU, 3x3 conv, LeakyReLU over the token grid; mlp: the same with two linear layers.
    mbstd_group > 0 appends the minibatch standard deviation over groups of that many samples as a channel.
    """

    def __init__(self, dim: int, grid: int, num_classes: int, *, kind: str = "conv", width: int = 64,
                 use_spectral_norm: bool = True, mbstd_group: int = 0):
        super().__init__()
        if kind not in HEAD_KINDS:
            raise ConfigError(f"unknown discriminator head {kind!r}; use one of {', '.join(HEAD_KINDS)}")
        sn = spectral_norm if use_spectral_norm else (lambda m: m)
        self.kind, self.grid, self.width, self.mbstd_group = kind, grid, width, mbstd_group
        cin = dim + (1 if mbstd_group > 0 else 0)
        if kind == "conv":
            self.body = nn.Sequential(sn(nn.Conv2d(cin, width, 1)), nn.LeakyReLU(0.2),
                                      sn(nn.Conv2d(width, width, 3, padding=1)), nn.LeakyReLU(0.2))
        else:
            self.body = nn.Sequential(sn(nn.Linear(cin, width)), nn.LeakyReLU(0.2), sn(nn.Linear(width, width)),
                                      nn.LeakyReLU(0.2))
        self.out = sn(nn.Linear(width, 1))
        self.embed = nn.Embedding(num_classes, width) if num_classes > 0 else None

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if self.mbstd_group > 0:
            tokens = minibatch_std(tokens, self.mbstd_group, labels if self.embed is not None else None,
                                   self.embed.num_embeddings if self.embed is not None else 0)
        b, n, d = tokens.shape
        if self.kind == "conv":
            h = tokens.transpose(1, 2).reshape(b, d, self.grid, self.grid)
            h = self.body(h).flatten(2).transpose(1, 2)  # [b, n, width]
        else:
            h = self.body(tokens)
        logits = self.out(h).squeeze(-1)
        if self.embed is not None:
            if labels is None:
                raise ConfigError("a class-conditional discriminator needs the labels of its images")
            logits = logits + (h * self.embed(labels)[:, None, :]).sum(-1) / math.sqrt(self.width)
        return logits


class Discriminator(nn.Module):
    """Heads on `num_heads` evenly spaced blocks of `backbone`. The backbone is frozen unless train_backbone."""

    def __init__(self, backbone: ViT, num_classes: int, *, num_heads: int = 2, head_kind: str = "conv",
                 width: int = 64, use_spectral_norm: bool = True, train_backbone: bool = False,
                 mbstd_group: int = 0):
        super().__init__()
        self.backbone = backbone
        self.taps = even_taps(backbone.cfg.depth, num_heads)
        self.heads = nn.ModuleList(
            DiscHead(backbone.cfg.dim, backbone.cfg.grid, num_classes, kind=head_kind, width=width,
                     use_spectral_norm=use_spectral_norm, mbstd_group=mbstd_group) for _ in self.taps)
        self.train_backbone = train_backbone
        backbone.requires_grad_(train_backbone)

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = list(self.heads.parameters())
        return params + list(self.backbone.parameters()) if self.train_backbone else params

    def set_trainable(self, flag: bool) -> None:
        """Switch gradients of the trainable parameters on (discriminator step) or off (generator step)."""
        for p in self.trainable_parameters():
            p.requires_grad_(flag)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The head inputs: patch tokens of the tapped blocks (gradients reach x through the backbone)."""
        return self.backbone.tokens(x, self.taps)

    def logits(self, features: list[torch.Tensor], labels: torch.Tensor | None) -> list[torch.Tensor]:
        return [head(f, labels) for head, f in zip(self.heads, features)]

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per-token logits of every head: a list of [b, n] tensors."""
        return self.logits(self.features(x), labels)


def parse_augment(spec: str) -> tuple[str, ...]:
    ops = tuple(s.strip() for s in spec.split(",") if s.strip()) if spec else ()
    unknown = [o for o in ops if o not in AUGMENTS]
    if unknown:
        raise ConfigError(f"unknown augmentation(s) {unknown}; use a comma list of {', '.join(AUGMENTS)} or ''")
    return ops


def diff_augment(x: torch.Tensor, ops: tuple[str, ...], gen: torch.Generator) -> torch.Tensor:
    """Differentiable DiffAugment ops with per-sample parameters from `gen`.

    translation: shift by up to 1/8 of the size, the uncovered border black; cutout: blacken one square of half
    the size (black is -1 in [-1, 1]); brightness: add U(-0.25, 0.25); contrast: scale about the image mean by
    U(0.5, 1.5).
    """
    b, _, h, w = x.shape
    dev = x.device
    for op in ops:
        if op == "brightness":
            x = x + (torch.rand(b, 1, 1, 1, device=dev, generator=gen) - 0.5) * 0.5
        elif op == "contrast":
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * (torch.rand(b, 1, 1, 1, device=dev, generator=gen) + 0.5) + mean
        elif op == "translation":
            x = _translate(x, max(1, round(h / 8)), gen)
        elif op == "cutout":
            x = _cutout(x, max(1, h // 2), gen)
    return x


def _translate(x: torch.Tensor, shift: int, gen) -> torch.Tensor:
    b, _, h, w = x.shape
    dy = torch.randint(-shift, shift + 1, (b, 1, 1), device=x.device, generator=gen)
    dx = torch.randint(-shift, shift + 1, (b, 1, 1), device=x.device, generator=gen)
    rows = torch.arange(h, device=x.device).view(1, h, 1) - dy + shift  # index into the padded image
    cols = torch.arange(w, device=x.device).view(1, 1, w) - dx + shift
    xp = F.pad(x, (shift, shift, shift, shift), value=-1.0)
    flat = (rows * (w + 2 * shift) + cols).view(b, 1, h * w).expand(-1, x.shape[1], -1)
    return xp.flatten(2).gather(2, flat).view_as(x)


def _cutout(x: torch.Tensor, size: int, gen) -> torch.Tensor:
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b, 1, 1), device=x.device, generator=gen)
    cx = torch.randint(0, w, (b, 1, 1), device=x.device, generator=gen)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    lo, hi = -(size // 2), size - size // 2  # a size x size square around (cy, cx), clipped at the border
    hole = (ys - cy >= lo) & (ys - cy < hi) & (xs - cx >= lo) & (xs - cx < hi)
    return torch.where(hole[:, None], torch.full_like(x, -1.0), x)
