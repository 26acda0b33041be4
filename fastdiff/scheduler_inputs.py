"""What the diffusers-compatible schedulers (`fastdiff.schedulers`) take from their callers, checked: one
timestep of a step, the timesteps of a batch (add_noise, get_velocity), and noise drawn as diffusers draws it."""

from __future__ import annotations

import torch

from fastdiff.errors import ConfigError


def one_timestep(timestep, T: int) -> int:
    """One whole timestep in [0, T): 2.7 was truncated to 2, -5 stepped to NaN, 1000 was an IndexError."""
    try:
        value = float(timestep.item() if isinstance(timestep, torch.Tensor) else timestep)
    except (TypeError, ValueError, RuntimeError):  # a string, a tensor of several timesteps
        raise ConfigError(f"the timestep must be one number, got {timestep!r}") from None
    if not value.is_integer() or not 0 <= value < T:
        raise ConfigError(f"timestep {value:g} is not a whole timestep in 0..{T - 1}")
    return int(value)


def batch_timesteps(timesteps, n: int, T: int) -> torch.Tensor:
    """add_noise's and get_velocity's timesteps as int64 [n] (one, or one per sample), each in [0, T): -1 took the
    noisiest timestep, 1000 and float timesteps were torch errors. A CUDA tensor's values are not read (that would
    wait for the GPU at every training step); its device checks the range as it indexes."""
    t = timesteps if isinstance(timesteps, torch.Tensor) else torch.as_tensor(timesteps)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ConfigError(f"timesteps must be integers (torch.long), got {t.dtype}")
    t = t.flatten().long()
    if t.numel() not in (1, n):
        raise ConfigError(f"{t.numel()} timesteps for a batch of {n}; pass one per sample, or one")
    if t.device.type == "cpu" and t.numel() and not (0 <= int(t.min()) and int(t.max()) < T):
        raise ConfigError(f"timesteps {t.tolist()[:8]} are not all whole timesteps in 0..{T - 1}")
    return t.expand(n)


def diffusers_noise(like: torch.Tensor, generator) -> torch.Tensor:
    """Noise as diffusers' randn_tensor draws it: on a CPU generator's device then moved; one draw per generator
    for a list of generators (one per sample)."""
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list):
        if len(generator) != like.shape[0]:
            raise ConfigError(f"{len(generator)} generators for a batch of {like.shape[0]}; pass one per sample")
        draws = [diffusers_noise(like[i : i + 1], g) for i, g in enumerate(generator)]
        return torch.cat(draws).to(like.device)
    device = generator.device if generator is not None and generator.device.type == "cpu" else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)
