"""ADD: loss signs, where gradients go, the few-step sampler, and a tiny distillation run end to end on the CLI."""

import dataclasses
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff import checkpoint as ckpt
from fastdiff.cli import main
from fastdiff.config import DISCRIMINATOR_KEYS, ADDConfig, apply_overrides, distill_config, preset_config
from fastdiff.diffusion import NoiseSchedule, initial_noise, sample_student, seeds_for, student_table
from fastdiff.diffusion.parameterization import x0_coefficients
from fastdiff.diffusion.samplers import student_timesteps
from fastdiff.errors import ConfigError
from fastdiff.models import UNet, UNetConfig
from fastdiff.models.discriminator import Discriminator
from fastdiff.models.vit import ViT, ViTConfig
from fastdiff.sampling import load_run, sampler_table
from fastdiff.train import train_add, train_ddpm
from fastdiff.train.add_losses import (
    c_of_t,
    discriminator_logits,
    discriminator_loss,
    distillation_loss,
    hinge_discriminator_loss,
    hinge_generator_loss,
    r1_penalty,
    regression_loss,
    student_x0,
)
from fastdiff.train.add_pairs import PAIR_SEED, Pairs

TINY_UNET = UNetConfig(image_size=8, in_channels=1, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                       attn_resolutions=(), dropout=0.0, num_groups=4, num_classes=10)


def test_hinge_signs():
    good_real, good_fake = [torch.full((4, 3), 2.0)], [torch.full((4, 3), -2.0)]
    assert hinge_discriminator_loss(good_real, good_fake) == 0  # beyond the margin on both sides
    assert hinge_discriminator_loss(good_fake, good_real) == 6  # relu(1+2) + relu(1+2)
    assert hinge_discriminator_loss([torch.zeros(4, 3)], [torch.zeros(4, 3)]) == 2
    # The generator gains (loss falls) when D scores its images as more real.
    assert hinge_generator_loss([torch.full((4, 3), 1.0)]) < hinge_generator_loss([torch.full((4, 3), -1.0)])
    assert hinge_generator_loss([torch.full((2, 2), 0.5), torch.full((2, 2), 1.5)]) == -1.0


def test_r1_penalty_of_a_linear_head():
    """D_b = mean_tokens(f_b @ w): the gradient is w / n at every token, so ||grad||^2 = |w|^2 / n."""
    f = torch.randn(3, 5, 4, requires_grad=True)
    w = torch.tensor([1.0, -2.0, 0.5, 3.0])
    r1 = r1_penalty([f @ w], [f])
    torch.testing.assert_close(r1, w.pow(2).sum() / 5)


def test_c_of_t_and_distillation_gradient():
    sched = NoiseSchedule("linear")
    ab = sched.alphas_cumprod[torch.tensor([0, 999])]
    torch.testing.assert_close(c_of_t("sqrt_ab", ab), ab.sqrt())
    with pytest.raises(ConfigError, match="unknown distillation weighting"):
        c_of_t("lpips", ab)
    # A teacher predicting x0 = 0 everywhere: the loss is mean(c(t) * mean(x0_s^2)) and its gradient reaches x0_s
    # only through the first term (the teacher's input is detached).
    calls = []

    def teacher(x, t, labels):
        calls.append(x.requires_grad)
        return torch.zeros_like(x)

    x0_s = torch.randn(6, 1, 8, 8, requires_grad=True)
    loss = distillation_loss(teacher, sched, x0_s, None, torch.Generator().manual_seed(0), prediction="x0",
                             t_min=0, t_max=999, weighting="none")
    torch.testing.assert_close(loss, x0_s.pow(2).mean())
    loss.backward()
    torch.testing.assert_close(x0_s.grad, 2 * x0_s.detach() / x0_s.numel())
    assert calls == [False]


def test_regression_loss_feeds_each_pairs_noise_at_the_first_student_timestep():
    """A student predicting x0 = 0: the loss is the mean square of the drawn pairs' images; its input is exactly
    the drawn pairs' noise, at t = 999 (the first of the student timesteps 999, 499), with their labels."""
    seen = []

    def student(x, t, labels):
        seen.append((x.detach(), t, labels))
        return torch.zeros_like(x) + 0 * w

    w = torch.zeros((), requires_grad=True)
    seeds = seeds_for(PAIR_SEED, 5)
    pairs = Pairs(seeds, torch.arange(5), torch.arange(5.0).view(5, 1, 1, 1).expand(5, 1, 8, 8).contiguous())
    loss = regression_loss(student, NoiseSchedule("linear"), pairs, (999, 499), 7,
                           torch.Generator().manual_seed(0), prediction="x0")
    (x, t, labels), = seen
    assert t.tolist() == [999] * 7
    noises = initial_noise(seeds, (1, 8, 8))
    idx = [next(i for i in range(5) if torch.equal(x[j], noises[i])) for j in range(7)]
    assert labels.tolist() == idx
    torch.testing.assert_close(loss, torch.tensor([float(i) ** 2 for i in idx]).mean())
    loss.backward()
    assert w.grad is not None


def test_regression_loss_with_states_feeds_each_pair_at_a_drawn_student_timestep():
    """With pair states at the later student timesteps, each row is a pair's noise at 999 or its state at 749 or
    249, at that timestep, regressed onto the pair's image; pairs of other timesteps are refused."""
    seen = []

    def student(x, t, labels):
        seen.append((x, t, labels))
        return torch.zeros_like(x)

    seeds = seeds_for(PAIR_SEED, 4)
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 8, 8).contiguous()
    states = torch.stack([torch.full((2, 1, 8, 8), 10.0 * i) + torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)
                          for i in range(4)])  # pair i's state k is 10 i + k + 1
    pairs = Pairs(seeds, torch.arange(4), images, states, (749, 249))
    loss = regression_loss(student, NoiseSchedule("linear"), pairs, (999, 749, 249), 64,
                           torch.Generator().manual_seed(0), prediction="x0")
    (x, t, labels), = seen
    noises = initial_noise(seeds, (1, 8, 8))
    assert set(t.tolist()) == {999, 749, 249}
    for row, ts, i in zip(x, t.tolist(), labels.tolist()):
        expected = noises[i] if ts == 999 else torch.full((1, 8, 8), 10.0 * i + (1 if ts == 749 else 2))
        assert torch.equal(row, expected)
    torch.testing.assert_close(loss, (labels.float() ** 2).mean())
    with pytest.raises(ConfigError, match="not at the student's later timesteps"):
        regression_loss(student, NoiseSchedule("linear"), pairs, (999, 499, 249), 4, torch.Generator(),
                        prediction="x0")


def test_regression_loss_feeds_the_student_in_the_runs_layout():
    seen = []

    def student(x, t, labels):
        seen.append(x)
        return torch.zeros_like(x)

    pairs = Pairs(seeds_for(PAIR_SEED, 3), None, torch.zeros(3, 3, 8, 8))  # 3 channels: the layouts differ
    for memory_format in (torch.channels_last, torch.contiguous_format):
        regression_loss(student, NoiseSchedule("linear"), pairs, (999,), 2, torch.Generator(), prediction="x0",
                        memory_format=memory_format)
        assert seen[-1].is_contiguous(memory_format=memory_format)


@pytest.mark.gpu
def test_regression_loss_with_states_is_captured_by_a_cuda_graph():
    """The student step is CUDA-graphed on a GPU: the regression loss with pair states makes no host sync or
    host-to-device copy, and a replay draws what the eager call draws from the same generator state."""
    dev = torch.device("cuda")
    student = UNet(TINY_UNET).to(dev)
    pairs = Pairs(seeds_for(PAIR_SEED, 4).to(dev), torch.arange(4, device=dev), torch.randn(4, 1, 8, 8, device=dev),
                  torch.randn(4, 2, 1, 8, 8, device=dev), (749, 249))
    schedule = NoiseSchedule("linear", device=dev)
    gen = torch.Generator(dev)

    def loss():
        return regression_loss(student, schedule, pairs, (999, 749, 249), 16, gen, prediction="eps")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        loss()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(gen)
    with torch.cuda.graph(graph):
        captured = loss()
    gen.manual_seed(3)
    eager = loss()
    gen.manual_seed(3)
    graph.replay()
    torch.testing.assert_close(captured, eager)


def test_teacher_pairs_keep_the_ddim_state_at_each_later_student_timestep(student_run, tmp_path, monkeypatch):
    """The states are the inputs of the teacher's DDIM steps at 749 and 249 on each noise's own trajectory, in
    batches of 64 as in one batch (fp32, the CPU default without bf16 instructions, which batches do not change);
    the images equal the pairs without states; a grid that never steps from a student timestep is refused."""
    import fastdiff.runtime

    monkeypatch.setattr(fastdiff.runtime, "cpu_flags", lambda: frozenset({"avx2"}))
    from fastdiff.diffusion import make_timesteps
    from fastdiff.sampling import resolve_settings, sample
    from fastdiff.train.add_pairs import teacher_pairs

    teacher = load_run(student_run / "teacher", "cpu")
    cfg = apply_overrides(distill_config(teacher.config, str(student_run / "teacher")),
                          {"distill.regress_weight": 1.0, "distill.regress_steps": 4, "distill.regress_pairs": 70})
    one_batch = resolve_settings(teacher, "cpu", sampler="ddim", steps=4, eta=0.0, batch_size=128,
                                 guidance=cfg.distill.teacher_guidance)
    assert make_timesteps(1000, 4, one_batch.spacing).tolist() == [999, 749, 499, 249]
    with_states = teacher_pairs(teacher, cfg, tmp_path, device="cpu", states_at=(749, 249))
    plain = teacher_pairs(teacher, cfg, tmp_path, device="cpu")
    assert with_states.states.shape == (70, 2, 1, 8, 8) and with_states.states_at == (749, 249)
    torch.testing.assert_close(with_states.images, plain.images, atol=1e-5, rtol=0)
    assert torch.equal(with_states.seeds, plain.seeds) and torch.equal(with_states.labels, plain.labels)
    trajectory = []  # x after each step of one batch of all 70
    sample(teacher, one_batch, n=70, seed=PAIR_SEED, callback=lambda i, t, x, x0: trajectory.append(x.clone()))
    torch.testing.assert_close(with_states.states[:, 0], trajectory[0], atol=1e-5, rtol=0)  # after the 999 step
    torch.testing.assert_close(with_states.states[:, 1], trajectory[2], atol=1e-5, rtol=0)  # after the 499 step
    again = teacher_pairs(teacher, cfg, tmp_path, device="cpu", states_at=(749, 249))  # read from the cache
    assert torch.equal(again.states, with_states.states)
    with pytest.raises(ConfigError, match="never steps from student timesteps"):
        teacher_pairs(teacher, apply_overrides(cfg, {"distill.regress_steps": 3}), tmp_path, device="cpu",
                      states_at=(749, 249))


def _tiny_setup(train_backbone=False):
    torch.manual_seed(0)
    teacher = UNet(TINY_UNET).eval().requires_grad_(False)
    student = UNet(TINY_UNET)
    student.load_state_dict(teacher.state_dict())
    vit = ViT(ViTConfig(image_size=8, in_channels=1, patch_size=2, dim=16, depth=2, num_heads=2))
    disc = Discriminator(vit, 10, num_heads=2, width=8, train_backbone=train_backbone)
    return teacher, student, disc, NoiseSchedule("linear")


def test_generator_step_gradients_reach_only_the_student():
    teacher, student, disc, sched = _tiny_setup()
    g = torch.Generator().manual_seed(0)
    x0, labels = torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([1, 2, 3, 4])
    disc.set_trainable(False)
    x0_s, s = student_x0(student, sched, x0, labels, torch.tensor([999, 499]), g, prediction="v")
    assert set(s.tolist()) <= {999, 499}
    adv = hinge_generator_loss(discriminator_logits(disc, x0_s, labels, ("translation",), g))
    dist = distillation_loss(teacher, sched, x0_s, labels, g, prediction="v", t_min=0, t_max=999, guidance=2.0,
                             null_label=teacher.null_label)
    (adv + 2.5 * dist).backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is None for p in disc.parameters())


@pytest.mark.parametrize("train_backbone", [False, True])
def test_discriminator_step_gradients(train_backbone):
    teacher, student, disc, sched = _tiny_setup(train_backbone)
    g = torch.Generator().manual_seed(1)
    x_real, labels = torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([1, 2, 3, 4])
    x_fake = student_x0(student, sched, x_real, labels, torch.tensor([999]), g, prediction="v")[0]
    loss, parts = discriminator_loss(disc, x_real, x_fake, labels, g, augment=("translation", "cutout"),
                                     r1_gamma=1.0)
    loss.backward()
    assert parts["r1"] > 0 and torch.isfinite(loss)
    assert all(p.grad is not None for p in disc.heads.parameters())
    used = list(disc.backbone.blocks.parameters()) + list(disc.backbone.patch.parameters())  # not the final norm
    assert all((p.grad is not None) == train_backbone for p in used)
    assert all(p.grad is None for p in student.parameters()), "the fake images reach D detached"


def test_student_table_coefficients():
    sched = NoiseSchedule("linear")
    ts = student_timesteps((999, 749, 499, 249), 4)
    table = student_table(sched, ts, prediction="v")
    ab = sched.alphas_cumprod64
    p, q, A, B, sigma = table.coefs.double().unbind(1)
    ab_next = torch.cat([ab[ts[1:]], torch.ones(1, dtype=torch.float64)])
    torch.testing.assert_close(A, ab_next.sqrt(), check_dtype=False)
    torch.testing.assert_close(sigma, (1 - ab_next).sqrt(), check_dtype=False)
    assert B.abs().max() == 0 and A[-1] == 1 and sigma[-1] == 0
    assert student_timesteps((999, 749, 499, 249), 1).tolist() == [999]
    assert student_timesteps((999, 749, 499, 249), 2).tolist() == [999, 499]
    with pytest.raises(ConfigError, match="1 to 4 steps"):
        student_timesteps((999, 749, 499, 249), 5)
    with pytest.raises(ConfigError, match="strictly decreasing"):
        student_timesteps((249, 999))


def test_sampler_table_of_a_student_is_the_student_table():
    """The table the fast (graphed) sampler runs for `--sampler student` is the plain loop's."""
    sched = NoiseSchedule("linear")
    table = sampler_table(sched, "student", 2, prediction="v", trained_timesteps=(999, 749, 499, 249))
    ref = student_table(sched, torch.tensor([999, 499]), prediction="v")
    assert torch.equal(table.timesteps, ref.timesteps) and torch.equal(table.coefs, ref.coefs)


def test_student_sampler_renoises_the_x0_prediction():
    """An x0-model that always predicts c: every step re-noises c to the next timestep with the sample's own
    noise (mean sqrt(ab) c, variance 1 - ab), and the output after the last step is c exactly."""
    sched = NoiseSchedule("linear")
    c = 0.3
    seen = []

    def model(x, t, labels):
        seen.append((int(t[0]), x.clone()))
        return torch.full_like(x, c)

    seeds = seeds_for(0, 4096)
    x = sample_student(model, initial_noise(seeds, (1, 2, 2)), sched, steps=3, seeds=seeds, prediction="x0")
    torch.testing.assert_close(x, torch.full_like(x, c))
    assert [t for t, _ in seen] == [999, 749, 249]
    for t, xt in seen[1:]:
        ab = float(sched.alphas_cumprod64[t])
        assert abs(xt.mean().item() - ab**0.5 * c) < 0.03 and abs(xt.var().item() - (1 - ab)) < 0.03
    # Sample k's re-noising depends only on its seed: the first 3 again, alone, see the same inputs.
    full = [xt for _, xt in seen]
    seen.clear()
    sample_student(model, initial_noise(seeds[:3], (1, 2, 2)), sched, steps=3, seeds=seeds[:3], prediction="x0")
    for (_, xt), ref in zip(seen, full):
        torch.testing.assert_close(xt, ref[:3])


def test_eps_prediction_amplifies_x0_error_at_the_noisiest_step():
    """Why few-step students use v-prediction: at t = 999 of the linear schedule a unit error in the network
    output moves eps-prediction's x0 by sqrt(1-ab)/sqrt(ab) ~ 157, but v-prediction's by sqrt(1-ab) < 1."""
    ab = NoiseSchedule("linear").alphas_cumprod64[torch.tensor([999, 249])]
    _, q_eps = x0_coefficients("eps", ab)
    _, q_v = x0_coefficients("v", ab)
    assert q_eps[0].abs() > 150 and q_v.abs().max() < 1
    ab_z = NoiseSchedule("linear", zero_terminal_snr=True).alphas_cumprod64[999:]
    p, q = x0_coefficients("v", ab_z)  # zero terminal SNR: x0 = -v exactly
    assert p.item() == 0 and q.item() == -1
    with pytest.raises(ConfigError, match="zero terminal SNR"):
        x0_coefficients("eps", ab_z)


TINY = ["--batch-size", "16", "--log-every", "2", "--ckpt-every", "2", "--no-progress"]


@pytest.fixture(scope="module")
def student_run(tmp_path_factory):
    """A tiny v-prediction teacher (2 DDPM steps) and a student distilled from it for 2 steps on the CLI."""
    root = tmp_path_factory.mktemp("add")
    tiny = {"model.base_channels": 16, "model.num_groups": 4, "train.batch_size": 16, "train.steps": 2,
            "train.ckpt_every": 2, "diffusion.prediction": "v"}
    train_ddpm(apply_overrides(preset_config("digits"), tiny), root / "teacher", progress=False, echo=lambda s: None)
    assert main(["distill", "--teacher", str(root / "teacher"), "--out", str(root / "student"), "--steps", "2",
                 "--backbone-steps", "3", "--r1-gamma", "0.1", *TINY]) == 0
    return root


def test_distill_cli_end_to_end(student_run, capsys):
    run = student_run / "student"
    state = json.loads((ckpt.latest_checkpoint(run) / "state.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert state["kind"] == "add-student" and state["student_timesteps"] == [999, 749, 499, 249]
    assert config["distill"]["student_timesteps"] == [999, 749, 499, 249] and config["sample"]["sampler"] == "student"
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert {"g_adv", "distill", "d_loss", "r1", "d_real", "d_fake", "images_per_sec"} <= set(stats[-1])
    assert list((student_run / "teacher").glob("vit-digits-*.safetensors")), "the pretrained backbone is cached"
    grid = np.asarray(Image.open(run / "samples" / "step-000000002.png"))  # the student's 4-step EMA samples
    assert grid.shape == (4 * 65 + 1, 10 * 65 + 1) and grid.std() > 20
    # `fastdiff sample` on the student uses the few-step sampler by itself; --steps picks 1 to 4.
    capsys.readouterr()
    for steps, expected in ((None, 4), ("1", 1)):
        extra = ["--steps", steps] if steps else []
        assert main(["sample", "--checkpoint", str(run), "--n", "10", "--out", str(run / "s.png"), *extra]) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert result["sampler"] == "student" and result["steps"] == expected
        assert np.isfinite(np.load(run / "s.npz")["samples"]).all()


def test_distill_resume_continues_exactly(student_run):
    """Killed after step 1 (its config said 1) and resumed to 2 == 2 steps in one go; a trained random backbone
    and the regression loss on teacher pairs (sampled once, then read from the cache beside the teacher)."""
    root = student_run
    over = {"train.steps": 2, "train.batch_size": 8, "train.log_every": 1, "train.ckpt_every": 1,
            "distill.backbone": "none", "distill.backbone_dim": 16, "distill.backbone_depth": 2,
            "distill.backbone_heads": 2, "distill.disc_width": 8, "distill.r1_gamma": 0.1,
            "distill.regress_weight": 1.0, "distill.regress_pairs": 6, "distill.regress_steps": 2}
    cfg = apply_overrides(distill_config(load_run(root / "teacher", "cpu").config, str(root / "teacher")), over)
    quiet = dict(progress=False, echo=lambda s: None)
    train_add(cfg, root / "a", **quiet)
    train_add(apply_overrides(cfg, {"train.steps": 1}), root / "b", **quiet)
    train_add(cfg, root / "b", resume=True, **quiet)
    # the run recorded the teacher's checkpoint (a resume reads it again, whatever the teacher trains on to)
    teacher = str(ckpt.latest_checkpoint(root / "teacher").resolve())
    assert json.loads((root / "b" / "config.json").read_text())["distill"]["teacher"] == teacher
    a, b = ckpt.latest_checkpoint(root / "a"), ckpt.latest_checkpoint(root / "b")
    assert a.name == b.name == "step-000000002"
    for name in ("model", "ema", "disc", "optimizer", "disc_optimizer"):
        ta, tb = ckpt.load_tensors(a, name), ckpt.load_tensors(b, name)
        assert ta.keys() == tb.keys() and any(k.startswith("backbone.") for k in ckpt.load_tensors(a, "disc"))
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}.{k} differs after resume"
    assert "no backbone checkpoint" in (root / "a" / "log.txt").read_text()
    assert "sampling 6 teacher pairs" in (root / "a" / "log.txt").read_text()
    assert "teacher pairs" not in (root / "b" / "log.txt").read_text(), "b read the pairs a cached"
    pairs = ckpt.read_tensors(root / "teacher" / "pairs-ddim2-n6.safetensors")
    assert pairs["seeds"].tolist() == list(range(PAIR_SEED, PAIR_SEED + 6)) and pairs["labels"].tolist() == [
        0, 1, 2, 3, 4, 5]
    stats = [json.loads(line) for line in (root / "a" / "stats.jsonl").read_text().splitlines()]
    assert all(s["regress"] > 0 for s in stats)


@pytest.mark.parametrize("args, message", [
    (["distill", "--out", "{tmp}/s"], "needs --teacher"),
    (["distill", "--teacher", "{tmp}/missing", "--out", "{tmp}/s"], "does not exist"),
    (["distill", "--teacher", "{root}/student", "--out", "{tmp}/s"], "is itself an ADD student"),
    (["distill", "--teacher", "{root}/teacher", "--out", "{tmp}/s", "--backbone", "{tmp}/none.pth", *TINY],
     "backbone file"),
    (["distill", "--out", "{root}/student", "--resume", "--r1-gamma", "1"], "cannot change on --resume"),
    (["sample", "--checkpoint", "{root}/teacher", "--sampler", "student", "--out", "{tmp}/x.png"],
     "not an ADD student run"),
    (["sample", "--checkpoint", "{root}/student", "--steps", "5", "--out", "{tmp}/x.png"], "1 to 4 steps"),
])
def test_distill_errors_are_one_line(args, message, student_run, tmp_path, capsys):
    args = [a.format(tmp=tmp_path, root=student_run) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_refiner_trains_and_applies(student_run, capsys, monkeypatch):
    import fastdiff.train.refiner

    run, ref = student_run / "student", student_run / "refiner"
    sampled = []
    real_sample = fastdiff.train.refiner.sample
    monkeypatch.setattr(fastdiff.train.refiner, "sample", lambda denoiser, settings, **kw: (
        sampled.append((denoiser.config.is_student, settings.sampler, settings.steps)),
        real_sample(denoiser, settings, **kw))[1])
    assert main(["train-refiner", "--checkpoint", str(run), "--out", str(ref), "--steps", "3", "--batch-size", "8",
                 "--base-channels", "8", "--pairs", "16"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["step"] == 3 and np.isfinite(record["loss"])
    # A student's refiner learns its 1-step samples (this student samples 4 steps by default) -> its teacher's
    # samples of the same noises (cached in the run).
    assert sampled == [(True, "student", 1)]
    assert json.loads((ref / "config.json").read_text())["refiner"]["inputs"] == "samples"
    from fastdiff.sampling import load_run
    from fastdiff.sources import model_fingerprint

    assert json.loads((ref / "config.json").read_text())["refiner"]["generator_weights"] == model_fingerprint(
        load_run(run, "cpu").model)
    assert [p.name for p in ref.glob("pairs-*.safetensors")] == [f"pairs-ddim20-n16-seed{1 << 32}.safetensors"]
    noised = student_run / "refiner-noised"
    assert main(["train-refiner", "--checkpoint", str(run), "--out", str(noised), "--steps", "1", "--batch-size",
                 "8", "--base-channels", "8", "--inputs", "noised"]) == 0
    assert json.loads((noised / "config.json").read_text())["refiner"]["inputs"] == "noised"
    capsys.readouterr()
    assert main(["train-refiner", "--checkpoint", str(student_run / "teacher"), "--out", str(student_run / "r-t"),
                 "--steps", "1", "--inputs", "samples"]) == 2
    err = capsys.readouterr().err
    assert "needs an ADD student" in err and len(err.strip().splitlines()) == 1
    assert main(["sample", "--checkpoint", str(run), "--n", "4", "--refine", str(ref), "--out",
                 str(ref / "r.png")]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["refiner"] == str(ref) and "warning" not in err
    # applied to another model of the same shape (here the teacher), it was silent: one line, and the samples
    assert main(["sample", "--checkpoint", str(student_run / "teacher"), "--n", "4", "--refine", str(ref), "--out",
                 str(ref / "t.png")]) == 0
    err = capsys.readouterr().err
    assert err.count(f"fastdiff sample: warning: the refiner {ref} was trained on the samples of other weights (") == 1
    assert "train a refiner for this model" in err and "Traceback" not in err and (ref / "t.png").exists()
    assert main(["sample", "--checkpoint", str(run), "--n", "4", "--refine", str(run), "--out",
                 str(ref / "r.png")]) == 2
    assert "not a refiner run" in capsys.readouterr().err


def test_refiner_resume_continues_exactly(student_run, capsys):
    """A refiner killed after its checkpoint of step 2 and resumed == 3 steps in one go. (The kill is made by
    deleting the last checkpoint: the one-cycle learning rate depends on the total steps, so a run configured
    for 2 steps and extended to 3 is another run.)"""
    run = student_run / "student"
    common = ["--checkpoint", str(run), "--batch-size", "8", "--base-channels", "8", "--ckpt-every", "1",
              "--log-every", "1", "--no-progress", "--pairs", "16"]
    a, b = student_run / "refiner-a", student_run / "refiner-b"
    assert main(["train-refiner", "--out", str(a), "--steps", "3", *common]) == 0
    assert main(["train-refiner", "--out", str(b), "--steps", "3", *common]) == 0
    shutil.rmtree(ckpt.latest_checkpoint(b))
    # The generator trains on before the resume: a newer checkpoint (other weights). The refiner recorded the
    # checkpoint it started from, and resumes with it, not with the newer one.
    pinned = json.loads((b / "config.json").read_text())["refiner"]["generator"]
    assert pinned == str(ckpt.latest_checkpoint(run).resolve())
    newer = ckpt.save_checkpoint(run, 10**6, tensors={n: {k: v * 1.5 for k, v in ckpt.load_tensors(pinned, n).items()}
                                                      for n in ("model", "ema")},
                                 state=ckpt.load_json(pinned, "state"), config=ckpt.load_json(pinned, "config"),
                                 keep=0)
    try:
        assert main(["train-refiner", "--out", str(b), "--resume", "--steps", "3", "--no-progress"]) == 0
    finally:
        shutil.rmtree(newer)
    assert main(["train-refiner", "--out", str(b), "--resume", "--batch-size", "4"]) == 2
    assert "--batch-size cannot change on --resume" in capsys.readouterr().err
    # --amp may change, as for train and distill (a refiner trained in fp16 on a GPU goes on on a CPU): refused
    assert main(["train-refiner", "--out", str(b), "--resume", "--amp", "fp32", "--no-progress"]) == 0
    assert "already finished at step 3" in capsys.readouterr().err
    pa, pb = ckpt.latest_checkpoint(a), ckpt.latest_checkpoint(b)
    assert pa.name == pb.name == "step-000000003"
    for name in ("model", "optimizer"):
        ta, tb = ckpt.load_tensors(pa, name), ckpt.load_tensors(pb, name)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}.{k} differs after resume"
    stats = [json.loads(line) for line in (b / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in stats] == [1, 2, 3] and all(r["unrefined_loss"] > 0 for r in stats)


def test_a_student_is_the_same_whether_its_backbone_and_pairs_were_cached(student_run, tmp_path):
    """Pretraining the ViT backbone and sampling the teacher pairs leave the run's random state alone: students a
    (backbone cached by the fixture, pairs made), b (both made) and c (both read from b's cache) are the same."""
    fresh = tmp_path / "teacher"
    shutil.copytree(student_run / "teacher", fresh)
    for f in [*fresh.glob("vit-*"), *fresh.glob("pairs-*")]:
        f.unlink()
    args = ["--steps", "1", "--backbone-steps", "3", "--r1-gamma", "0.1", "--regress-weight", "1", "--regress-pairs",
            "4", "--regress-steps", "4", "--regress-at", "all", *TINY]
    assert main(["distill", "--teacher", str(student_run / "teacher"), "--out", str(tmp_path / "a"), *args]) == 0
    assert main(["distill", "--teacher", str(fresh), "--out", str(tmp_path / "b"), *args]) == 0  # makes its own
    assert main(["distill", "--teacher", str(fresh), "--out", str(tmp_path / "c"), *args]) == 0  # reads them
    assert "pretraining the ViT" in (tmp_path / "b" / "log.txt").read_text()
    assert "pretraining the ViT" not in (tmp_path / "c" / "log.txt").read_text()
    for run in ("b", "c"):
        for name in ("model", "disc"):
            ta = ckpt.load_tensors(ckpt.latest_checkpoint(tmp_path / "a"), name)
            tb = ckpt.load_tensors(ckpt.latest_checkpoint(tmp_path / run), name)
            assert all(torch.equal(ta[k], tb[k]) for k in ta), f"{run}: {name} differs"


def test_caches_go_beside_a_local_teacher_and_into_the_users_cache_for_a_shipped_one(student_run, tmp_path,
                                                                                      monkeypatch):
    # A shipped teacher's backbone and pairs went into the student's run, so every new student of it (each
    # `make distill-demo`, which starts its student afresh) spent ~15 minutes making them again
    from fastdiff.config import ADDConfig
    from fastdiff.train.add import cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir(ADDConfig(teacher=str(student_run / "teacher"))) == student_run / "teacher"
    assert cache_dir(ADDConfig(teacher="pretrained:mnist")) == tmp_path / "fastdiff" / "mnist"  # not the package


def test_distill_table_targets_are_the_issues():
    """4 steps within 1.3x the teacher's DDIM-50 and 1 step within 1.5x, each with >= 97% accuracy; each student
    sampler and the refined rows are checked apart."""
    from fastdiff.distill_table import targets

    def row(model, sampler, steps, fd, acc=0.99, refined=False):
        return {"model": model, "sampler": sampler, "steps": steps, "fd_cls": fd, "cond_accuracy": acc,
                "refined": refined}

    records = [row("teacher", "ddim", 50, 1.0), row("teacher", "ddim", 4, 3.0), row("student", "student", 1, 1.5),
               row("student", "student", 4, 1.31), row("student", "ddim", 4, 1.2, acc=0.969),
               row("student", "student", 1, 1.2, acc=0.96, refined=True),
               row("student", "student", 4, 1.3, refined=True)]
    assert targets(records) == {"student4_student_within_1.3x_teacher50_acc97": False,
                                "student1_student_within_1.5x_teacher50_acc97": True,
                                "student4_ddim_within_1.3x_teacher50_acc97": False,
                                "student4_student_within_1.3x_teacher50_acc97_refined": True,
                                "student1_student_within_1.5x_teacher50_acc97_refined": False}


def test_a_student_samples_ddim_only_on_its_own_timesteps(student_run):
    """Trailing DDIM at 1, 2 or 4 steps visits only the student's timesteps 999, 749, 499, 249; 3 steps (999, 666,
    332) or DDPM's 1000 would run it where it was not trained, and are refused with the step counts that fit."""
    from fastdiff.sampling import resolve_settings

    student = load_run(student_run / "student", "cpu")
    for steps in (1, 2, 4):
        assert resolve_settings(student, sampler="ddim", steps=steps, eta=0.7).steps == steps
    for sampler, steps in (("ddim", 3), ("ddpm", 1000)):
        with pytest.raises(ConfigError, match="--steps 1 or 2 or 4 \\(trailing spacing\\)"):
            resolve_settings(student, sampler=sampler, steps=steps)
    with pytest.raises(ConfigError, match="another --spacing"):
        resolve_settings(student, sampler="ddim", steps=2, spacing="leading")


def test_shipping_a_student_alone_needs_it_to_distil_the_shipped_teacher(student_run, tmp_path, capsys):
    from fastdiff.interop import pretrained

    assert pretrained.main(["--student", str(student_run / "student"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not pretrained:mnist; ship its teacher with it (--teacher RUN)" in err and len(err.splitlines()) == 1
    assert not list(tmp_path.iterdir()), "nothing was written"


def test_distill_table_rows_fit_the_students_timesteps(student_run):
    """The table's student rows follow its timesteps: 1, 2 and 4 steps and DDIM at 2 and 4 for 999, 749, 499,
    249, where a student of 2 or 3 timesteps made every table fail at its 4-step row."""
    import dataclasses

    from fastdiff.distill_table import student_rows

    student = load_run(student_run / "student", "cpu")
    assert student_rows(student) == ([1, 2, 4], [2, 4])
    assert student_rows(dataclasses.replace(student, student_timesteps=(999, 499))) == ([1, 2], [2])
    assert student_rows(dataclasses.replace(student, student_timesteps=(999, 666, 332))) == ([1, 2, 3], [3])
    assert student_rows(dataclasses.replace(student, student_timesteps=(999, 666, 332)), spacing="leading") == (
        [1, 2, 3], [])
    assert student_rows(student, [1], [4]) == ([1], [4])


def test_teacher_guidance_needs_a_null_class_the_teacher_trained():
    # The distillation loss guided the teacher against its null label, random where it trained with p_uncond 0
    from fastdiff.config import distill_config
    from fastdiff.train.add import check_teacher

    tcfg = apply_overrides(preset_config("digits-v"), {"train.p_uncond": 0.0, "sample.guidance": 1.0})
    cfg = distill_config(tcfg, "teacher")
    check_teacher(tcfg, cfg, "teacher")
    with pytest.raises(ConfigError, match="--teacher-guidance 2 guides the teacher teacher against its null class"):
        check_teacher(tcfg, apply_overrides(cfg, {"distill.teacher_guidance": 2.0}), "teacher")
    check_teacher(preset_config("digits-v"), apply_overrides(distill_config(preset_config("digits-v"), "teacher"),
                                                              {"distill.teacher_guidance": 2.0}), "teacher")


def test_teacher_pairs_are_made_again_when_the_teachers_weights_change_in_place(student_run, tmp_path):
    # The cache was keyed by the teacher's folder: a pretrained model re-shipped under its name, or a run trained
    # again into the same directory, gave its students the old weights' samples
    from fastdiff.train.add_pairs import teacher_pairs

    folder = tmp_path / "teacher"
    shutil.copytree(ckpt.latest_checkpoint(student_run / "teacher"), folder)
    cfg = apply_overrides(distill_config(load_run(folder, "cpu").config, str(folder)),
                          {"distill.regress_weight": 1.0, "distill.regress_steps": 2, "distill.regress_pairs": 4})
    first = teacher_pairs(load_run(folder, "cpu"), cfg, tmp_path, device="cpu")
    assert torch.equal(teacher_pairs(load_run(folder, "cpu"), cfg, tmp_path, device="cpu").images, first.images)
    ckpt.save_tensors(folder / "ema.safetensors", {k: v * 0.5 for k, v in ckpt.read_tensors(folder /
                                                                                          "ema.safetensors").items()})
    cached = next(tmp_path.glob("pairs-*.safetensors"))
    old_weights_file = cached.read_bytes()
    again = teacher_pairs(load_run(folder, "cpu"), cfg, tmp_path, device="cpu")
    assert not torch.equal(again.images, first.images)
    # What the pairs are of is inside their one file: a kill -9 between the pairs and a .json beside them (or two
    # distillations writing the cache at once) left the new weights' description beside the old weights' pairs,
    # which were then read as the new ones'. Here the old weights' file comes back under the cache's name.
    assert [p.name for p in tmp_path.glob("pairs-*")] == [cached.name]
    cached.write_bytes(old_weights_file)
    assert torch.equal(teacher_pairs(load_run(folder, "cpu"), cfg, tmp_path, device="cpu").images, again.images)


def test_caches_are_made_by_one_process_at_a_time(student_run, tmp_path, monkeypatch, lock_is_held):
    """Two distillations or evaluations started together each sampled the same teacher pairs, or trained the same
    ViT backbone or evaluation classifier, and wrote the cache twice. Each is now made under a lock that the other
    waits for; it then reads the first one's cache."""
    from fastdiff import evaluate
    from fastdiff.data import load_dataset
    from fastdiff.models import vit
    from fastdiff.train import add_pairs

    held = []

    def recording(real, key):
        def run(*args, **kwargs):
            held.append(lock_is_held("cache", key()))
            return real(*args, **kwargs)
        return run

    folder = ckpt.latest_checkpoint(student_run / "teacher")
    cfg = apply_overrides(distill_config(load_run(folder, "cpu").config, str(folder)),
                          {"distill.regress_weight": 1.0, "distill.regress_steps": 2, "distill.regress_pairs": 4})
    monkeypatch.setattr(add_pairs, "_sample_pairs", recording(add_pairs._sample_pairs,
                                                              lambda: tmp_path / "pairs-ddim2-n4.safetensors"))
    add_pairs.teacher_pairs(load_run(folder, "cpu"), cfg, tmp_path, device="cpu")
    digits = load_dataset("digits")
    monkeypatch.setattr(evaluate, "train_classifier", recording(
        evaluate.train_classifier, lambda: evaluate.classifier_path(tmp_path, digits, 3)))
    evaluate.load_or_train_classifier(digits, tmp_path, steps=3)
    vcfg = vit.ViTConfig(image_size=8, in_channels=1, patch_size=4, dim=16, depth=1, num_heads=2, num_classes=10)
    monkeypatch.setattr(vit, "pretrain_vit", recording(vit.pretrain_vit,
                                                       lambda: tmp_path / "vit-digits-1x8-p4d16x1.safetensors"))
    vit.load_or_pretrain_vit(digits, tmp_path, vcfg, steps=2)
    assert held == [True, True, True]
    assert not any(lock_is_held("cache", p) for p in tmp_path.glob("*.safetensors"))  # and released


def test_a_samples_refiner_reads_the_teachers_newest_when_its_pinned_one_was_pruned(student_run, tmp_path,
                                                                                    capsys):
    # It failed ("checkpoint ... does not exist") once the student's teacher run had pruned the checkpoint the
    # student was distilled from, even for a new refiner run
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    shutil.copytree(student_run / "teacher", teacher)
    shutil.copytree(student_run / "student", student)
    pruned = str(teacher / "checkpoints" / "step-000000001")
    for config in [student / "config.json", *student.glob("checkpoints/*/config.json")]:
        d = json.loads(config.read_text())
        d["distill"]["teacher"] = pruned
        config.write_text(json.dumps(d))
    assert main(["train-refiner", "--checkpoint", str(student), "--out", str(tmp_path / "refiner"), "--steps", "1",
                 "--batch-size", "8", "--base-channels", "8", "--pairs", "8", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"the checkpoint {pruned} that the student was distilled from is gone" in err
    assert str(ckpt.latest_checkpoint(teacher).resolve()) in err


@pytest.mark.parametrize("refiner, message", [
    ({"base_channels": 0}, "refiner.base_channels must be in [1, inf), got 0"),
    ({"channel_mult": []}, "refiner.channel_mult is empty"),
    ({"channel_mult": [1, 0]}, "refiner.channel_mult must be in [1, inf), got 0"),
    ({"t_max": "5"}, "refiner.t_max must be"),
    ({"pairs": 0}, "refiner.pairs must be in [1, inf), got 0"),
    ({"channel_mult": [1, 2, 2, 2, 2]}, "halve the generator's 8px images 4 times"),
    ({"t_max": 5000}, "t_max (5000) < 1000"),
    ({"pairs": 8}, "refiner: pairs 8 set, which inputs 'noised' do not use (only 'samples' pairs do)"),  # ignored
])
def test_refiner_settings_are_one_error_before_the_run(student_run, tmp_path, refiner, message):
    # Tracebacks (torch's conv errors, a TypeError at t_max "5") or silence (an empty channel_mult), and the dry
    # run checked none of them
    from fastdiff.train.refiner import RefinerConfig, train_refiner

    cfg = RefinerConfig(generator=str(student_run / "teacher"), **refiner)
    with pytest.raises(ConfigError, match=re.escape(message)):
        train_refiner(cfg, tmp_path / "r", progress=False, echo=lambda s: None)
    assert not (tmp_path / "r").exists()


def test_a_resumed_refiner_keeps_settings_its_inputs_do_not_read(student_run, tmp_path):
    """Refused for a new run, such settings were accepted before; a run given them passes the check a resume
    makes (resolve_refiner with resume)."""
    from fastdiff.train.refiner import RefinerConfig, resolve_refiner

    teacher = str(ckpt.latest_checkpoint(student_run / "teacher").resolve())
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text(json.dumps(RefinerConfig(generator=teacher, pairs=8).to_dict()))
    assert resolve_refiner(RefinerConfig(generator=teacher, pairs=8), tmp_path / "r", resume=True)[0].pairs == 8
    with pytest.raises(ConfigError, match="pairs 8 set, which inputs 'noised' do not use"):
        resolve_refiner(RefinerConfig(generator=teacher, pairs=8), tmp_path / "new")


def test_refiner_dry_run_makes_the_runs_checks(student_run, tmp_path, capsys):
    common = ["train-refiner", "--checkpoint", str(student_run / "student"), "--out", str(tmp_path / "r")]
    assert main([*common, "--t-max", "5000", "--dry-run"]) == 2
    assert "t_max (5000) < 1000" in capsys.readouterr().err
    assert main([*common, "--dry-run"]) == 0  # the resolved config: the generator pinned, the student's inputs
    cfg = json.loads(capsys.readouterr().out)["refiner"]
    assert cfg["generator"] == str(ckpt.latest_checkpoint(student_run / "student").resolve())
    assert cfg["inputs"] == "samples" and cfg["t_max"] is None and not (tmp_path / "r").exists()
    # a DDPM generator's noised inputs: the t_max the run trains at (half its timesteps), not null
    teacher = ["train-refiner", "--checkpoint", str(student_run / "teacher"), "--out", str(tmp_path / "r")]
    assert main([*teacher, "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["refiner"]["t_max"] == 500


def test_a_run_is_resumed_only_by_the_command_that_trains_it(student_run, tmp_path, capsys):
    """train --resume on a student went on as a DDPM run (its next checkpoint kind "ddpm", no discriminator, and
    distill --resume then called it corrupt); distill --resume on a DDPM run was an AttributeError traceback."""
    student, teacher = tmp_path / "student", tmp_path / "teacher"
    shutil.copytree(student_run / "student", student)
    shutil.copytree(student_run / "teacher", teacher)
    before = {p: p.read_bytes() for p in sorted(student.rglob("*")) if p.is_file()}
    cases = [(["train", "--out", str(student), "--resume", "--steps", "4"], student, "fastdiff distill"),
             (["train", "--out", str(student), "--resume", "--steps", "4", "--dry-run"], student, "fastdiff distill"),
             (["distill", "--out", str(teacher), "--resume", "--steps", "4"], teacher, "fastdiff train"),
             (["train-refiner", "--out", str(teacher), "--resume", "--steps", "4"], teacher, "fastdiff train")]
    for argv, run_dir, command in cases:
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{run_dir} is a run of {command}, not of fastdiff {argv[0]}" in err, err
        assert f"resume it with {command} --out {run_dir} --resume" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in sorted(student.rglob("*")) if p.is_file()} == before
    # the Python API, given a config of another kind, stops before it sets aside, truncates or rewrites anything
    # (it rewrote config.json, then refused after the setup, and the right command was refused after that)
    from fastdiff.config import load_config
    from fastdiff.train.refiner import RefinerConfig, train_refiner

    cfg = apply_overrides(load_config(teacher / "config.json"), {"train.steps": 4})
    with pytest.raises(ConfigError, match=f"{student} is a run of fastdiff distill, not of fastdiff train; resume it "
                                          f"with fastdiff distill --out {student} --resume"):
        train_ddpm(cfg, student, resume=True, progress=False, echo=lambda s: None)
    assert {p: p.read_bytes() for p in sorted(student.rglob("*")) if p.is_file()} == before
    teacher_files = {p: p.read_bytes() for p in sorted(teacher.rglob("*")) if p.is_file()}
    with pytest.raises(ConfigError, match="is a run of fastdiff train, not of fastdiff train-refiner"):
        train_refiner(RefinerConfig(generator=str(teacher)), teacher, resume=True, progress=False,
                      echo=lambda s: None)
    assert {p: p.read_bytes() for p in sorted(teacher.rglob("*")) if p.is_file()} == teacher_files


def test_regress_steps_beyond_the_teachers_timesteps_are_refused_before_the_run(student_run, tmp_path, capsys):
    """They passed --dry-run, then failed at setup with "steps=5000 must be between 1 and the 1000 training
    timesteps" (no flag named), a run folder left behind."""
    for extra in (["--dry-run"], []):
        capsys.readouterr()
        assert main(["distill", "--teacher", str(student_run / "teacher"), "--out", str(tmp_path / "s"),
                     "--regress-weight", "1", "--regress-steps", "5000", *extra]) == 2
        assert "distill.regress_steps 5000 must be in [1, 1000]" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_a_student_whose_teacher_moved_says_where_it_was(student_run, tmp_path, capsys):
    """Its resume said only "checkpoint .../teacher does not exist; pass a run directory", and --teacher is refused
    on a resume."""
    shutil.copytree(student_run / "student", tmp_path / "student")
    shutil.copytree(student_run / "teacher", tmp_path / "teacher")
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    pinned = config["distill"]["teacher"].replace(str(student_run), str(tmp_path))
    (tmp_path / "student" / "config.json").write_text(json.dumps({**config, "distill": {**config["distill"],
                                                                                         "teacher": pinned}}))
    (tmp_path / "teacher").rename(tmp_path / "moved")
    assert main(["distill", "--out", str(tmp_path / "student"), "--resume", "--steps", "3", *TINY]) == 2
    err = capsys.readouterr().err
    assert f"the checkpoint {pinned} this run started from is gone with its run {tmp_path / 'teacher'}; move that " \
           "run back there" in err, err


def test_a_backbone_size_without_a_backbone_file_is_refused(student_run, tmp_path, capsys):
    assert main(["distill", "--teacher", str(student_run / "teacher"), "--out", str(tmp_path / "s"),
                 "--backbone-size", "32", "--dry-run"]) == 2
    assert "distill.backbone_size 32 applies to a backbone file only" in capsys.readouterr().err
    # a student given it before the check (which ignored it) still loads: its config (what sample, eval, export
    # and a resume read first) passes
    from fastdiff.config import load_config

    config = json.loads((student_run / "student" / "config.json").read_text())
    config["distill"]["backbone_size"] = 32
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_config(tmp_path / "config.json").distill.backbone_size == 32


def test_a_student_given_a_setting_before_its_check_still_resumes(student_run, tmp_path, capsys):
    """The saved config loaded leniently, but a resume rebuilt it with the flags as a new run's and refused it:
    "distill.backbone_size 32 applies to a backbone file only"."""
    run = tmp_path / "student"
    shutil.copytree(student_run / "student", run)
    for saved in (run / "config.json", *run.glob("checkpoints/step-*/config.json")):  # such a run's, everywhere
        config = json.loads(saved.read_text())
        config["distill"]["backbone_size"] = 32
        saved.write_text(json.dumps(config))
    assert main(["distill", "--out", str(run), "--resume", "--steps", "4", *TINY]) == 0, capsys.readouterr().err
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 4


def test_distill_table_takes_the_ddim_rows_eta_and_spacing(tmp_path, capsys):
    """--eta and --spacing were passed to the student sampler's rows too, which refuse both: every table given
    either failed there ("eta=0.3 applies to --sampler ddim only, not student")."""
    from fastdiff import distill_table

    assert distill_table.main(["--teacher", "pretrained:mnist", "--student", "pretrained:mnist-student", "--n", "16",
                               "--eta", "0.3", "--spacing", "trailing", "--no-progress",
                               "--out", str(tmp_path / "t.md")]) == 0, capsys.readouterr().err
    table = (tmp_path / "t.md").read_text()
    assert "| student | student | 1 |" in table and "eta 0.3" in table


def test_a_student_without_the_adversarial_loss_builds_no_discriminator(student_run, tmp_path, capsys):
    """--adv-weight 0 (distillation alone): no discriminator is built or pretrained, the checkpoints hold the student
    alone, the stats have no discriminator columns, and a resume continues exactly. Options only the discriminator
    reads are refused with it."""
    root = student_run
    over = {"train.steps": 2, "train.batch_size": 8, "train.log_every": 1, "train.ckpt_every": 1,
            "distill.adv_weight": 0.0}
    cfg = apply_overrides(distill_config(load_run(root / "teacher", "cpu").config, str(root / "teacher")), over)
    logs: list[str] = []
    train_add(cfg, tmp_path / "a", progress=False, echo=logs.append)
    train_add(apply_overrides(cfg, {"train.steps": 1}), tmp_path / "b", progress=False, echo=lambda s: None)
    train_add(cfg, tmp_path / "b", resume=True, progress=False, echo=lambda s: None)
    a, b = ckpt.latest_checkpoint(tmp_path / "a"), ckpt.latest_checkpoint(tmp_path / "b")
    assert not list(a.glob("disc*")) and {p.name for p in a.glob("*.safetensors")} >= {"model.safetensors",
                                                                                      "ema.safetensors"}
    for name in ("model", "ema", "optimizer"):
        ta, tb = ckpt.load_tensors(a, name), ckpt.load_tensors(b, name)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
    assert any("--adv-weight 0: no discriminator" in line for line in logs)
    assert any("no discriminator (adv_weight 0)" in line for line in logs)  # the run's description
    stats = [json.loads(line) for line in (tmp_path / "a" / "stats.jsonl").read_text().splitlines()]
    assert {"loss", "distill", "regress"} <= set(stats[-1]) and not {"g_adv", "d_loss", "r1"} & set(stats[-1])
    capsys.readouterr()
    assert main(["distill", "--teacher", str(root / "teacher"), "--out", str(tmp_path / "c"), "--adv-weight", "0",
                 "--r1-gamma", "0.5", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "r1_gamma 0.5 set, which only the discriminator reads" in err and "--adv-weight" in err
    assert "Traceback" not in err and not (tmp_path / "c").exists()
    assert set(DISCRIMINATOR_KEYS) <= {f.name for f in dataclasses.fields(ADDConfig)}


def test_distill_table_runs_the_students_refiner_on_the_teachers_rows_without_a_warning(tmp_path, recwarn):
    """The teacher's refined rows use the student's refiner on purpose; each printed "the refiner ... was trained on
    the samples of other weights" (every `make distill-demo`). A student's own refined rows keep the check."""
    from fastdiff import distill_table
    from fastdiff.errors import FastdiffWarning

    assert distill_table.main(["--teacher", "pretrained:mnist", "--student", "pretrained:mnist-student", "--refiner",
                               "pretrained:mnist-student-refiner", "--n", "8", "--no-progress",
                               "--out", str(tmp_path / "t.md")]) == 0
    assert "| teacher | ddim (guidance 1.5) | 50 | yes |" in (tmp_path / "t.md").read_text()
    assert not [w for w in recwarn if issubclass(w.category, FastdiffWarning)], [str(w.message) for w in recwarn]
