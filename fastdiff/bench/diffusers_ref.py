"""The `diffusers` provider: its UNet2DModel at our UNet's configuration, driven by its DDPM/DDIM schedulers.

Only imported when diffusers is installed. The network is built from the same UNetConfig (channels per level,
residual blocks, attention resolutions, heads, groups, dropout, class embeddings); the sampling loop is the one
diffusers documents (scheduler.set_timesteps, then unet + scheduler.step per timestep), with classifier-free
guidance by batching the conditional and unconditional halves as our sampler does.
"""

from __future__ import annotations

import torch

from fastdiff.models.unet import UNetConfig


def available() -> bool:
    try:
        import diffusers  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means the provider is unavailable
        return False
    return True


def unet(cfg: UNetConfig) -> torch.nn.Module:
    """diffusers.UNet2DModel with the layout of fastdiff's UNet for `cfg` (fastdiff.interop's config mapping)."""
    from diffusers import UNet2DModel

    from fastdiff.interop.diffusers import unet2d_config

    return UNet2DModel(**{k: v for k, v in unet2d_config(cfg).items() if not k.startswith("_")})


def as_denoiser(model: torch.nn.Module):
    """model(x, t, labels) -> output, the calling convention of fastdiff's samplers and losses."""

    def forward(x, t, labels=None):
        return model(x, t, class_labels=labels).sample

    return forward


def scheduler(sampler: str, diffusion_cfg, spacing: str = "trailing", clip: float | None = 1.0):
    """DDPMScheduler (fixed-small variance) or DDIMScheduler (eta = 0) for our diffusion config."""
    from diffusers import DDIMScheduler, DDPMScheduler

    common = dict(num_train_timesteps=diffusion_cfg.num_timesteps, beta_start=diffusion_cfg.beta_start,
                  beta_end=diffusion_cfg.beta_end, beta_schedule="linear", prediction_type="epsilon",
                  clip_sample=clip is not None, clip_sample_range=clip or 1.0, timestep_spacing=spacing)
    if sampler == "ddim":
        return DDIMScheduler(set_alpha_to_one=True, **common)
    return DDPMScheduler(variance_type="fixed_small", **common)


@torch.no_grad()
def sample(model, sched, x, *, steps: int, timed_steps: int, labels=None, guidance: float = 1.0,
           null_label: int | None = None, generator=None) -> torch.Tensor:
    """The first `timed_steps` of a `steps`-step diffusers sampling loop from x_T."""
    sched.set_timesteps(steps)
    for t in sched.timesteps[:timed_steps]:
        if labels is not None and guidance != 1.0:
            null = torch.full_like(labels, null_label)
            out = model(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample
            cond, uncond = out.chunk(2)
            out = uncond + guidance * (cond - uncond)
        else:
            out = model(x, t, class_labels=labels).sample
        x = sched.step(out, t, x, generator=generator).prev_sample
    return x
