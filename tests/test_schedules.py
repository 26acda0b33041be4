import math

import pytest
import torch

from fastdiff.diffusion import NoiseSchedule
from fastdiff.diffusion.schedules import cosine_alpha_bar
from fastdiff.errors import ConfigError


def test_linear_closed_form():
    s = NoiseSchedule("linear", 1000)
    expected = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    torch.testing.assert_close(s.betas64, expected)
    torch.testing.assert_close(s.alphas_cumprod64, torch.cumprod(1 - expected, 0))
    assert s.betas.dtype == torch.float32 and s.alphas_cumprod.dtype == torch.float32
    # ab_T for the DDPM schedule is ~4.04e-5 (SNR > 0 at the last step).
    assert math.isclose(s.alphas_cumprod64[-1].item(), 4.035e-5, rel_tol=1e-3)


def test_cosine_closed_form():
    T = 1000
    s = NoiseSchedule("cosine", T)
    t = torch.arange(1, T + 1, dtype=torch.float64) / T
    closed = cosine_alpha_bar(t) / cosine_alpha_bar(torch.zeros(1, dtype=torch.float64))
    unclipped = s.betas64 < 0.999
    # Where no beta was capped, alphas_cumprod is exactly f(t)/f(0) (Nichol & Dhariwal 2021, eq. 17).
    first_cap = int((~unclipped).nonzero()[0]) if (~unclipped).any() else T
    torch.testing.assert_close(s.alphas_cumprod64[:first_cap], closed[:first_cap], rtol=1e-10, atol=1e-12)
    assert s.betas64.max() <= 0.999
    assert s.betas64[-1] == 0.999  # the cap binds at the very end


def test_zero_terminal_snr():
    s = NoiseSchedule("linear", zero_terminal_snr=True)
    ref = NoiseSchedule("linear")
    assert s.alphas_cumprod64[-1] == 0
    assert s.snr()[-1] == 0
    torch.testing.assert_close(s.alphas_cumprod64[0], ref.alphas_cumprod64[0])
    assert (s.alphas_cumprod64[1:] <= s.alphas_cumprod64[:-1]).all()


def test_other_T_scales_linear_endpoints():
    s = NoiseSchedule("linear", 250)
    assert math.isclose(s.betas64[0].item(), 4e-4) and math.isclose(s.betas64[-1].item(), 0.08)


def test_add_noise_matches_definition():
    s = NoiseSchedule("cosine")
    x0, eps = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    t = torch.tensor([0, 500, 999])
    ab = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(s.add_noise(x0, eps, t), ab.sqrt() * x0 + (1 - ab).sqrt() * eps)


@pytest.mark.parametrize("args, kwargs, message", [
    (("linear", 10), {}, "gives betas outside \\(0, 1\\)"),  # 1000/T scaling: betas up to 2, alphas_cumprod < 0
    (("linear", 1000), {"beta_end": 1.5}, "gives betas outside"),
    (("linear", 1000), {"beta_start": -1e-4}, "gives betas outside"),
    (("scaled_linear", 1000), {"beta_start": 0.02, "beta_end": 1e-4}, "beta_start <= beta_end"),
    (("linear", 0), {}, "num_timesteps=0 must be a whole number of at least 2"),
    (("cosine", 2.5), {}, "num_timesteps=2.5 is not a whole number"),
    (("sigmoid", 1000), {}, "unknown noise schedule 'sigmoid'"),
])
def test_a_schedule_checks_its_betas(args, kwargs, message):
    # The public class (Pipeline, the samplers, the schedulers) holds to what the run config's validation holds.
    with pytest.raises(ConfigError, match=message):
        NoiseSchedule(*args, **kwargs)


def test_num_timesteps_is_a_whole_number_with_explicit_betas_too():
    """np.int64(1000) was refused as "not a whole number"; with betas=, num_timesteps 3.0 or 1 passed unchecked
    (3.0 then failed at sampling as "steps=3.0", which nobody gave)."""
    import numpy as np

    assert NoiseSchedule("linear", np.int64(1000)).num_timesteps == 1000
    assert type(NoiseSchedule(betas=[0.1, 0.2, 0.3], num_timesteps=np.int32(3)).num_timesteps) is int
    for T, says in ((3.0, "num_timesteps=3.0 is not a whole number"), (1, "num_timesteps=1 must be a whole number "
                                                                         "of at least 2")):
        with pytest.raises(ConfigError, match=says):
            NoiseSchedule(betas=[0.1] * 3 if T != 1 else [0.1], num_timesteps=T)


def test_a_boolean_option_takes_a_bool_only(tmp_path):
    """Any truthy value was True: zero_terminal_snr="no" rescaled the schedule, clip_sample="no" clipped,
    channels_last="no" converted the model, use_ema="no" read the EMA weights, resume="no" resumed."""
    import dataclasses

    import numpy as np

    import fastdiff.schedulers as fs
    from fastdiff.config import apply_overrides, preset_config
    from fastdiff.runtime import AccelOptions
    from fastdiff.sampling import load_run
    from fastdiff.train import train_ddpm

    assert NoiseSchedule("linear", 100, zero_terminal_snr=np.bool_(True)).zero_terminal_snr is True
    for call, name in ((lambda: NoiseSchedule("linear", 100, zero_terminal_snr="no"), "zero_terminal_snr"),
                       (lambda: fs.DDIMScheduler(clip_sample="no"), "clip_sample"),
                       (lambda: fs.DDPMScheduler.from_config({"rescale_betas_zero_snr": 1}), "rescale_betas_zero_snr"),
                       (lambda: dataclasses.replace(AccelOptions(), channels_last="no").check("cpu"), "channels_last"),
                       (lambda: load_run(tmp_path, "cpu", use_ema="no"), "use_ema"),
                       (lambda: train_ddpm(apply_overrides(preset_config("digits"), {"train.steps": 1}), tmp_path / "r",
                                           resume="no", progress=False), "resume")):
        with pytest.raises(ConfigError, match=f"{name}=.* is not True or False"):
            call()
    assert not (tmp_path / "r").exists()
