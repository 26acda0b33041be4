"""Samplers against an exact denoiser: data from a known Gaussian, so E[eps | x_t] has a closed form."""

import math

import pytest
import torch

from fastdiff.diffusion import NoiseSchedule, initial_noise, sample_ddim, sample_ddpm, seeds_for
from fastdiff.diffusion.parameterization import training_target
from fastdiff.diffusion.samplers import ddim_table, ddpm_table, guided, make_timesteps

MU, STD = 0.4, 0.3  # data ~ N(MU, STD^2) independently in every element
SHAPE = (1, 4, 4)


def gaussian_oracle(schedule, prediction, mu=MU, std=STD):
    """The exact minimum-MSE prediction for Gaussian data: E[x0 | x_t] is linear in x_t."""

    def model(x, t, labels=None):
        ab = schedule.alphas_cumprod64.to(x.device)[t.long()].view(-1, 1, 1, 1)
        var_t = ab * std**2 + (1 - ab)
        x0_mean = mu + ab.sqrt() * std**2 * (x.double() - ab.sqrt() * mu) / var_t
        eps_mean = (1 - ab).sqrt() * (x.double() - ab.sqrt() * mu) / var_t
        return training_target(prediction, x0_mean, eps_mean, ab).float()

    return model


def check_moments(x, mu=MU, std=STD, bias=0.0):
    n = x.numel()
    mean, var = x.double().mean().item(), x.double().var().item()
    # 5 standard errors of the sample mean and variance, plus the sampler's discretisation bias allowance.
    mean_tol = 5 * std / math.sqrt(n) + bias
    var_tol = 5 * std**2 * math.sqrt(2 / n) + bias
    assert abs(mean - mu) < mean_tol, f"mean {mean:.4f} vs {mu} (tol {mean_tol:.4f})"
    assert abs(var - std**2) < var_tol, f"var {var:.4f} vs {std**2} (tol {var_tol:.4f})"


N = 2048
# With the exact denoiser the samplers' only error is discretisation, which vanishes at T = 1000 steps
# (at 100 steps DDIM(eta=0) still undershoots this variance by ~9%); so the moment checks run all 1000 steps.


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_gaussian(eta):
    sched = NoiseSchedule("linear")
    seeds = seeds_for(0, N)
    x = sample_ddim(gaussian_oracle(sched, "eps"), initial_noise(seeds, SHAPE), sched, steps=1000, eta=eta,
                    seeds=seeds)
    check_moments(x)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_matches_gaussian(variance):
    sched = NoiseSchedule("cosine")
    seeds = seeds_for(1, N)
    x = sample_ddpm(gaussian_oracle(sched, "eps"), initial_noise(seeds, SHAPE), sched, variance=variance, seeds=seeds)
    check_moments(x)


def test_zero_terminal_snr_v_prediction():
    sched = NoiseSchedule("linear", zero_terminal_snr=True)
    seeds = seeds_for(3, N)
    x = sample_ddim(gaussian_oracle(sched, "v"), initial_noise(seeds, SHAPE), sched, steps=1000, seeds=seeds,
                    prediction="v")
    check_moments(x)


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_parameterizations_sample_the_same(prediction):
    """The exact eps, v and x0 oracles are one denoiser, so every sampler must give the same images."""
    sched = NoiseSchedule("linear")
    seeds = seeds_for(4, 64)
    x_T = initial_noise(seeds, SHAPE)
    for sample, kw in [(sample_ddim, {"eta": 0.5}), (sample_ddpm, {})]:
        ref = sample(gaussian_oracle(sched, "eps"), x_T, sched, steps=20, seeds=seeds, **kw)
        out = sample(gaussian_oracle(sched, prediction), x_T, sched, steps=20, seeds=seeds, prediction=prediction, **kw)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_clip_bounds_x0():
    sched = NoiseSchedule("linear")
    seeds = seeds_for(5, 256)
    seen = []
    sample_ddim(gaussian_oracle(sched, "eps", mu=0.0, std=3.0), initial_noise(seeds, SHAPE), sched, steps=10,
                seeds=seeds, clip=1.0, callback=lambda i, t, x, x0: seen.append(x0.abs().max().item()))
    assert max(seen) <= 1.0 and len(seen) == 10


def test_ddim_eta1_equals_ddpm_fixed_small():
    sched = NoiseSchedule("linear")
    ts = make_timesteps(1000, 20, "trailing")
    a = ddim_table(sched, ts, eta=1.0)
    b = ddpm_table(sched, ts, variance="fixed_small")
    torch.testing.assert_close(a.coefs, b.coefs, atol=1e-6, rtol=1e-5)


def test_per_sample_seeds_do_not_depend_on_batch():
    sched = NoiseSchedule("linear")
    model = gaussian_oracle(sched, "eps")
    seeds = torch.tensor([11, 12, 13, 14, 15])
    full = sample_ddpm(model, initial_noise(seeds, SHAPE), sched, steps=20, seeds=seeds)
    # The same seeds in another order and in a smaller batch give the same samples.
    perm = torch.tensor([3, 0, 4])
    part = sample_ddpm(model, initial_noise(seeds[perm], SHAPE), sched, steps=20, seeds=seeds[perm])
    torch.testing.assert_close(part, full[perm], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full[0], full[1], atol=0.1)  # different seeds differ


def test_guidance_formula():
    def model(x, t, labels):
        return x * 0 + labels.float().view(-1, 1, 1, 1)

    x = torch.zeros(2, 1, 2, 2)
    t = torch.zeros(2)
    labels = torch.tensor([3, 5])
    out = guided(model, x, t, labels, 2.5, null_label=10)
    # uncond = 10, cond = label: 10 + 2.5 * (label - 10)
    assert torch.allclose(out[:, 0, 0, 0], torch.tensor([10 + 2.5 * (3 - 10), 10 + 2.5 * (5 - 10)]))
    assert torch.equal(guided(model, x, t, labels, 1.0, 10), model(x, t, labels))
    # guidance 0 is the unconditional model, in one evaluation of the null label's rows (it ran both halves)
    rows = []
    out = guided(lambda x, t, y: rows.append(y.tolist()) or model(x, t, y), x, t, labels, 0.0, null_label=10)
    assert rows == [[10, 10]] and torch.equal(out, torch.full_like(x, 10.0))


def test_timesteps_spacing():
    assert make_timesteps(1000, 4, "trailing").tolist() == [999, 749, 499, 249]
    assert make_timesteps(1000, 4, "leading").tolist() == [750, 500, 250, 0]
    assert make_timesteps(1000, 4, "linspace").tolist() == [999, 666, 333, 0]
    with pytest.raises(ValueError, match="steps"):
        make_timesteps(1000, 0)
    # every count gives that many distinct timesteps in [0, T), noisiest first: trailing 61 of 1000 gave 62, the
    # last -1 (alphas_cumprod[-1], the noisiest, at the last step), as diffusers' trailing spacing does
    assert make_timesteps(1000, 61, "trailing")[-3:].tolist() == [48, 32, 15]
    for T in (2, 10, 100, 1000):
        for spacing in ("leading", "trailing", "linspace"):
            for n in range(1, T + 1):
                ts = make_timesteps(T, n, spacing)
                assert len(ts) == n and ts.min() >= 0 and ts.max() < T and bool((ts[:-1] > ts[1:]).all()), \
                    (T, spacing, n, ts.tolist()[-3:])


def test_the_plain_samplers_check_their_arguments():
    """sample_ddpm(steps=0) ran all 1000 steps; eta or guidance NaN gave NaN images, clip -1 all -1, an int x was
    rounded every step, float seeds were truncated and guidance without labels was dropped, all without a word."""
    from fastdiff.errors import ConfigError

    def model(x, t, labels=None):
        return torch.zeros_like(x)

    schedule, seeds = NoiseSchedule("linear", 1000), seeds_for(0, 2)
    x = initial_noise(seeds, (1, 4, 4))
    for call, says in ((lambda: sample_ddpm(model, x, schedule, steps=0, seeds=seeds), "steps"),
                       (lambda: sample_ddim(model, x, schedule, steps=2, eta=float("nan"), seeds=seeds), "eta=nan"),
                       (lambda: sample_ddim(model, x, schedule, steps=2, guidance=float("nan"), seeds=seeds,
                                            labels=torch.tensor([0, 1]), null_label=2), "guidance=nan"),
                       (lambda: sample_ddim(model, x, schedule, steps=2, guidance=3, seeds=seeds),
                        "guidance=3 needs labels"),
                       (lambda: sample_ddim(model, x, schedule, steps=2, clip=-1, seeds=seeds), "clip=-1"),
                       (lambda: sample_ddim(model, x.long(), schedule, steps=2, seeds=seeds), "x must be a float"),
                       (lambda: sample_ddim(model, x[0], schedule, steps=2, seeds=seeds), r"\[n, C, H, W\]"),
                       (lambda: sample_ddim(model, x, schedule, steps=2, seeds=seeds.float()),
                        "seeds must be an int64"),
                       (lambda: sample_ddim(model, x, schedule, steps=2, seeds=seeds, labels=torch.tensor([0.5, 1.2]),
                                            null_label=2, guidance=2), "labels must be an integer tensor")):
        with pytest.raises(ConfigError, match=says):
            call()
    assert sample_ddim(model, x, schedule, steps=2, clip=None, seeds=seeds).shape == x.shape
    # the fast path's sampler takes the same check (it returned all -1 for clip -1)
    from fastdiff.runtime import AccelOptions
    from fastdiff.sampling.fast import FastSampler

    for kwargs, says in (({"clip": -1}, "clip=-1"), ({"guidance": float("nan")}, "guidance=nan")):
        with pytest.raises(ConfigError, match=says):
            FastSampler(model, AccelOptions(channels_last=True), device="cpu", shape=(1, 4, 4), **kwargs)


def test_seeds_for_checks_n_and_says_when_the_seeds_overflow():
    from fastdiff.errors import ConfigError

    assert seeds_for(5, 0).tolist() == [] and seeds_for(2**63 - 2, 2).tolist() == [2**63 - 2, 2**63 - 1]
    for args, says in (((0, -1), "n=-1 must be 0 or more"), ((0, 2.0), "n=2.0 is not a whole number"),
                       ((0, True), "n=True is not a whole number"), ((-1, 2), "seed=-1 must be a non-negative"),
                       ((2**63 - 1, 2), "pass the largest 63-bit integer")):
        with pytest.raises(ConfigError, match=says):
            seeds_for(*args)


def test_the_samplers_helpers_check_their_arguments():
    """A Python list of seeds (AttributeError), an int shape (TypeError), 2.5 student steps (IndexError) and a
    timestep 999.5 (truncated to 999) or steps=True (one step) went through unchecked."""
    from fastdiff.diffusion import initial_noise, seeds_for, student_timesteps
    from fastdiff.errors import ConfigError

    for call, says in ((lambda: initial_noise([0, 1], (1, 4, 4)), "seeds must be a 1-D integer tensor"),
                       (lambda: initial_noise(seeds_for(0, 2), 16), "shape must be the"),
                       (lambda: initial_noise(seeds_for(0, 2), (1, 0, 4)), "shape must be the"),
                       (lambda: student_timesteps((999, 500), 2.5), "steps=2.5 is not a whole number"),
                       (lambda: student_timesteps((999, 500), True), "steps=True is not a whole number"),
                       (lambda: student_timesteps((999.5, 500)), "student timestep=999.5 is not a whole")):
        with pytest.raises(ConfigError, match=says):
            call()
    assert initial_noise(seeds_for(0, 2), [1, 2, 2]).shape == (2, 1, 2, 2)
    assert student_timesteps((999, 500), 1).tolist() == [999]
