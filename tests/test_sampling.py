"""The one sampling entry point: settings resolved once (run defaults, then overrides, one error per bad value),
the same flags meaning the same thing in sample / eval / distill_table, the refiner inside `sample`, and the
public samplers keeping no autograd graph."""

import argparse
import dataclasses
import json
import math
import warnings

import pytest
import torch

from fastdiff import checkpoint as ckpt
from fastdiff.cli import add_sampling_args, build_parser, sampling_overrides
from fastdiff.config import RunConfig, apply_overrides, distill_config, load_config, preset_config
from fastdiff.diffusion import NoiseSchedule, initial_noise, sample_ddim, sample_ddpm, seeds_for
from fastdiff.errors import ConfigError
from fastdiff.models import UNet
from fastdiff.models.refiner import Refiner, refiner_unet_config
from fastdiff.runtime import AccelOptions, sample_batch_size
from fastdiff.sampling import Denoiser, labels_for, resolve_settings, sample
from fastdiff.train.refiner import RefinerConfig

TINY = {"model.base_channels": 16, "model.num_groups": 4}
PLAIN = dict(amp="fp32", channels_last=False, max_rows=0)  # the plain loop, whatever the CPU's defaults


def denoiser(cfg: RunConfig | None = None) -> Denoiser:
    cfg = cfg or apply_overrides(preset_config("digits"), TINY)
    torch.manual_seed(0)
    return Denoiser.from_config(UNet(cfg.model).eval().requires_grad_(False), cfg)


def test_defaults_come_from_the_run():
    s = resolve_settings(denoiser())
    assert (s.sampler, s.steps, s.eta, s.guidance, s.spacing, s.clip) == ("ddim", 50, 0.0, 2.0, "trailing", 1.0)
    assert s.batch_size == sample_batch_size("cpu") == 64 and s.accel == AccelOptions.for_device("cpu")
    assert s.refiner is None
    # max_rows, like every acceleration key, overrides the device's choice; 0 is no limit (the plain loop).
    assert resolve_settings(denoiser(), max_rows=16).accel.max_rows == 16
    assert resolve_settings(denoiser(), **PLAIN).accel.plain
    # ddpm without --steps runs all T, wherever it is asked for (eval used to run 50 respaced steps).
    assert resolve_settings(denoiser(), sampler="ddpm").steps == 1000
    assert resolve_settings(denoiser(), sampler="ddpm", steps=20).steps == 20
    # None is "not given"; clip inf is no clipping.
    s = resolve_settings(denoiser(), sampler=None, guidance=None, clip=math.inf, eta=0.5)
    assert (s.sampler, s.guidance, s.clip, s.eta) == ("ddim", 2.0, None, 0.5)
    # An unconditional run has no guidance to apply; the value a run saved before 2026-12-07 holds does not leak in.
    old = apply_overrides(preset_config("digits"), TINY).to_dict()
    old["model"]["num_classes"] = 0
    uncond = denoiser(RunConfig.from_dict(old, saved=True))
    assert uncond.config.sample.guidance == 2.0 and resolve_settings(uncond).guidance == 1.0


def test_one_step_that_would_run_at_timestep_0_is_refused():
    """leading and linspace spacing put a single step at t = 0: the images were the initial noise, clipped."""
    for spacing in ("leading", "linspace"):
        for sampler in ("ddim", "ddpm"):
            with pytest.raises(ConfigError, match=f"1 {sampler} step with {spacing} spacing runs the model at "
                                                  "timestep 0 only"):
                resolve_settings(denoiser(), sampler=sampler, steps=1, spacing=spacing)
        assert resolve_settings(denoiser(), steps=2, spacing=spacing).steps == 2
    assert resolve_settings(denoiser(), steps=1, spacing="trailing").steps == 1


def test_student_defaults():
    teacher = apply_overrides(preset_config("digits-v"), TINY)
    student = denoiser(distill_config(teacher, "teacher"))
    s = resolve_settings(student)
    assert (s.sampler, s.steps) == ("student", 4)
    assert resolve_settings(student, steps=1).steps == 1
    assert resolve_settings(student, sampler="ddim").steps == 4  # on the student's own timesteps


@pytest.mark.parametrize("overrides, message", [
    ({"sampler": "euler"}, "unknown sampler 'euler'"),
    ({"sampler": "student"}, "not an ADD student run"),
    ({"steps": 0}, "steps=0 must be between 1 and the 1000"),
    ({"steps": 1001}, "steps=1001 must be between 1 and the 1000"),
    ({"steps": 2.5}, "steps=2.5 is not a whole number"),
    ({"eta": -1.0}, "eta=-1 is outside the allowed range: between 0"),
    ({"eta": 5.0}, "eta=5 is outside the allowed range"),
    ({"eta": float("nan")}, "eta=nan is outside the allowed range"),
    ({"sampler": "ddpm", "eta": 0.5}, "applies to --sampler ddim only"),
    ({"guidance": float("nan")}, "guidance=nan is outside the allowed range: 0 and up, finite"),
    ({"guidance": float("inf")}, "guidance=inf is outside the allowed range"),
    ({"guidance": -3.0}, "guidance=-3 is outside the allowed range"),
    ({"guidance": "2"}, "guidance='2' is not a number"),
    ({"spacing": "even"}, "unknown timestep spacing"),
    ({"clip": 0.0}, "clip=0 is outside the allowed range: above 0"),
    ({"clip": "1"}, "clip='1' is not a number"),
    ({"batch_size": 0}, "batch_size=0 must be at least 1"),
    ({"batch_size": 2.0}, "batch_size=2.0 is not a whole number"),
    ({"amp": "fp16"}, "fp16 needs a CUDA device"),
    ({"cuda_graphs": True}, "CUDA graphs need a CUDA device"),
    ({"temperature": 2.0}, "unknown sampling option"),
    ({"refiner": ""}, "an empty refiner names no run"),  # it sampled without one, reporting refiner ""
])
def test_one_clear_error_per_bad_value(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve_settings(denoiser(), **overrides)


def test_guidance_needs_a_null_class():
    uncond = denoiser(apply_overrides(preset_config("digits"), {**TINY, "model.num_classes": 0}))
    with pytest.raises(ConfigError, match="is unconditional"):
        resolve_settings(uncond, guidance=2.0)
    den = denoiser()
    den.null_label = None  # a conditional model without an unconditional class
    with pytest.raises(ConfigError, match="has no null class"):
        resolve_settings(den, guidance=2.0)
    assert resolve_settings(den).guidance == 1.0


def test_guidance_needs_a_trained_null_class(tmp_path):
    # p_uncond 0 never trains the null label's embedding (its row stays random), so guiding against it is noise
    never = denoiser(apply_overrides(preset_config("digits"), {**TINY, "train.p_uncond": 0.0, "sample.guidance": 1.0}))
    with pytest.raises(ConfigError, match="^guidance 2 guides against the null class, which .* never trained"):
        resolve_settings(never, guidance=2.0)
    assert resolve_settings(never).guidance == 1.0 and resolve_settings(denoiser(), guidance=2.0).guidance == 2.0
    # A run from before the rule, whose own default guidance is 2: it loads, and samples with guidance 1 only
    d = json.loads(apply_overrides(preset_config("digits"), TINY).to_json())
    d["train"]["p_uncond"] = 0.0
    (tmp_path / "config.json").write_text(json.dumps(d))
    old = denoiser(load_config(tmp_path / "config.json"))
    with pytest.raises(ConfigError, match="^its default guidance 2 guides against the null class"):
        resolve_settings(old)
    assert resolve_settings(old, guidance=1.0).guidance == 1.0


def test_the_same_flags_resolve_the_same_everywhere():
    flags = ["--sampler", "ddpm", "--guidance", "3", "--clip", "none", "--spacing", "linspace", "--amp", "bf16"]
    common = ["--checkpoint", "run"]
    sample_args = build_parser().parse_args(["sample", *common, "--out", "x.png", *flags])
    eval_args = build_parser().parse_args(["eval", *common, *flags])
    table = argparse.ArgumentParser()
    add_sampling_args(table)  # what python -m fastdiff.distill_table defines
    table_args = table.parse_args(flags)
    got = [resolve_settings(denoiser(), **{**sampling_overrides(a), "batch_size": 8})
           for a in (sample_args, eval_args, table_args)]
    assert got[0] == got[1] == got[2]
    assert (got[0].steps, got[0].guidance, got[0].clip, got[0].accel.amp) == (1000, 3.0, None, "bf16")
    assert eval_args.batch_size is table_args.batch_size is sample_args.batch_size is None  # the device's


def test_labels_for():
    assert labels_for(None, 12, 10).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert labels_for([3, 7], 5, 10).tolist() == [3, 7, 3, 7, 3]
    assert labels_for(4, 3, 10).tolist() == [4, 4, 4]
    assert labels_for(torch.tensor([1, 2]), 2, 10).tolist() == [1, 2]
    assert labels_for(None, 3, 0) is None
    with pytest.raises(ConfigError, match=r"outside 0..9"):
        labels_for([3, 12], 4, 10)
    with pytest.raises(ConfigError, match="unconditional"):
        labels_for([1], 4, 0)
    with pytest.raises(ConfigError, match="must be an integer or a 1-D list of integers"):
        labels_for([0.5], 4, 10)
    with pytest.raises(ConfigError, match="3 labels for 2 samples; give at most 2"):  # they were dropped
        labels_for([1, 2, 3], 2, 10)
    for bad in ("3", [[1, 2], [3]]):  # a string, a ragged list: one ConfigError, not torch's TypeError
        with pytest.raises(ConfigError, match="must be an integer or a 1-D list of integers in 0..9"):
            labels_for(bad, 4, 10)


def test_sample_is_batch_invariant_and_matches_the_plain_sampler():
    den = denoiser()
    small = sample(den, resolve_settings(den, steps=3, batch_size=3, **PLAIN), n=5, seed=7)
    whole = sample(den, resolve_settings(den, steps=3, batch_size=8, **PLAIN), n=5, seed=7)
    assert small.seeds.tolist() == [7, 8, 9, 10, 11] and small.labels.tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(small.images, whole.images, atol=1e-4, rtol=0)  # convolution rounding only
    seeds = seeds_for(7, 5)
    want = sample_ddim(den.model, initial_noise(seeds, (1, 8, 8)), NoiseSchedule("linear", 1000), steps=3,
                       seeds=seeds, labels=torch.arange(5), guidance=2.0, null_label=10, clip=1.0)
    assert torch.equal(whole.images, want)
    assert whole.images.device.type == "cpu" and whole.setup_s == 0.0 and whole.seconds > 0


@pytest.mark.parametrize("max_rows", [1, 3, 7])
def test_row_limit_chunks_the_model_calls_and_keeps_the_samples(max_rows):
    # Guidance makes 5 images 10 rows per step: chunks of 1, 3 (3+3+3+1) and 7 (7+3), never more than max_rows.
    den = denoiser()
    whole = sample(den, resolve_settings(den, steps=3, **PLAIN), n=5, seed=7).images
    rows, model = [], den.model
    den.model = lambda x, t, labels: (rows.append(x.shape[0]), model(x, t, labels))[1]
    chunked = sample(den, resolve_settings(den, steps=3, amp="fp32", channels_last=False, max_rows=max_rows),
                     n=5, seed=7).images
    assert rows and max(rows) == max_rows and sum(rows) == 3 * 10
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=0)  # convolution rounding of the row count only


def test_fast_path_on_cpu_uses_labels_of_a_model_without_null_class():
    den = denoiser()
    plain = sample(den, resolve_settings(den, steps=2, guidance=1.0, **PLAIN), n=4, labels=[1, 2, 3, 4]).images
    den.null_label = None
    seen = []
    model = den.model
    den.model = lambda x, t, labels: (seen.append(labels), model(x, t, labels))[1]
    fast = sample(den, resolve_settings(den, steps=2, amp="fp32", channels_last=True), n=4, labels=[1, 2, 3, 4]).images
    assert seen and all(y is not None and y.tolist() == [1, 2, 3, 4] for y in seen)
    torch.testing.assert_close(fast, plain, atol=1e-4, rtol=0)


def test_refiner_runs_inside_sample(tmp_path):
    den = denoiser()
    refiner = Refiner(refiner_unet_config(den.config.model, RefinerConfig(base_channels=8)))
    torch.nn.init.constant_(refiner.net.conv_out.bias, 0.25)  # refined = x + 0.25 (weights are zero at init)
    config = {"kind": "refiner", "model": dataclasses.asdict(refiner.net.config)}
    ckpt.save_checkpoint(tmp_path, 1, tensors={"model": refiner.state_dict()}, state={"step": 1}, config=config)
    plain = sample(den, resolve_settings(den, steps=2), n=4)
    res = sample(den, resolve_settings(den, steps=2, refiner=str(tmp_path)), n=4)
    assert torch.equal(res.unrefined, plain.images)
    torch.testing.assert_close(res.images, (plain.images + 0.25).clamp(-1, 1), atol=1e-6, rtol=0)
    assert 0 < res.refine_s <= res.seconds and res.settings.refiner == str(tmp_path)
    # a refiner records its generator's weights: another model's (here a retrained copy) is warned about
    from fastdiff.errors import FastdiffWarning
    from fastdiff.sources import model_fingerprint

    config["refiner"] = {"generator": "RUN", "generator_weights": model_fingerprint(den.model)}
    ckpt.save_checkpoint(tmp_path, 2, tensors={"model": refiner.state_dict()}, state={"step": 2}, config=config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_settings(den, refiner=str(tmp_path))
    other = denoiser()
    torch.nn.init.constant_(other.model.conv_out.bias, 0.5)
    with pytest.warns(FastdiffWarning, match="trained on the samples of other weights \\(RUN, fingerprint"):
        resolve_settings(other, refiner=str(tmp_path))


def test_too_many_samples_or_too_large_a_batch_is_one_clear_error():
    d = denoiser()
    # 10**12 digits cannot be held in any machine's memory: refused before a seed is drawn.
    with pytest.raises(ConfigError, match=r"--n 1000000000000 samples of 1x8x8 need about .* GiB of memory .* "
                                          r"use a smaller --n \(at most about [\d,]+\)"):
        sample(d, resolve_settings(d), n=10**12)
    # A batch whose activations the allocator refuses (here a model asking for 400 TB) names --batch-size.
    greedy = dataclasses.replace(d, model=lambda x, t, y: x.new_empty(10**14), fast_samplers={})
    with pytest.raises(ConfigError, match=r"sampling 8 images of 1x8x8 at once ran out of cpu memory; use a smaller "
                                          r"--batch-size \(e.g. 2\)"):
        sample(greedy, resolve_settings(greedy, steps=1, batch_size=8), n=20)
    broken = dataclasses.replace(d, model=lambda x, t, y: torch.ones(2, 2) @ torch.ones(3, 3), fast_samplers={})
    with pytest.raises(RuntimeError, match="cannot be multiplied"):  # other errors pass through unchanged
        sample(broken, resolve_settings(broken, steps=1), n=2)


def test_public_samplers_keep_no_autograd_graph():
    torch.manual_seed(0)
    model = UNet(apply_overrides(preset_config("digits"), TINY).model)  # parameters require grad
    assert all(p.requires_grad for p in model.parameters())
    seeds = seeds_for(0, 4)
    x = initial_noise(seeds, (1, 8, 8))
    frames = []
    for fn in (sample_ddim, sample_ddpm):
        out = fn(model, x, NoiseSchedule("linear", 1000), steps=3, seeds=seeds, labels=torch.arange(4),
                 guidance=2.0, null_label=10, callback=lambda i, t, xp, x0: frames.append((xp, x0)))
        assert out.grad_fn is None and not out.requires_grad
    assert all(xp.grad_fn is None and x0.grad_fn is None for xp, x0 in frames)


def test_trajectory_rows_do_not_depend_on_the_batch_size():
    # The recorder takes its rows from as many batches as hold them: with batches of 2 it showed 2 rows, not 4
    from fastdiff.sampling import TrajectoryRecorder

    den = denoiser()
    frames = {}
    for batch in (6, 2):
        settings = resolve_settings(den, steps=3, batch_size=batch, **PLAIN)
        rec = TrajectoryRecorder(settings.steps, rows=4)
        sample(den, settings, n=6, callback=rec, callback_rows=rec.rows)
        frames[batch] = rec.frames
    assert [label for label, _, _ in frames[2]] == [label for label, _, _ in frames[6]] and len(frames[2]) == 3
    for (_, x2, p2), (_, x6, p6) in zip(frames[2], frames[6]):
        assert x2.shape == x6.shape == (4, 1, 8, 8)
        torch.testing.assert_close(x2, x6, atol=1e-4, rtol=0)  # the convolutions' rounding by batch size
        torch.testing.assert_close(p2, p6, atol=1e-4, rtol=0)
