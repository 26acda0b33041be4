"""The `diffusers` provider: diffusers' UNet2DModel for a fastdiff UNet, driven by its DDPM/DDIM schedulers.

diffusers is optional (the `test` extra); it is imported only when a diffusers row runs. The sampling loop is the
one diffusers documents (scheduler.set_timesteps, then unet + scheduler.step per timestep), with fastdiff's
classifier-free guidance (`fastdiff.diffusion.samplers.guided`: the conditional and unconditional halves as one
batch), and the scheduler set to fastdiff's sampler settings: trailing timesteps, final alphas_cumprod 1, clipping
to [-clip, clip] with the noise re-derived from the clipped x0 (`use_clipped_model_output=True`, which is what
fastdiff's clipped DDIM does), fixed-small DDPM variance.
"""

from __future__ import annotations

import torch

from fastdiff.config import UNetConfig
from fastdiff.diffusion.samplers import guided

# What the diffusers model's weights are, as the rows say. `twin` is the one place that makes the model.
WEIGHTS = "the fastdiff UNet's weights, mapped by fastdiff.interop (outputs equal to float32 rounding)"


def available() -> bool:
    try:
        import diffusers  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means the provider is unavailable
        return False
    return True


def twin(model: torch.nn.Module) -> torch.nn.Module:
    """The diffusers UNet2DModel that stands for fastdiff's `model` in the diffusers rows: the same architecture
    and the same weights (fastdiff.interop's mapping, strict)."""
    from fastdiff.interop.diffusers_weights import to_diffusers

    twin = unet(model.config)
    twin.load_state_dict(to_diffusers(model.state_dict(), model.config), strict=True)
    return twin.eval()


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


def scheduler(sampler: str, diffusion_cfg, clip: float | None = 1.0, spacing: str = "trailing"):
    """diffusers' DDPMScheduler (fixed-small variance) or DDIMScheduler for our diffusion config (its schedule,
    prediction and zero terminal SNR, as `fastdiff export` writes them: a v-prediction run was stepped as eps)
    and clipping."""
    import inspect

    from diffusers import DDIMScheduler, DDPMScheduler

    from fastdiff.config import SampleConfig
    from fastdiff.interop.diffusers import scheduler_for

    cls = DDIMScheduler if sampler == "ddim" else DDPMScheduler
    config = scheduler_for(diffusion_cfg, SampleConfig(clip=clip, spacing=spacing)).config
    takes = inspect.signature(cls.__init__).parameters  # DDIM has no variance_type
    kwargs = {k: v for k, v in config.items() if k in takes}
    if sampler == "ddim":
        kwargs["set_alpha_to_one"] = True
    return cls(**kwargs)


@torch.no_grad()
def sample(forward, sched, x, *, steps: int, timed_steps: int | None = None, eta: float = 0.0, labels=None,
           guidance: float = 1.0, null_label: int | None = None, generator=None) -> torch.Tensor:
    """The first `timed_steps` (default all) of a `steps`-step diffusers sampling loop from x_T; `forward` is a
    denoiser model(x, t, labels) (`as_denoiser`). eta is DDIM's."""
    from diffusers import DDIMScheduler

    sched.set_timesteps(steps)
    ddim = isinstance(sched, DDIMScheduler)
    for t in sched.timesteps[:timed_steps]:
        out = guided(forward, x, t.to(x.device).expand(x.shape[0]), labels, guidance, null_label)
        if ddim:
            x = sched.step(out, t, x, eta=eta, use_clipped_model_output=True, generator=generator).prev_sample
        else:
            x = sched.step(out, t, x, generator=generator).prev_sample
    return x
