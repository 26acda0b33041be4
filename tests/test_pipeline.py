"""fastdiff.load / fastdiff.Pipeline: every kind of path, the run's defaults, errors, bit-for-bit equality with
`fastdiff sample`, and the fast path around a model fastdiff did not train."""

import shutil

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import checkpoint as ckpt
from fastdiff.cli import main
from fastdiff.config import RunConfig, SampleConfig, apply_overrides, preset_config
from fastdiff.diffusion import NoiseSchedule, initial_noise, sample_ddim, seeds_for
from fastdiff.errors import CheckpointError, ConfigError
from fastdiff.evaluate import evaluate_run
from fastdiff.models import UNet
from fastdiff.train import train_ddpm

PLAIN = dict(amp="fp32", channels_last=False, max_rows=0)  # the plain loop, whatever the CPU's defaults


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline") / "run"
    tiny = {"model.base_channels": 16, "model.num_groups": 4, "train.batch_size": 16, "train.steps": 2,
            "train.ckpt_every": 2, "train.log_every": 1, "train.warmup_steps": 1}
    train_ddpm(apply_overrides(preset_config("digits"), tiny), root, progress=False, echo=lambda s: None)
    return root


def test_load_a_run(run):
    pipe = fastdiff.load(run, device="cpu")
    assert isinstance(pipe.config, RunConfig) and pipe.config.model.num_classes == 10
    assert pipe.schedule.num_timesteps == 1000
    x = torch.zeros(2, 1, 8, 8)
    assert pipe.model(x, torch.tensor([999.0, 10.0]), torch.tensor([1, 2])).shape == x.shape
    # Defaults: the run's guidance (2) and clip, balanced labels 0..9.
    images = pipe.sample(10, steps=3)
    assert images.shape == (10, 1, 8, 8) and images.abs().max() <= 1
    assert torch.equal(images, pipe.sample(10, steps=3, labels=list(range(10)), guidance=2.0))
    assert not torch.equal(images, pipe.sample(10, steps=3, guidance=1.0))
    # The same from a checkpoint folder.
    folder = ckpt.latest_checkpoint(run)
    assert torch.equal(fastdiff.load(folder, device="cpu").sample(10, steps=3), images)


@pytest.mark.parametrize("labels", [None, [3, 7]])
def test_cli_and_python_give_the_same_samples_bit_for_bit(run, tmp_path, labels):
    flags = ["--labels", *map(str, labels)] if labels else []
    assert main(["sample", "--checkpoint", str(run), "--n", "6", "--steps", "3", "--seed", "5", "--guidance", "3",
                 "--sampler", "ddim", "--eta", "0.5", "--out", str(tmp_path / "s.png"), *flags]) == 0
    cli = torch.from_numpy(np.load(tmp_path / "s.npz")["samples"])
    py = fastdiff.load(run, device="cpu").sample(6, seed=5, steps=3, guidance=3.0, eta=0.5, labels=labels)
    assert torch.equal(cli, py)


def test_clip_none_is_the_clis_clip_none(run, tmp_path):
    """The docstring said clip=None turns clipping off; None is "the run's own" for every option, so it clipped. The
    CLI's --clip none is clip="none" (or float("inf")) in Python."""
    assert main(["sample", "--checkpoint", str(run), "--n", "4", "--steps", "3", "--clip", "none",
                 "--out", str(tmp_path / "s.png")]) == 0
    cli = torch.from_numpy(np.load(tmp_path / "s.npz")["samples"])
    pipe = fastdiff.load(run, device="cpu")
    assert cli.abs().max() > 1  # unclipped
    for off in ("none", "Off", float("inf")):
        assert torch.equal(pipe.sample(4, steps=3, clip=off), cli)
    assert pipe.settings(clip="none").clip is None and pipe.settings(clip=None).clip == 1.0
    assert torch.equal(pipe.sample(4, steps=3, clip=None), pipe.sample(4, steps=3))
    with pytest.raises(ConfigError, match="clip"):
        pipe.sample(4, steps=3, clip="nothing")


def test_outputs(run):
    pipe = fastdiff.load(run, device="cpu")
    arrays = pipe.sample(3, steps=2, output="numpy")
    assert arrays.dtype == np.uint8 and arrays.shape == (3, 8, 8, 1)
    pil = pipe.sample(3, steps=2, output="pil")
    assert len(pil) == 3 and pil[0].size == (8, 8) and np.array_equal(np.asarray(pil[1]), arrays[1, ..., 0])
    with pytest.raises(ConfigError, match="unknown output 'png'"):
        pipe.sample(3, output="png")


def test_bad_input_errors(run, tmp_path):
    pipe = fastdiff.load(run, device="cpu")
    with pytest.raises(ConfigError, match=r"labels \[10\] are outside 0..9"):
        pipe.sample(2, labels=[1, 10])
    for labels in ([[1, 2]], torch.tensor([1j])):  # flattened without a word; a RuntimeError
        with pytest.raises(ConfigError, match=r"labels must be an integer or a 1-D list of integers in 0..9"):
            pipe.sample(2, labels=labels)
    with pytest.raises(ConfigError, match=r"n=2.0 is not a whole number"):
        pipe.sample(2.0)
    with pytest.raises(ConfigError, match=r"n=0 must be at least 1"):
        pipe.sample(0)
    for seed in (2.5, True, "1"):  # 2.5 and True were seeds 2 and 1 without a word, "1" a TypeError
        with pytest.raises(ConfigError, match="seed=.* is not a whole number"):
            pipe.sample(2, seed=seed)
    with pytest.raises(CheckpointError, match="does not exist"):
        fastdiff.load(tmp_path / "missing")
    (tmp_path / "other").mkdir()
    with pytest.raises(CheckpointError, match="neither a fastdiff run directory .* nor a diffusers"):
        fastdiff.load(tmp_path / "other")


def test_pretrained_names(run, tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "PRETRAINED_DIR", tmp_path)
    with pytest.raises(CheckpointError, match="this install ships none"):
        fastdiff.load("pretrained:digits")
    # A pretrained folder: model.safetensors (the weights to sample with) + config.json, as a checkpoint writes.
    src = ckpt.latest_checkpoint(run)
    (tmp_path / "digits").mkdir()
    shutil.copy(src / "config.json", tmp_path / "digits" / "config.json")
    shutil.copy(src / "ema.safetensors", tmp_path / "digits" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unknown pretrained model 'cifar' \(available: digits\)"):
        fastdiff.load("pretrained:cifar")
    # a path is no name: "pretrained:/abs/run" or "pretrained:../x" loaded any folder
    for name in (str(src.resolve()), "../" + tmp_path.name + "/digits", "digits/"):
        with pytest.raises(CheckpointError, match="unknown pretrained model"):
            fastdiff.load(f"pretrained:{name}")
    got = fastdiff.load("pretrained:digits", device="cpu").sample(4, steps=2)
    assert torch.equal(got, fastdiff.load(run, device="cpu").sample(4, steps=2))


def test_diffusers_folders_dispatch_to_interop(run, tmp_path, monkeypatch):
    """The dispatch only (in load_run, which fastdiff sample and eval read too): fastdiff.interop.diffusers
    (is_diffusers_folder, load_diffusers) is replaced by a stand-in."""
    from fastdiff.interop import diffusers as interop
    cfg = fastdiff.load(run, device="cpu").config
    calls = []

    def load_diffusers(path, device):
        calls.append((path, device))
        torch.manual_seed(0)
        return UNet(cfg.model).eval(), cfg, NoiseSchedule.from_config(cfg.diffusion, device)

    monkeypatch.setattr(interop, "is_diffusers_folder", lambda p: (p / "model_index.json").exists())
    monkeypatch.setattr(interop, "load_diffusers", load_diffusers)
    folder = tmp_path / "ddpm"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    pipe = fastdiff.load(folder, device="cpu")
    assert calls == [(folder, torch.device("cpu"))] and pipe.config is cfg
    assert pipe.sample(2, steps=2).shape == (2, 1, 8, 8)


def test_wrap_your_own_model():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    seen = []

    def model(x, t, labels):
        seen.append((t.dtype, tuple(t.shape), labels))
        return net(x)

    pipe = fastdiff.Pipeline(model, schedule=NoiseSchedule("linear", 1000), image_shape=(1, 12, 12))
    images = pipe.sample(3, steps=4, seed=2, **PLAIN)
    assert images.shape == (3, 1, 12, 12) and pipe.config is None
    assert seen[0] == (torch.float32, (3,), None) and len(seen) == 4
    seeds = seeds_for(2, 3)
    want = sample_ddim(model, initial_noise(seeds, (1, 12, 12)), NoiseSchedule("linear", 1000), steps=4,
                       seeds=seeds, clip=1.0)
    assert torch.equal(images, want)
    with pytest.raises(ConfigError, match="unconditional"):
        pipe.sample(2, labels=[1])
    with pytest.raises(ConfigError, match="is unconditional"):
        pipe.sample(2, guidance=2.0)
    # on a schedule shorter than the default 50 steps, no steps given is every timestep (it raised "steps=50 must
    # be between 1 and the 20 training timesteps")
    seen.clear()
    short = fastdiff.Pipeline(model, schedule=NoiseSchedule("cosine", 20), image_shape=(1, 12, 12))
    assert short.sample(1, **PLAIN).shape == (1, 1, 12, 12) and len(seen) == 20
    with pytest.raises(ConfigError, match="steps=21"):
        short.sample(1, steps=21)


@pytest.mark.parametrize("accel", [PLAIN, {"amp": "bf16", "channels_last": True}], ids=["plain", "fast"])
def test_a_model_that_returns_no_tensor_of_xs_shape_gets_one_error(accel):
    # e.g. a diffusers UNet2DModel passed as it is (it returns an output object), or a model of another size
    class Output:
        sample = None

    for model, got in ((lambda x, t, y: Output(), "returned Output for x of shape"),
                       (lambda x, t, y: x[:, :, :4], r"returned a tensor of shape \[2, 1, 4, 12\]")):
        pipe = fastdiff.Pipeline(model, schedule=NoiseSchedule("linear", 1000), image_shape=(1, 12, 12))
        with pytest.raises(ConfigError, match=f"{got}.*wrap it as lambda x, t, y: unet"):
            pipe.sample(2, steps=2, **accel)


def test_wrapped_conditional_model_and_its_null_class():
    torch.manual_seed(0)
    unet = UNet(apply_overrides(preset_config("digits"), {"model.base_channels": 16, "model.num_groups": 4}).model)
    kw = dict(schedule=NoiseSchedule("linear", 1000), image_shape=(1, 8, 8), num_classes=10)
    no_null = fastdiff.Pipeline(unet, **kw)
    with pytest.raises(ConfigError, match="has no null class"):
        no_null.sample(2, guidance=2.0)
    pipe = fastdiff.Pipeline(unet, null_label=10, **kw)
    got = pipe.sample(4, steps=3, guidance=2.0, labels=[3, 4], **PLAIN)
    seeds = seeds_for(0, 4)
    want = sample_ddim(unet, initial_noise(seeds, (1, 8, 8)), kw["schedule"], steps=3, seeds=seeds, clip=1.0,
                       labels=torch.tensor([3, 4, 3, 4]), guidance=2.0, null_label=10)
    assert torch.equal(got, want)
    with pytest.raises(ConfigError, match="null_label=11 must be in 0..10"):
        fastdiff.Pipeline(unet, null_label=11, **kw)


def test_a_diffusers_folder_samples_as_its_run(run, tmp_path):
    """The real interop (once merged): a run exported as a diffusers folder loads back and samples the same."""
    interop = pytest.importorskip("fastdiff.interop.diffusers")
    folder = interop.export_run(run, tmp_path / "exported")
    pipe = fastdiff.load(folder, device="cpu")
    # the run's own sampling defaults (guidance 2 here) came with it (fastdiff_run.json), so the defaults agree
    assert pipe.config.sample == fastdiff.load(run, device="cpu").config.sample and pipe.config.sample.guidance != 1
    want = fastdiff.load(run, device="cpu").sample(4, steps=2)
    torch.testing.assert_close(pipe.sample(4, steps=2), want, atol=1e-5, rtol=0)
    # fastdiff sample reads the folder as fastdiff.load does (one loader: load_run)
    assert main(["sample", "--checkpoint", str(folder), "--n", "4", "--steps", "2", "--out", str(tmp_path / "g.png"),
                 "--no-progress"]) == 0
    # a folder whose config is not fastdiff's names no dataset: eval says so before training a classifier
    (folder / interop.RUN_CONFIG).unlink()
    assert fastdiff.load(folder, device="cpu").config.preset == "diffusers"
    with pytest.raises(ConfigError, match="names no dataset"):
        evaluate_run(folder, n=8, device="cpu")


def test_the_fast_path_under_threads_and_from_its_own_callback(run):
    """Its static buffers are shared by every call with the same settings: four threads got one another's images
    (off by up to 1.0), and a sampling from inside a step callback changed the outer one's."""
    from concurrent.futures import ThreadPoolExecutor

    from fastdiff.sampling import resolve_settings, sample

    pipe = fastdiff.load(run, device="cpu")
    fast = {"amp": "fp32", "channels_last": True}  # the fast path on every CPU (not the plain loop)
    others = [fast, {**fast, "guidance": 2.0}, PLAIN, {**fast, "guidance": 3.0}]  # one sampler each but PLAIN's
    want = {k: pipe.sample(4, seed=k, steps=6, **others[k]) for k in range(4)}
    with ThreadPoolExecutor(4) as pool:
        got = dict(zip(range(4), pool.map(lambda k: pipe.sample(4, seed=k, steps=6, **others[k]), range(4))))
    assert all(torch.equal(got[k], want[k]) for k in range(4))
    den = pipe.denoiser
    settings = resolve_settings(den, "cpu", steps=6, **fast)
    assert not settings.accel.plain

    def nested(i, t, x, x0):
        sample(den, settings, n=2, seed=9)

    with pytest.raises(ConfigError, match="again from inside a step callback of its own sampling"):
        sample(den, settings, n=2, seed=0, callback=nested)
    assert torch.equal(sample(den, settings, n=4, seed=0).images, want[0])  # and it still samples afterwards


def test_pipeline_arguments_are_checked_and_a_module_samples_in_eval_mode():
    """image_shape "188" became (1, 8, 8) and (1, 8.7, 8) (1, 8, 8); num_classes 2.5 and a null label on an
    unconditional model were accepted (its guidance then dropped); device "gpu" was a torch error; a module in
    training mode sampled with dropout on."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.drop = torch.nn.Conv2d(1, 1, 3, padding=1), torch.nn.Dropout(0.5)

        def forward(self, x, t, labels):
            return self.drop(self.conv(x))

    net = Net()
    schedule = NoiseSchedule("linear", 1000)
    for kwargs, says in (({"image_shape": "188"}, "image_shape must be"),
                         ({"image_shape": (1, 8.7, 8)}, "image_shape\\[1\\]=8.7 is not a whole number"),
                         ({"image_shape": (1, 0, 8)}, "image_shape\\[1\\]=0 must be at least 1"),
                         ({"num_classes": 2.5}, "num_classes=2.5 is not a whole number"),
                         ({"null_label": 0}, r"null_label=0 applies to a class-conditional model only"),
                         ({"device": "gpu"}, "gpu"),
                         ({"defaults": {"steps": 3}}, "defaults must be a fastdiff.config.SampleConfig"),
                         # checked at once: guidance -3 failed only at .sample, steps 2.5 too
                         ({"defaults": SampleConfig(guidance=-3), "num_classes": 2, "null_label": 2},
                          "guidance=-3 is outside"),
                         ({"defaults": SampleConfig(steps=2.5)}, "steps=2.5 is not a whole number")):
        with pytest.raises(ConfigError, match=says):
            fastdiff.Pipeline(net, schedule=schedule, **{"image_shape": (1, 8, 8), **kwargs})
    # a torch.device skipped the device checks (meta failed inside autocast, cuda inside torch); float64 or half
    # weights failed at their first convolution
    for device, says in ((torch.device("meta"), "device 'meta' is not one fastdiff runs on"),
                         *([] if torch.cuda.is_available() else
                           [(torch.device("cuda"), "device 'cuda' requested but CUDA is not available")])):
        with pytest.raises(ConfigError, match=says):
            fastdiff.Pipeline(net, schedule=schedule, image_shape=(1, 8, 8), device=device)
        with pytest.raises(ConfigError, match=says):
            fastdiff.load("pretrained:mnist", device=device)
    with pytest.raises(ConfigError, match=r"device 'meta' is not one fastdiff runs on"):
        fastdiff.Pipeline(torch.nn.Conv2d(1, 1, 1).to("meta"), schedule=schedule, image_shape=(1, 8, 8))
    for dtype in (torch.float64, torch.float16):
        with pytest.raises(ConfigError, match=f"the model's weights are {dtype}; .* pass model.float"):
            fastdiff.Pipeline(Net().to(dtype), schedule=schedule, image_shape=(1, 8, 8))
    # steps None in the defaults: the sampler's own (a TypeError)
    ddpm = fastdiff.Pipeline(net, schedule=schedule, image_shape=(1, 8, 8),
                             defaults=SampleConfig(sampler="ddpm", steps=None))
    assert ddpm.settings().steps == 1000
    # a module samples in eval mode and is put back as it was: a training loop's previews change nothing of it
    net.conv.eval()  # a mixed state, kept as it is
    pipe = fastdiff.Pipeline(net, schedule=schedule, image_shape=(1, 8, 8))
    assert net.training
    assert torch.equal(pipe.sample(2, steps=3, seed=1, **PLAIN), pipe.sample(2, steps=3, seed=1, **PLAIN))
    assert net.training and not net.conv.training and net.drop.training


def test_a_wrapped_models_nan_output_does_not_claim_checked_weights():
    """The error said "although its weights are finite" of a model whose weights fastdiff never read."""
    pipe = fastdiff.Pipeline(lambda x, t, labels: torch.full_like(x, float("nan")), schedule=NoiseSchedule(),
                             image_shape=(1, 4, 4))
    with pytest.raises(CheckpointError, match=r"2 of 2 samples of the model are NaN or infinite; the weights") as e:
        pipe.sample(2, steps=2, clip="none")
    assert "weights are finite" not in str(e.value)


def test_pil_output_of_more_than_four_channels_is_refused_before_sampling():
    calls = []

    def model(x, t, labels):
        calls.append(1)
        return torch.zeros_like(x)

    pipe = fastdiff.Pipeline(model, schedule=NoiseSchedule("linear", 1000), image_shape=(5, 4, 4))
    with pytest.raises(ConfigError, match="PIL images have 1 to 4 channels, the model's 5"):
        pipe.sample(2, steps=2, output="pil")
    assert calls == [] and pipe.sample(2, steps=2, output="numpy", **PLAIN).shape == (2, 4, 4, 5)


def test_sample_checks_its_settings_against_the_denoiser(run):
    """Settings resolved for one model ran on another unchecked: guidance dropped on an unconditional model,
    hand-built steps=0 ran 1000 steps; a Pipeline in place of a Denoiser was an AttributeError."""
    import dataclasses

    from fastdiff.sampling import resolve_settings, sample

    conditional = fastdiff.load(run, device="cpu")
    guided = resolve_settings(conditional.denoiser, "cpu", steps=2, guidance=3.0)
    plain = fastdiff.Pipeline(lambda x, t, labels: torch.zeros_like(x), schedule=NoiseSchedule("linear", 1000),
                              image_shape=(1, 8, 8))
    with pytest.raises(ConfigError, match="guidance=3 needs a class-conditional model"):
        sample(plain.denoiser, guided, n=2)
    with pytest.raises(ConfigError, match="steps=0"):
        sample(conditional.denoiser, dataclasses.replace(guided, steps=0), n=2)
    with pytest.raises(ConfigError, match="sample takes a Denoiser"):
        sample(conditional, guided, n=2)
    with pytest.raises(ConfigError, match="settings must be a SampleSettings"):
        sample(conditional.denoiser, {"steps": 2}, n=2)
    # a student's DDIM by default: the most of its timesteps that DDIM runs on alone (all of them was refused for
    # 999, 500, whose trailing 2 steps are 999, 499)
    student = fastdiff.load("pretrained:mnist-student", device="cpu").denoiser
    assert resolve_settings(student, "cpu", sampler="ddim").steps == 4
    assert resolve_settings(dataclasses.replace(student, student_timesteps=(999, 500)), "cpu",
                            sampler="ddim").steps == 1
    assert resolve_settings(dataclasses.replace(student, student_timesteps=(999, 500)), "cpu",
                            sampler="student").steps == 1  # the run's own (1 step), as before
    # a student steps through its own timesteps: a spacing was dropped without a word
    with pytest.raises(ConfigError, match="spacing applies to the ddim and ddpm samplers; a student steps through"):
        fastdiff.load("pretrained:mnist-student", device="cpu").sample(2, spacing="leading")
    no_clip = resolve_settings(conditional.denoiser, "cpu", steps=2, clip=None)  # the run's clip
    unclipped = dataclasses.replace(no_clip, clip=None)  # no clipping stays no clipping
    assert sample(conditional.denoiser, unclipped, n=2).settings.clip is None


def test_a_path_argument_is_a_path(tmp_path):
    """fastdiff.load(None), load(3) and export_run(run, None) were TypeErrors; load("") read the current folder."""
    from fastdiff.interop import export_run

    for bad, says in ((None, "path=None is not a path"), (3, "path=3 is not a path"), ("", "path is empty"),
                      (b"run", "is not a path")):
        with pytest.raises(ConfigError, match=says):
            fastdiff.load(bad)
    with pytest.raises(ConfigError, match="out_dir=None is not a path"):
        export_run("pretrained:mnist", None)
