"""The UNet denoiser of DDPM (Ho et al. 2020), with optional class conditioning for classifier-free guidance.

The structure follows the paper's CIFAR-10 network: per level `num_res_blocks` residual blocks (GroupNorm+SiLU,
3x3 conv, timestep projection, GroupNorm+SiLU, dropout, 3x3 conv) with self-attention at `attn_resolutions`,
a strided-conv downsample between levels, a middle of res-attn-res, and a mirrored up path that concatenates
the skip activations and has one extra residual block per level. With the `cifar10-ddpm` preset it has the
paper's 35.7M parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.config import UNetConfig
from fastdiff.errors import ConfigError
from fastdiff.nn import GroupNormSiLU, TimestepEmbedding, attention


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, groups: int, eps: float = 1e-5):
        super().__init__()
        self.norm1 = GroupNormSiLU(groups, in_ch, eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = GroupNormSiLU(groups, out_ch, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(self.norm2(h)))
        return self.skip(x) + h


def split_heads(qkv: torch.Tensor, num_heads: int) -> list[torch.Tensor]:
    """q, k, v [b, heads, h*w, c/heads]: views of the qkv convolution's output [b, 3c, h, w]."""
    b, c3, h, w = qkv.shape
    c = c3 // 3
    t = qkv.reshape(b, 3, num_heads, c // num_heads, h * w)
    return [t[:, i].transpose(-1, -2) for i in range(3)]


class AttnBlock(nn.Module):
    def __init__(self, ch: int, groups: int, num_heads: int, eps: float = 1e-5):
        super().__init__()
        if ch % num_heads:
            raise ValueError(f"channels {ch} not divisible by num_heads={num_heads}")
        self.norm = nn.GroupNorm(groups, ch, eps)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        out = attention(*split_heads(self.qkv(self.norm(x)), self.num_heads))
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """A stride-2 3x3 conv; padding 0 pads a row and a column at the bottom/right first (diffusers: padding 0)."""

    def __init__(self, ch: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x):
        return self.conv(x if self.padding else F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """model(x, t, labels) -> output of the same shape as x (eps, v or x0, as the training chose)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        ch, groups, eps = cfg.base_channels, cfg.num_groups, cfg.norm_eps
        temb_ch = 4 * ch
        self.time_embed = TimestepEmbedding(ch, temb_ch, flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
        rows = cfg.num_classes + cfg.null_class  # the null label's row last
        self.class_embed = nn.Embedding(rows, temb_ch) if cfg.num_classes > 0 else None
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skip_chs = [ch]
        cur, res = ch, cfg.image_size
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                blocks = [ResBlock(cur, ch * mult, temb_ch, cfg.dropout, groups, eps)]
                cur = ch * mult
                if res in cfg.attn_resolutions:
                    blocks.append(AttnBlock(cur, groups, cfg.num_heads, eps))
                self.down.append(nn.ModuleList(blocks))
                skip_chs.append(cur)
            if level != len(cfg.channel_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(cur, cfg.downsample_padding)]))
                skip_chs.append(cur)
                res //= 2

        self.mid = nn.ModuleList(
            [
                ResBlock(cur, cur, temb_ch, cfg.dropout, groups, eps),
                AttnBlock(cur, groups, cfg.num_heads, eps),
                ResBlock(cur, cur, temb_ch, cfg.dropout, groups, eps),
            ]
        )

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                blocks = [ResBlock(cur + skip_chs.pop(), ch * mult, temb_ch, cfg.dropout, groups, eps)]
                cur = ch * mult
                if res in cfg.attn_resolutions:
                    blocks.append(AttnBlock(cur, groups, cfg.num_heads, eps))
                self.up.append(nn.ModuleList(blocks))
            if level != 0:
                self.up.append(nn.ModuleList([Upsample(cur)]))
                res *= 2

        self.norm_out = GroupNormSiLU(groups, cur, eps)
        self.conv_out = nn.Conv2d(cur, cfg.in_channels, 3, padding=1)

    @property
    def null_label(self) -> int | None:
        """The label of the unconditional class (None: an unconditional model, or one without a null class)."""
        return self.config.num_classes if self.config.num_classes > 0 and self.config.null_class else None

    def _run(self, blocks: nn.ModuleList, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            h = block(h, temb) if isinstance(block, ResBlock) else block(h)
        return h

    def check_input(self, x: torch.Tensor) -> None:
        cfg = self.config
        unit = 2 ** (len(cfg.channel_mult) - 1)
        if x.dim() != 4 or x.shape[1] != cfg.in_channels or x.shape[2] % unit or x.shape[3] % unit:
            raise ConfigError(
                f"the UNet takes images [batch, {cfg.in_channels}, H, W] with H and W multiples of {unit} "
                f"(trained at {cfg.image_size}x{cfg.image_size}); got shape {list(x.shape)}"
            )

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        temb = self.time_embed(t)
        if self.class_embed is not None:
            if labels is None:
                if self.null_label is None:
                    raise ConfigError(f"this model is class-conditional ({self.config.num_classes} classes) without a "
                                      "null class: pass labels")
                labels = torch.full((x.shape[0],), self.null_label, device=x.device, dtype=torch.long)
            temb = temb + self.class_embed(labels)
        h = self.conv_in(x)
        hs = [h]
        for blocks in self.down:
            h = self._run(blocks, h, temb)
            hs.append(h)
        h = self._run(self.mid, h, temb)
        for blocks in self.up:
            if isinstance(blocks[0], ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(blocks, h, temb)
        return self.conv_out(self.norm_out(h))
