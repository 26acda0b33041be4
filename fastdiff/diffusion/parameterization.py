"""What the network predicts: eps (Ho et al. 2020), v (Salimans & Ho 2022) or x0, and the conversions.

With x_t = a*x0 + s*eps, a = sqrt(alphas_cumprod_t), s = sqrt(1 - alphas_cumprod_t) and a^2 + s^2 = 1:
    v   = a*eps - s*x0
    x0  = (x_t - s*eps) / a = a*x_t - s*v
    eps = (x_t - a*x0) / s  = s*x_t + a*v
Every function takes alphas_cumprod broadcastable against the tensors.
"""

from __future__ import annotations

import torch

from fastdiff.errors import ConfigError

PREDICTIONS = ("eps", "v", "x0")


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ConfigError(f"unknown prediction type {prediction!r}; use one of {', '.join(PREDICTIONS)}")
    return prediction


def v_from(x0, eps, ab):
    return ab.sqrt() * eps - (1 - ab).sqrt() * x0


def x0_from_eps(x_t, eps, ab):
    return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()


def eps_from_x0(x_t, x0, ab):
    return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()


def x0_from_v(x_t, v, ab):
    return ab.sqrt() * x_t - (1 - ab).sqrt() * v


def eps_from_v(x_t, v, ab):
    return (1 - ab).sqrt() * x_t + ab.sqrt() * v


def training_target(prediction: str, x0, eps, ab):
    """The regression target of the network for x_t = sqrt(ab) x0 + sqrt(1-ab) eps."""
    if prediction == "eps":
        return eps
    if prediction == "v":
        return v_from(x0, eps, ab)
    if prediction == "x0":
        return x0
    raise ConfigError(f"unknown prediction type {prediction!r}")


def to_x0(prediction: str, x_t, out, ab):
    if prediction == "eps":
        return x0_from_eps(x_t, out, ab)
    if prediction == "v":
        return x0_from_v(x_t, out, ab)
    if prediction == "x0":
        return out
    raise ConfigError(f"unknown prediction type {prediction!r}")


def to_eps(prediction: str, x_t, out, ab):
    if prediction == "eps":
        return out
    if prediction == "v":
        return eps_from_v(x_t, out, ab)
    if prediction == "x0":
        return eps_from_x0(x_t, out, ab)
    raise ConfigError(f"unknown prediction type {prediction!r}")


def x0_coefficients(prediction: str, ab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, q) with x0 = p*x_t + q*out, in the dtype of ab (float64 for sampler tables)."""
    if prediction == "eps":
        if bool((ab <= 0).any()):
            raise ConfigError(
                "eps-prediction cannot recover x0 where alphas_cumprod = 0 (zero terminal SNR); "
                "predict v instead (--prediction v; diffusers' prediction_type='v_prediction')"
            )
        return 1 / ab.sqrt(), -(1 - ab).sqrt() / ab.sqrt()
    if prediction == "v":
        return ab.sqrt(), -(1 - ab).sqrt()
    if prediction == "x0":
        return torch.zeros_like(ab), torch.ones_like(ab)
    raise ConfigError(f"unknown prediction type {prediction!r}")
