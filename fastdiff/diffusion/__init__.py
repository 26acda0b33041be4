from fastdiff.diffusion.parameterization import PREDICTIONS, to_eps, to_x0, training_target
from fastdiff.diffusion.samplers import (
    ddim_table,
    ddpm_table,
    initial_noise,
    make_timesteps,
    run_table,
    sample_ddim,
    sample_ddpm,
    sample_student,
    seeds_for,
    student_table,
    student_timesteps,
)
from fastdiff.diffusion.schedules import NoiseSchedule

__all__ = [
    "PREDICTIONS", "NoiseSchedule", "ddim_table", "ddpm_table", "initial_noise", "make_timesteps", "run_table",
    "sample_ddim", "sample_ddpm", "sample_student", "seeds_for", "student_table", "student_timesteps", "to_eps",
    "to_x0", "training_target",
]
