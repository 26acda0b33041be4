"""Noise schedules: betas and alphas_cumprod, computed in float64 and kept in float32 on the model's device."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fastdiff.config_checks import flag, integer
from fastdiff.errors import ConfigError

SCHEDULES = ("linear", "scaled_linear", "cosine")


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al. 2020: betas linear from 1e-4 to 0.02 at T = 1000 (endpoints scaled by 1000/T for other T)."""
    scale = 1000.0 / num_timesteps
    return torch.linspace(beta_start * scale, beta_end * scale, num_timesteps, dtype=torch.float64)


def scaled_linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Latent-diffusion betas: sqrt(beta) linear between the endpoints (scaled by 1000/T as for `linear_betas`)."""
    scale = 1000.0 / num_timesteps
    return torch.linspace((beta_start * scale) ** 0.5, (beta_end * scale) ** 0.5, num_timesteps,
                          dtype=torch.float64) ** 2


def cosine_alpha_bar(t: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17 before normalisation: f(t) = cos^2((t + s) / (1 + s) * pi / 2), t in [0, 1]."""
    return torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """betas_t = min(1 - alpha_bar((t+1)/T) / alpha_bar(t/T), max_beta) (Nichol & Dhariwal 2021)."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    ab = cosine_alpha_bar(steps, s)
    return (1 - ab[1:] / ab[:-1]).clamp(max=max_beta)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, Algorithm 1: shift and scale sqrt(alphas_cumprod) so the last step has SNR exactly 0."""
    sqrt_ab = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1 - alphas


def timestep_count(num_timesteps) -> int:
    """T as an int of at least 2 (a numpy integer too), else one ConfigError."""
    T = integer("num_timesteps", num_timesteps)
    if T < 2:
        raise ConfigError(f"num_timesteps={num_timesteps!r} must be a whole number of at least 2")
    return T


def named_betas(kind: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02,
                cosine_s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """The betas of a named schedule, checked: T >= 2 timesteps and every beta in (0, 1), so that alphas_cumprod
    stays positive (one ConfigError otherwise). `NoiseSchedule` and the run config's validation both use it."""
    num_timesteps = timestep_count(num_timesteps)
    if kind == "linear":
        betas = linear_betas(num_timesteps, beta_start, beta_end)
    elif kind == "scaled_linear":
        betas = scaled_linear_betas(num_timesteps, beta_start, beta_end)
    elif kind == "cosine":
        betas = cosine_betas(num_timesteps, cosine_s, max_beta)
    else:
        raise ConfigError(f"unknown noise schedule {kind!r}; use one of {', '.join(SCHEDULES)}")
    if (kind != "cosine" and beta_start > beta_end) or not bool(((betas > 0) & (betas < 1)).all()):
        what = (f"beta_start {beta_start} to beta_end {beta_end}" if kind != "cosine"
                else f"cosine_s {cosine_s} and max_beta {max_beta}")
        raise ConfigError(f"the {kind} schedule's {what} over num_timesteps {num_timesteps} gives betas outside "
                          "(0, 1) (linear betas are scaled by 1000 / T); use beta_start <= beta_end and more "
                          "timesteps or smaller betas")
    return betas


class NoiseSchedule:
    """betas, alphas and alphas_cumprod for T discrete timesteps.

    `alphas_cumprod64` (float64, CPU) is the exact table samplers derive their coefficients from; `betas` and
    `alphas_cumprod` (float32, on `device`) are what training and the model-side math read. `betas` given
    explicitly (diffusers' `trained_betas`) replace the named schedule; `kind` is then "trained".
    """

    def __init__(
        self,
        kind: str = "linear",
        num_timesteps: int = 1000,
        *,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        cosine_s: float = 0.008,
        max_beta: float = 0.999,
        zero_terminal_snr: bool = False,
        betas=None,
        device: torch.device | str = "cpu",
    ):
        num_timesteps = timestep_count(num_timesteps)
        if betas is not None:
            betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
            if len(betas) != num_timesteps or not bool(((betas > 0) & (betas < 1)).all()):
                raise ConfigError(f"explicit betas must be {num_timesteps} values in (0, 1), got {len(betas)} values")
            kind = "trained"
        else:
            betas = named_betas(kind, num_timesteps, beta_start, beta_end, cosine_s, max_beta)
        zero_terminal_snr = flag("zero_terminal_snr", zero_terminal_snr)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.kind = kind
        self.num_timesteps = num_timesteps
        self.zero_terminal_snr = zero_terminal_snr
        self.betas64 = betas
        self.alphas_cumprod64 = torch.cumprod(1 - betas, 0)
        self.device = torch.device(device)
        self.betas = betas.to(self.device, torch.float32)
        self.alphas_cumprod = self.alphas_cumprod64.to(self.device, torch.float32)

    @classmethod
    def from_config(cls, cfg, device="cpu") -> "NoiseSchedule":
        """From a `DiffusionConfig`, or from a diffusers scheduler config (a scheduler_config.json dict)."""
        if isinstance(cfg, Mapping):
            from fastdiff.diffusion.diffusers_options import resolve_options, schedule_kwargs

            return cls(**schedule_kwargs(resolve_options(cfg, "schedule")), device=device)
        return cls(
            cfg.schedule,
            cfg.num_timesteps,
            beta_start=cfg.beta_start,
            beta_end=cfg.beta_end,
            zero_terminal_snr=cfg.zero_terminal_snr,
            device=device,
        )

    def to(self, device) -> "NoiseSchedule":
        self.device = torch.device(device)
        self.betas = self.betas.to(self.device)
        self.alphas_cumprod = self.alphas_cumprod.to(self.device)
        return self

    def snr(self) -> torch.Tensor:
        return self.alphas_cumprod64 / (1 - self.alphas_cumprod64)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0): sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, with t of shape [B] on x0's device."""
        ab = self.alphas_cumprod[t].view(-1, *([1] * (x0.dim() - 1)))
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps

    def __repr__(self) -> str:
        return f"NoiseSchedule({self.kind!r}, T={self.num_timesteps}, zero_terminal_snr={self.zero_terminal_snr})"
