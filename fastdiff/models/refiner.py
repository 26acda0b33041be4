"""The refinement network: a small UNet mapping a sampler's final x0 estimate to a cleaner image.

The refiner is residual (x0_hat + correction, the correction's last layer zero-initialised, so it starts as the
identity) and sees neither t nor the label. It is trained by `fastdiff train-refiner` (`fastdiff.train.refiner`);
applying it is optional: `fastdiff sample --refine RUN_DIR`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fastdiff import checkpoint as ckpt
from fastdiff import state_dicts
from fastdiff.config import UNetConfig
from fastdiff.errors import CheckpointError
from fastdiff.models.unet import UNet


class Refiner(nn.Module):
    """refined = x + UNet(x): a residual correction of images in [-1, 1] of the generator's shape."""

    def __init__(self, unet_cfg: UNetConfig):
        super().__init__()
        self.net = UNet(unet_cfg)
        nn.init.zeros_(self.net.conv_out.weight)
        nn.init.zeros_(self.net.conv_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.zeros(x.shape[0], device=x.device)
        return x + self.net(x, t)


def refiner_unet_config(gen_model: UNetConfig, cfg) -> UNetConfig:
    """The refiner's UNet for a generator's images: cfg.base_channels wide, cfg.channel_mult levels, no attention."""
    groups = 8 if cfg.base_channels % 8 == 0 else 4 if cfg.base_channels % 4 == 0 else 1
    return UNetConfig(image_size=gen_model.image_size, in_channels=gen_model.in_channels,
                      base_channels=cfg.base_channels, channel_mult=cfg.channel_mult, num_res_blocks=1,
                      attn_resolutions=(), dropout=0.0, num_groups=groups, num_classes=0)


def refiner_config(run_dir) -> tuple[Path, UNetConfig, dict]:
    """(checkpoint folder, network config, the run's refiner settings: its generator and generator_weights) of a
    `fastdiff train-refiner` run directory, read and checked without loading its weights (`resolve_settings`
    checks a refiner before any sampling)."""
    path = ckpt.resolve_checkpoint(run_dir)
    config = ckpt.load_json(path, "config")
    if config.get("kind") != "refiner":
        raise CheckpointError(f"{run_dir} is not a refiner run; train one with `fastdiff train-refiner`")
    settings = config.get("refiner") if isinstance(config.get("refiner"), dict) else {}
    try:
        return path, UNetConfig(**config["model"]), settings
    except (TypeError, KeyError) as e:
        raise CheckpointError(f"{path}/config.json is not a refiner config ({e})") from None


def load_refiner(run_dir, device="cpu") -> Refiner:
    """The refiner of a `fastdiff train-refiner` run directory, in eval mode without gradients."""
    path, cfg, _ = refiner_config(run_dir)
    model = Refiner(cfg)
    state_dicts.load_model_weights(model, ckpt.load_tensors(path, "model"), path)
    return model.to(device).eval().requires_grad_(False)
