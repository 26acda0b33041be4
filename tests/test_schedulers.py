"""fastdiff.schedulers against diffusers 0.42.1 itself: whole pipelines, every option step by step, the config files.

Tolerances are float32 rounding: fastdiff's coefficients come from float64 tables and one fused expression,
diffusers' from float32 tables in several steps, so single values differ by a few ulps and trajectories by ~1e-6.
"""

import functools
import json
from unittest import mock

import pytest
import torch

from fastdiff import initial_noise, sample_ddim, seeds_for
from fastdiff.diffusion import NoiseSchedule, make_timesteps
from fastdiff.errors import ConfigError

diffusers = pytest.importorskip("diffusers")
import diffusers.schedulers.scheduling_ddim as ddim_module  # noqa: E402
import diffusers.schedulers.scheduling_ddpm as ddpm_module  # noqa: E402

import fastdiff.schedulers as fs  # noqa: E402

ATOL = 2e-5  # whole pipelines: images in [0, 1] after 6 steps, a few float32 ulps per step


def short(opts) -> str:
    return ",".join(f"{k}={'[...]' if isinstance(v, list) else v}" for k, v in opts.items()) or "defaults"


SCHEDULE_OPTIONS = [
    {},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"num_train_timesteps": 500, "beta_end": 0.03},
    {"trained_betas": torch.linspace(2e-4, 0.03, 1000).tolist()},
    {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
]
STEP_OPTIONS = [
    {"timestep_spacing": "leading"},
    {"timestep_spacing": "leading", "steps_offset": 1},
    {"timestep_spacing": "trailing"},
    {"timestep_spacing": "linspace"},
    {"prediction_type": "v_prediction"},
    {"prediction_type": "sample"},
    {"clip_sample": False},
    {"clip_sample_range": 0.5},
]
DDIM_OPTIONS = [{"set_alpha_to_one": False}, {"set_alpha_to_one": False, "timestep_spacing": "linspace"}]
DDPM_OPTIONS = [{"variance_type": "fixed_large"}, {"variance_type": "fixed_small_log"},
                {"variance_type": "fixed_large", "timestep_spacing": "trailing"}]
DDIM_STEP_ARGS = [dict(eta=0.0), dict(eta=0.0, use_clipped_model_output=True), dict(eta=0.5),
                  dict(eta=1.0, use_clipped_model_output=True)]


def fake_model(x, t):
    """A cheap deterministic 'network' whose output depends on x and t."""
    return torch.sin(3 * x + t / 97.0) * 1.5


def _generators(kind):
    return [torch.Generator().manual_seed(s) for s in (1, 2)] if kind == "list" else torch.Generator().manual_seed(1)


def _next_noise(shape, gens) -> torch.Tensor:
    """The noise diffusers' next draw from `gens` will be, drawn from copies (the generators do not advance)."""
    copies = [torch.Generator().set_state(g.get_state()) for g in (gens if isinstance(gens, list) else [gens])]
    if len(copies) == 1:
        return torch.randn(shape, generator=copies[0])
    return torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in copies])


def step_diff(name, opts, step_args=None, steps=10, generator="one", custom=None):
    """Step both schedulers along diffusers' trajectory and compare each step's prev_sample and x0 with the truth:
    diffusers' own formulas in float64 on fastdiff's float64 table, with the same noise.

    Returns max |ours - diffusers|, max |ours - truth| and max |diffusers - truth| over the trajectory.
    custom: DDPM's custom timesteps (set_timesteps(timesteps=...)), or "unset" (t -> t - 1 without set_timesteps).
    """
    ref = getattr(diffusers, name)(**opts)
    ours = getattr(fs, name).from_config(ref.config)
    truth = getattr(diffusers, name)(**opts)
    ab64 = ours.schedule.alphas_cumprod64
    truth.alphas_cumprod = ab64.clone()
    truth.one = torch.tensor(1.0, dtype=torch.float64)
    one = torch.tensor(1.0, dtype=torch.float64)
    truth.final_alpha_cumprod = one if opts.get("set_alpha_to_one", True) else ab64[0]
    for s in (ref, ours, truth):
        if custom is None:
            s.set_timesteps(steps)
        elif custom != "unset":
            s.set_timesteps(timesteps=custom)
    assert torch.equal(ref.timesteps, ours.timesteps), (ref.timesteps, ours.timesteps)
    timesteps = torch.tensor([999, 500, 7, 6, 1, 0]) if custom == "unset" else ref.timesteps
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    g_ref, g_ours = _generators(generator), _generators(generator)
    worst = {"ours-diffusers": 0.0, "ours-truth": 0.0, "diffusers-truth": 0.0, "ours/bound": 0.0}
    for t in timesteps:
        out = fake_model(x, t)
        z = _next_noise(out.shape, g_ref).double()
        with mock.patch.object(ddpm_module, "randn_tensor", lambda *a, **k: z), \
                mock.patch.object(ddim_module, "randn_tensor", lambda *a, **k: z):
            c = truth.step(out.double(), t, x.double(), **(step_args or {})).to_tuple()
        a = ref.step(out, t, x, generator=g_ref, **(step_args or {})).to_tuple()
        rows = []
        with mock.patch.object(ours, "_step", _recording(ours._step, rows)):
            b = ours.step(out, t, x, generator=g_ours, **(step_args or {})).to_tuple()
        bounds = _rounding_bounds(rows[0], out, x, z)
        for u, v, w, bound in zip(a, b, c, bounds):
            worst["ours-diffusers"] = max(worst["ours-diffusers"], (v - u).abs().max().item())
            worst["ours-truth"] = max(worst["ours-truth"], (v.double() - w).abs().max().item())
            worst["diffusers-truth"] = max(worst["diffusers-truth"], (u.double() - w).abs().max().item())
            worst["ours/bound"] = max(worst["ours/bound"], ((v.double() - w).abs() / bound).max().item())
        x = a[0]
    return worst


def _recording(step, rows):
    def record(row, *args, **kwargs):
        rows.append(row)
        return step(row, *args, **kwargs)
    return record


def _rounding_bounds(row, out, x, z):
    """Per element, the float32 rounding error that fastdiff's one fused expression may make in exact arithmetic
    on its float32 coefficients: x0 = p*x + q*out (two products, one sum: 2u of the terms' magnitudes), then
    prev = A*x0 + B*x + E*out + sigma*z (A times x0's error, plus 5u of the terms: three products and the sums),
    u = 2^-24, with 1% to spare; plus the rounding of the coefficients themselves to float32 (u each)."""
    u = 2.0**-24 * 1.01
    p, q, A, B, sigma, E = (c.double().abs().item() for c in row)
    x, out, z = x.double().abs(), out.double().abs(), z.abs()
    x0_terms = p * x + q * out
    x0_bound = 3 * u * x0_terms
    x0 = x0_terms  # |x0| <= |p x| + |q out| (and clipping only shrinks it)
    prev_bound = A * x0_bound + 6 * u * (A * x0 + B * x + E * out + sigma * z)
    return prev_bound + 1e-300, x0_bound + 1e-300


def within_rounding(worst) -> bool:
    """fastdiff is within float32 rounding of the float64 truth: at least as close as diffusers' float32 step (up
    to 2x, + 1e-6), or inside the rounding bound of its own expression (`_rounding_bounds`). The second is needed
    where 1/sqrt(alpha_bar) is large (eps prediction at t = 999: p = -q/sqrt(1 - ab) ~ 157): p*x and q*out are
    then each rounded at magnitude ~157, while diffusers subtracts before dividing; which of the two lands closer
    depends on the inputs, and diffusers' own error on the CPU's vectorised math."""
    return worst["ours-truth"] <= 2 * worst["diffusers-truth"] + 1e-6 or worst["ours/bound"] <= 1.0


@pytest.mark.parametrize("opts", SCHEDULE_OPTIONS + STEP_OPTIONS + DDIM_OPTIONS, ids=short)
def test_ddim_step_equals_diffusers(opts):
    for args in DDIM_STEP_ARGS:
        worst = step_diff("DDIMScheduler", opts, args)
        assert within_rounding(worst), (args, worst)


@pytest.mark.parametrize("opts", SCHEDULE_OPTIONS + STEP_OPTIONS + DDPM_OPTIONS, ids=short)
def test_ddpm_step_equals_diffusers(opts):
    worst = step_diff("DDPMScheduler", opts, steps=20)
    assert within_rounding(worst), worst


def test_generator_lists_and_variance_noise():
    assert within_rounding(step_diff("DDIMScheduler", {}, dict(eta=1.0), generator="list"))
    assert within_rounding(step_diff("DDPMScheduler", {}, generator="list"))
    ref, ours = diffusers.DDIMScheduler(), fs.DDIMScheduler()
    ref.set_timesteps(5)
    ours.set_timesteps(5)
    x, z = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    a = ref.step(fake_model(x, 599), 599, x, eta=0.7, variance_noise=z).prev_sample
    b = ours.step(fake_model(x, 599), 599, x, eta=0.7, variance_noise=z).prev_sample
    torch.testing.assert_close(b, a, atol=ATOL, rtol=0)


def test_ddpm_custom_timesteps_and_unset_steps():
    assert within_rounding(step_diff("DDPMScheduler", {}, custom="unset"))
    assert within_rounding(step_diff("DDPMScheduler", {}, custom=[900, 500, 100, 3]))


@functools.cache
def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=None,
    ).eval()


PIPELINE_CASES = [
    ("DDIMPipeline", "DDIMScheduler", {}, dict(eta=0.0)),
    ("DDIMPipeline", "DDIMScheduler", {"timestep_spacing": "trailing"}, dict(eta=1.0)),
    ("DDIMPipeline", "DDIMScheduler", {"timestep_spacing": "linspace", "prediction_type": "v_prediction"},
     dict(eta=0.5, use_clipped_model_output=True)),
    ("DDPMPipeline", "DDPMScheduler", {}, {}),
    ("DDPMPipeline", "DDPMScheduler", {"timestep_spacing": "trailing", "variance_type": "fixed_large"}, {}),
]


def pipeline_diff(pipe_name, sched_name, opts, call):
    pipe = getattr(diffusers, pipe_name)(unet=tiny_unet(), scheduler=getattr(diffusers, sched_name)(**opts))
    pipe.set_progress_bar_config(disable=True)

    def images():
        return pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=6,
                    output_type="pt", **call).images

    ref = images()
    pipe.scheduler = getattr(fs, sched_name).from_config(pipe.scheduler.config)
    assert isinstance(pipe.scheduler, getattr(fs, sched_name))
    ours = images()
    return (ref - ours).abs().max().item(), ref


@pytest.mark.parametrize("case", PIPELINE_CASES, ids=lambda c: f"{c[0]}-{short(c[2])}-{short(c[3])}")
def test_pipeline_images_equal_diffusers(case):
    diff, ref = pipeline_diff(*case)
    assert ref.std() > 0.05  # real images, not a constant
    assert diff < ATOL


def test_from_config_converts_between_classes_and_ignores_metadata():
    ddpm = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="fixed_large")
    ddim = fs.DDIMScheduler.from_config(ddpm.config)  # variance_type is DDPM's: ignored, as diffusers does
    theirs = diffusers.DDIMScheduler.from_config(ddpm.config).config
    assert dict(ddim.config) == {k: theirs[k] for k in ddim.config}
    _, unused = fs.DDIMScheduler.from_config(dict(ddpm.config), return_unused_kwargs=True)
    assert unused["variance_type"] == "fixed_large" and "beta_schedule" not in unused
    back = fs.DDPMScheduler.from_config(ddim.config, variance_type="fixed_large")  # kwargs override the config
    assert back.config.variance_type == "fixed_large" and back.config.beta_schedule == "squaredcos_cap_v2"


def test_save_load_round_trip(tmp_path):
    ours = fs.DDIMScheduler(beta_schedule="scaled_linear", timestep_spacing="trailing", clip_sample=False)
    ours.save_pretrained(tmp_path / "scheduler")
    doc = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert doc["_class_name"] == "DDIMScheduler"
    theirs = diffusers.DDIMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert {k: theirs.config[k] for k in ours.config} == dict(ours.config)
    theirs.save_pretrained(tmp_path / "theirs")
    again = fs.DDIMScheduler.from_pretrained(tmp_path / "theirs")
    assert again.config == ours.config
    assert fs.DDIMScheduler.from_pretrained(tmp_path).config == ours.config  # a pipeline folder finds scheduler/
    with pytest.raises(ConfigError, match="scheduler_config.json"):
        fs.DDPMScheduler.from_pretrained(tmp_path / "missing")


def test_interface_values():
    ref, ours = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2"), fs.DDPMScheduler(
        beta_schedule="squaredcos_cap_v2")
    x0, noise = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 400, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.get_velocity(x0, noise, t), ref.get_velocity(x0, noise, t), atol=1e-6, rtol=0)
    assert ours.init_noise_sigma == ref.init_noise_sigma == 1.0 and ours.order == 1 and len(ours) == 1000
    assert ours.scale_model_input(x0, 5) is x0
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, atol=1e-6, rtol=1e-6)
    for cls in ("DDPMScheduler", "DDIMScheduler"):
        for spacing in ("leading", "trailing", "linspace"):
            for n in (1, 7, 30, 50, 333, 1000):
                a, b = getattr(diffusers, cls)(timestep_spacing=spacing), getattr(fs, cls)(timestep_spacing=spacing)
                a.set_timesteps(n)
                b.set_timesteps(n)
                assert torch.equal(a.timesteps, b.timesteps), (cls, spacing, n)
    out = ours.step(noise, 999, x0, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 2


def test_copy_deepcopy_and_pickle():
    import copy
    import pickle

    ours = fs.DDIMScheduler(timestep_spacing="trailing", clip_sample=False)
    ours.set_timesteps(10)
    x, out = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    want = ours.step(out, 999, x).prev_sample
    for other in (copy.copy(ours), copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert other.config == ours.config and type(other.config) is fs.FrozenConfig
        assert torch.equal(other.step(out, 999, x).prev_sample, want)
    with pytest.raises(AttributeError, match="read-only"):
        copy.deepcopy(ours).config["clip_sample"] = True


def test_timesteps_equal_diffusers_at_every_step_count():
    # numpy's arange/linspace, as diffusers: torch's round differently in the last bit, and some counts then got
    # another integer (T=1000: trailing 48 and 96, linspace 27, 31, 47, ...; T=999: 299 trailing counts).
    # Except where diffusers' trailing spacing gives n + 1 timesteps, the last -1 (alphas_cumprod[-1], the
    # noisiest, as the last step): fastdiff gives the n before it.
    extra = []
    for T in (1000, 999, 250):
        for spacing in ("leading", "trailing", "linspace"):
            ref = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
            for n in range(1, T + 1):
                ref.set_timesteps(n)
                want = ref.timesteps
                if len(want) == n + 1 and want[-1] == -1:
                    extra.append((T, spacing, n))
                    want = want[:n]
                assert torch.equal(make_timesteps(T, n, spacing), want), (T, spacing, n)
    assert {spacing for _, spacing, _ in extra} == {"trailing"} and (1000, "trailing", 61) in extra
    for n in (27, 48, 96):  # DDPM's spacing is DDIM's, through the same make_timesteps
        for spacing in ("trailing", "linspace"):
            a, b = diffusers.DDPMScheduler(timestep_spacing=spacing), fs.DDPMScheduler(timestep_spacing=spacing)
            a.set_timesteps(n)
            b.set_timesteps(n)
            assert torch.equal(a.timesteps, b.timesteps), (spacing, n)


def test_errors_name_the_option():
    from fastdiff.errors import FastdiffWarning

    with pytest.raises(ConfigError, match="thresholding"):
        fs.DDIMScheduler(thresholding=True)
    with pytest.raises(ConfigError, match="variance_type='learned_range'"):
        fs.DDPMScheduler(variance_type="learned_range")
    with pytest.raises(ConfigError, match="beta_schedule='sigmoid'"):
        fs.DDPMScheduler(beta_schedule="sigmoid")
    with pytest.warns(FastdiffWarning, match="skip_prk_steps"):  # PNDM's, ignored (diffusers warns too)
        fs.DDIMScheduler.from_config({"skip_prk_steps": True})
    with pytest.raises(ConfigError, match="variance_type"):
        fs.DDIMScheduler(variance_type="fixed_small")  # a DDPM option given to the DDIM constructor
    with pytest.raises(ConfigError, match="set_timesteps"):
        fs.DDIMScheduler().step(torch.zeros(1, 1, 2, 2), 10, torch.zeros(1, 1, 2, 2))
    with pytest.raises(AttributeError, match="read-only"):
        fs.DDIMScheduler().config["eta"] = 1
    # bad arguments to set_timesteps: one ConfigError each, not a TypeError or IndexError (nor 2.5 truncated)
    for call, message in ((lambda: fs.DDIMScheduler().set_timesteps(None), "num_inference_steps=None is not a whole"),
                          (lambda: fs.DDIMScheduler().set_timesteps(2.5), "num_inference_steps=2.5 is not a whole"),
                          (lambda: fs.DDPMScheduler().set_timesteps(timesteps=[]), "a non-empty, strictly decreasing"),
                          (lambda: fs.DDPMScheduler().set_timesteps(timesteps=[9.5, 3]), r"timesteps\[\]=9.5 is not")):
        with pytest.raises(ConfigError, match=message):
            call()
    sched = fs.DDPMScheduler()
    sched.set_timesteps(timesteps=torch.tensor([900, 500, 0]))  # a tensor's elements are whole numbers
    assert sched.timesteps.tolist() == [900, 500, 0]


def test_seeds_are_fastdiffs_batch_invariant_noise():
    """With seeds, the scheduler is fastdiff's sampler: sample_ddim's samples, whatever the batch."""
    sched = fs.DDIMScheduler(timestep_spacing="trailing")
    sched.set_timesteps(10)
    seeds = seeds_for(5, 3)

    def run(s):
        x = initial_noise(s, (1, 4, 4))
        for t in sched.timesteps:
            x = sched.step(fake_model(x, t), t, x, eta=1.0, use_clipped_model_output=True, seeds=s).prev_sample
        return x

    alone = torch.cat([run(seeds[i : i + 1]) for i in range(3)])
    together = run(seeds)
    torch.testing.assert_close(together, alone, atol=0, rtol=0)
    x = initial_noise(seeds, (1, 4, 4))
    ref = sample_ddim(lambda x, t, y: fake_model(x, t.view(-1, 1, 1, 1)), x, NoiseSchedule(), steps=10, eta=1.0,
                      seeds=seeds, clip=1.0, spacing="trailing")
    torch.testing.assert_close(together, ref, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="seeds"):
        sched.step(x, 999, x, eta=1.0, seeds=seeds, generator=torch.Generator())
    # float seeds were truncated (0.5 and 1.7 became 0 and 1); a model output or noise of another batch was a raw
    # RuntimeError
    for bad, says in (({"seeds": torch.tensor([5.5, 6.0, 7.0])}, "seeds must be integers"),
                      ({"variance_noise": torch.zeros(2, 1, 4, 4)}, r"variance_noise has shape \[2, 1, 4, 4\]")):
        with pytest.raises(ConfigError, match=says):
            sched.step(x, 999, x, eta=1.0, **bad)
    with pytest.raises(ConfigError, match=r"model_output has shape \[1, 1, 4, 4\], the sample \[3, 1, 4, 4\]"):
        sched.step(x[:1], 999, x, eta=1.0, seeds=seeds)


def test_noise_schedule_from_diffusers_config():
    for opts in SCHEDULE_OPTIONS:
        ref = diffusers.DDPMScheduler(**opts)
        s = NoiseSchedule.from_config(dict(ref.config))
        torch.testing.assert_close(s.alphas_cumprod64, ref.alphas_cumprod.double(), rtol=2e-6, atol=1e-7)
    with pytest.raises(ConfigError, match="use_karras_sigmas"):
        NoiseSchedule.from_config({"beta_schedule": "linear", "use_karras_sigmas": True})
    with pytest.raises(ConfigError, match="beta_schedule='laplace'"):
        NoiseSchedule.from_config({"beta_schedule": "laplace"})


if __name__ == "__main__":  # the table of measured differences: python tests/test_schedulers.py
    print("| scheduler | options | step args | max abs ours-diffusers | ours-float64 | diffusers-float64 |")
    print("|---|---|---|---|---|---|")
    rows = [("DDIMScheduler", o, a) for o in SCHEDULE_OPTIONS + STEP_OPTIONS + DDIM_OPTIONS for a in DDIM_STEP_ARGS]
    rows += [("DDPMScheduler", o, None) for o in SCHEDULE_OPTIONS + STEP_OPTIONS + DDPM_OPTIONS]
    for name, opts, args in rows:
        w = step_diff(name, opts, args, steps=10 if name == "DDIMScheduler" else 20)
        print(f"| {name} | {short(opts)} | {short(args or {})} | {w['ours-diffusers']:.2e} | {w['ours-truth']:.2e} "
              f"| {w['diffusers-truth']:.2e} |")
    for case in PIPELINE_CASES:
        print(f"| {case[0]} images | {short(case[2])} | {short(case[3])} | {pipeline_diff(*case)[0]:.2e} | | |")


def _both(name, **opts):
    return getattr(fs, name)(**opts), getattr(diffusers, name)(**opts)


def _step_both(ours, theirs, t, x, out, seed=None, **kwargs):
    """One step of each from the same x; with `seed`, each draws from its own generator of that seed."""
    def gen():
        return {} if seed is None else {"generator": torch.Generator().manual_seed(seed)}

    a = ours.step(out, t, x, **gen(), **kwargs).prev_sample
    b = theirs.step(out, t, x, **gen(), **kwargs).prev_sample
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    return a


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler"])
def test_assigned_timesteps_are_stepped_as_set(name):
    """A pipeline that starts part-way assigns `timesteps[k:]`: DDIM stepped with the coefficients of the old list's
    index (off by up to 1.9), DDPM raised IndexError."""
    ours, theirs = _both(name)
    x, out = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)), torch.randn(2, 1, 4, 4)
    for s in (ours, theirs):
        s.set_timesteps(10)
        s.timesteps = s.timesteps[3:]
    for t in ours.timesteps.tolist():
        x = _step_both(ours, theirs, t, x, out, seed=t)
    with pytest.raises(ConfigError, match="1-D list of integers"):
        ours.timesteps = torch.tensor([[999.5]])


def test_a_replaced_config_is_the_one_stepped():
    """diffusers' pipelines mend an old scheduler config by replacing `_internal_dict`; clip_sample was read once,
    at construction, and kept clipping."""
    ours, theirs = _both("DDIMScheduler")
    for s in (ours, theirs):
        s._internal_dict = type(s.config)({**s.config, "clip_sample": False, "steps_offset": 1})
        s.set_timesteps(10)
    assert ours.config.clip_sample is False and ours.config.steps_offset == 1
    x, out = torch.randn(2, 1, 4, 4), 3 * torch.randn(2, 1, 4, 4)
    assert ours.step(out, 901, x).pred_original_sample.abs().max() > 10  # not clipped to [-1, 1]
    _step_both(ours, theirs, 901, x, out)
    ours.register_to_config(prediction_type="v_prediction")
    theirs.register_to_config(prediction_type="v_prediction")
    _step_both(ours, theirs, 801, x, out)
    with pytest.raises(ConfigError, match="thresholding"):
        ours.register_to_config(thresholding=True)


def test_alphas_cumprod_moved_is_accepted_and_changed_is_refused():
    ours = fs.DDPMScheduler()
    moved = ours.alphas_cumprod.to(torch.float64)  # as diffusers' own add_noise does, to a device
    ours.alphas_cumprod = moved
    assert ours.alphas_cumprod is moved  # kept, as an attribute is
    ours.alphas_cumprod = moved.half()  # a cast, within its rounding
    assert ours.alphas_cumprod.dtype == torch.float16
    ours.alphas_cumprod = moved
    torch.testing.assert_close(ours.alphas_cumprod.float(), diffusers.DDPMScheduler().alphas_cumprod)
    with pytest.raises(ConfigError, match="alphas_cumprod of their config"):
        ours.alphas_cumprod = ours.alphas_cumprod * 0.5
    ours.variance_type = "fixed_large"  # an attribute in diffusers; here the config stepped
    assert ours.config.variance_type == "fixed_large"
    ours.set_timesteps(10)
    ours.register_to_config(num_train_timesteps=500)  # the old list (from 900) does not exist in the new schedule
    assert ours.num_inference_steps is None and ours.timesteps[0] == 499 and len(ours.alphas_cumprod) == 500
    ours.step(torch.zeros(1, 1, 2, 2), 499, torch.zeros(1, 1, 2, 2), generator=torch.Generator())


def test_eps_at_zero_snr_fails_only_the_step_that_has_no_x0():
    """Every step failed where a timestep of the list (999) had alphas_cumprod 0."""
    opts = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "clip_sample": False}
    ours, theirs = _both("DDIMScheduler", **opts)
    for s in (ours, theirs):
        s.set_timesteps(10)
    x, out = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    _step_both(ours, theirs, 99, x, out)
    with pytest.raises(ConfigError, match="eps-prediction cannot recover x0 .*prediction_type='v_prediction'"):
        ours.step(out, 999, x)
    ours, theirs = _both("DDPMScheduler", rescale_betas_zero_snr=True)  # no set_timesteps: every timestep
    _step_both(ours, theirs, 500, x, out, seed=0)


def test_save_config_and_noise_arguments_unread_at_eta_zero(tmp_path):
    ours, theirs = _both("DDIMScheduler", clip_sample=False)
    assert ours.save_config(tmp_path).name == "scheduler_config.json"
    assert fs.DDIMScheduler.from_pretrained(tmp_path, local_files_only=True, revision="main").config == ours.config
    for s in (ours, theirs):
        s.set_timesteps(4)
    x, out = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    _step_both(ours, theirs, 751, x, out, generator=torch.Generator(), variance_noise=torch.zeros_like(x))


def test_a_step_takes_one_whole_timestep_in_range():
    """DDIM truncated 2.7 to 2, stepped -5 to NaN and raised IndexError at 1000; one off the list (5) is diffusers'."""
    ours, theirs = _both("DDIMScheduler", clip_sample=False)
    for s in (ours, theirs):
        s.set_timesteps(10)
    x, out = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    _step_both(ours, theirs, 5, x, out)
    _step_both(ours, theirs, torch.tensor(901), x, out)
    for bad, says in ((2.7, "timestep 2.7 is not a whole timestep in 0..999"), (-5, "timestep -5"),
                      (1000, "timestep 1000"), ("x", "must be one number"),
                      (torch.tensor([1, 2]), "must be one number")):
        with pytest.raises(ConfigError, match=says):
            ours.step(out, bad, x)


def test_scheduler_numbers_are_checked():
    """num_train_timesteps 10.5 or a string beta_start were TypeErrors inside; steps_offset -5 gave negative
    timesteps."""
    for opts, says in (({"num_train_timesteps": 10.5}, "num_train_timesteps=10.5 is not a whole number"),
                       ({"num_train_timesteps": 1}, "num_train_timesteps=1 must be at least 2"),
                       ({"beta_start": "1e-4"}, "beta_start='1e-4' is not a number"),
                       ({"beta_end": 0}, "beta_end=0 is outside"),
                       ({"steps_offset": -5}, "steps_offset=-5 must be 0 or more"),
                       ({"clip_sample_range": 0}, "clip_sample_range=0 is outside")):
        with pytest.raises(ConfigError, match=says):
            fs.DDIMScheduler.from_config(opts)
    assert fs.DDIMScheduler.from_config({"clip_sample": False, "clip_sample_range": 0}).clip is None


def test_add_noise_takes_whole_timesteps_in_range():
    """add_noise and get_velocity took -1 as the noisiest timestep, and 1000, float or int timesteps were torch
    errors (IndexError, "tensors used as indices must be long", AttributeError)."""
    ours, ref = fs.DDPMScheduler(), diffusers.DDPMScheduler()
    x0, noise = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    for t in (torch.tensor([3, 900]), [3, 900], torch.tensor([[3], [900]]), torch.tensor([3, 900], dtype=torch.int32)):
        torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, torch.tensor([3, 900])),
                                   atol=1e-6, rtol=0)
    one = ours.add_noise(x0, noise, 7)  # one timestep for the batch
    torch.testing.assert_close(one, ours.add_noise(x0, noise, torch.tensor([7, 7])), atol=0, rtol=0)
    for method in (ours.add_noise, ours.get_velocity):
        for bad, says in ((torch.tensor([1000, 1]), r"timesteps \[1000, 1\] are not all whole timesteps in 0..999"),
                          (torch.tensor([-1, 1]), r"timesteps \[-1, 1\] are not all whole"),
                          (torch.tensor([10.0, 9.0]), "timesteps must be integers"),
                          (torch.tensor([1, 2, 3]), "3 timesteps for a batch of 2")):
            with pytest.raises(ConfigError, match=says):
                method(x0, noise, bad)


def test_leading_steps_shifted_past_the_schedule_are_refused_at_set_timesteps():
    """steps_offset 1 moved the first of 1000 leading timesteps to 1000: an error at the first step (diffusers: an
    IndexError); 999 steps stay within 1..999."""
    s = fs.DDIMScheduler(steps_offset=1)
    with pytest.raises(ConfigError, match="1000 leading steps with steps_offset 1 start at timestep 1000, past"):
        s.set_timesteps(1000)
    s.set_timesteps(999)
    ref = diffusers.DDIMScheduler(steps_offset=1)
    ref.set_timesteps(999)
    assert torch.equal(s.timesteps, ref.timesteps) and int(s.timesteps.max()) == 999


def test_eta_above_one_is_refused():
    """DDIM at eta above 1 clamped a negative variance to 0 silently (diffusers: NaN); the CLI refused it."""
    s = fs.DDIMScheduler()
    s.set_timesteps(10)
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(ConfigError, match="eta=1.5 is outside"):
        s.step(x, s.timesteps[0], x, eta=1.5, generator=torch.Generator().manual_seed(0))
    from fastdiff.diffusion import NoiseSchedule, sample_ddim

    with pytest.raises(ConfigError, match="eta=2 is outside"):
        sample_ddim(lambda x, t, y: torch.zeros_like(x), x, NoiseSchedule("linear", 1000), steps=2, eta=2.0,
                    seeds=torch.arange(2))


def test_from_config_of_another_schedulers_config_swaps_it_in():
    """DDIMScheduler.from_config(pipe.scheduler.config) of a PNDM or Euler pipeline (the usual swap) was refused
    over their own keys (skip_prk_steps); return_unused_kwargs raised instead of returning unknown kwargs. A
    misspelt key of a DDPM/DDIM config is still an error."""
    from fastdiff.errors import FastdiffWarning

    for other, own in ((diffusers.PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1),
                        "skip_prk_steps"),
                       (diffusers.EulerDiscreteScheduler(prediction_type="v_prediction", use_karras_sigmas=True),
                        "use_karras_sigmas")):
        with pytest.warns(FastdiffWarning, match=rf"DDIMScheduler.from_config ignores \['{own}'\]: no options"):
            ours, unused = fs.DDIMScheduler.from_config(other.config, return_unused_kwargs=True)
        theirs = diffusers.DDIMScheduler.from_config(other.config)
        # the values its class defaulted are this class's defaults, as in diffusers (set_alpha_to_one True there)
        assert dict(ours.config) == {k: theirs.config[k] for k in ours.config}
        assert unused[own] is True
        ours.set_timesteps(10)
        theirs.set_timesteps(10)
        assert torch.equal(ours.timesteps, theirs.timesteps)
    with pytest.warns(FastdiffWarning, match=r"ignores \['clip_smaple'\]"):
        fs.DDIMScheduler.from_config({**diffusers.DDIMScheduler().config, "clip_smaple": False})
    with pytest.raises(ConfigError, match="clip_smaple"):
        fs.DDIMScheduler.from_config({}, clip_smaple=False)
    _, unused = fs.DDIMScheduler.from_config({}, return_unused_kwargs=True, foo=1)
    assert unused == {"foo": 1}
