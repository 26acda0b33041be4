"""fastdiff: fast training and sampling of small image diffusion models."""

__version__ = "0.1.0"

from fastdiff.diffusion import NoiseSchedule, initial_noise, sample_ddim, sample_ddpm, seeds_for  # noqa: E402
from fastdiff.errors import FastdiffError  # noqa: E402

__all__ = ["FastdiffError", "NoiseSchedule", "__version__", "initial_noise", "sample_ddim", "sample_ddpm", "seeds_for"]
