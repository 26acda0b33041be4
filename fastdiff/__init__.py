"""fastdiff: fast training and sampling of small image diffusion models.

From Python: `fastdiff.load(path)` -> `Pipeline` (`.sample(n, labels=..., guidance=...)`), `fastdiff.Pipeline`
around your own denoiser, and the plain samplers (`sample_ddim`, `sample_ddpm`, `sample_student`, `run_table`).
"""

__version__ = "0.1.0"

from fastdiff.diffusion import (  # noqa: E402
    NoiseSchedule,
    initial_noise,
    run_table,
    sample_ddim,
    sample_ddpm,
    sample_student,
    seeds_for,
)
from fastdiff.errors import FastdiffError  # noqa: E402
from fastdiff.pipeline import Pipeline, load  # noqa: E402

__all__ = ["FastdiffError", "NoiseSchedule", "Pipeline", "__version__", "initial_noise", "load", "run_table",
           "sample_ddim", "sample_ddpm", "sample_student", "seeds_for"]
