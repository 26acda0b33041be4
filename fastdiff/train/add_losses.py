"""The losses of Adversarial Diffusion Distillation (Sauer et al. 2023, Section 3).

Student: from a real image noised to a student timestep s, predict x0_s. Its loss is
    L_G = adv_weight * L_adv + distill_weight * c(t) * ||x0_s - sg(x0_teacher(x_t, t))||^2
(+ regress_weight * `regression_loss` where asked), with L_adv = -D(x0_s) (hinge generator loss) and
x_t = sqrt(ab_t) sg(x0_s) + sqrt(1 - ab_t) eps the student's output re-noised to a teacher timestep t.
Discriminator: L_D = E[relu(1 - D(real))] + E[relu(1 + D(sg(fake)))] + r1_gamma / 2 * E ||dD(real) / d(head
inputs)||^2. D is a sum of per-token logits over the heads, and both real and generated images pass the same
(differentiable) augmentation before it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdiff.diffusion.parameterization import to_x0
from fastdiff.diffusion.samplers import guided, initial_noise
from fastdiff.errors import ConfigError
from fastdiff.models.discriminator import Discriminator, diff_augment
from fastdiff.runtime import autocast

WEIGHTINGS = ("sqrt_ab", "ab", "snr", "none")


def c_of_t(weighting: str, ab: torch.Tensor) -> torch.Tensor:
    """The distillation weight c(t): sqrt(alphas_cumprod) (ADD's default), alphas_cumprod, SNR or 1."""
    if weighting == "sqrt_ab":
        return ab.sqrt()
    if weighting == "ab":
        return ab
    if weighting == "snr":
        return ab / (1 - ab).clamp(min=1e-8)
    if weighting == "none":
        return torch.ones_like(ab)
    raise ConfigError(f"unknown distillation weighting {weighting!r}; use one of {', '.join(WEIGHTINGS)}")


def student_x0(student, schedule, x0, labels, timesteps: torch.Tensor, gen, *, prediction: str,
               amp: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Noise real images to student timesteps drawn from `timesteps`; return the student's x0 and those s."""
    b, device = x0.shape[0], x0.device
    s = timesteps[torch.randint(0, len(timesteps), (b,), device=device, generator=gen)]
    eps = torch.randn(x0.shape, device=device, generator=gen)
    x_s = schedule.add_noise(x0, eps, s)
    with autocast(device, amp):
        out = student(x_s, s, labels)
    ab = schedule.alphas_cumprod[s].view(-1, 1, 1, 1)
    return to_x0(prediction, x_s, out.float(), ab), s


def distillation_loss(teacher, schedule, x0_student, labels, gen, *, prediction: str, t_min: int, t_max: int,
                      guidance: float = 1.0, null_label: int | None = None, weighting: str = "sqrt_ab",
                      amp: str = "fp32") -> torch.Tensor:
    """mean_b c(t_b) * mean_pixels (x0_student - sg(x0_teacher))^2 with the student's output re-noised to t_b.

    The teacher sees sg(x0_student) re-noised, runs without gradients, and its x0 is clamped to the data range.
    """
    b, device = x0_student.shape[0], x0_student.device
    if not 0 <= t_min <= t_max < schedule.num_timesteps:
        raise ConfigError(f"teacher timesteps [{t_min}, {t_max}] must lie in 0..{schedule.num_timesteps - 1}")
    t = torch.randint(t_min, t_max + 1, (b,), device=device, generator=gen)
    eps = torch.randn(x0_student.shape, device=device, generator=gen)
    x_t = schedule.add_noise(x0_student.detach(), eps, t)
    ab = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    with torch.no_grad(), autocast(device, amp):
        out = guided(teacher, x_t, t, labels, guidance, null_label)
    with torch.no_grad():
        target = to_x0(prediction, x_t, out.float(), ab).clamp(-1, 1)
    per_sample = (x0_student - target).pow(2).mean(dim=(1, 2, 3))
    return (c_of_t(weighting, ab.view(-1)) * per_sample).mean()


def regression_loss(student, schedule, pairs, timesteps, batch: int, gen, *, prediction: str,
                    amp: str = "fp32", memory_format=torch.contiguous_format) -> torch.Tensor:
    """mean ||x0_student(input, t) - teacher sample of z||^2 over `batch` pairs drawn from `pairs` (DMD's regression
    loss). Without pair states the input is a pair's pure noise z at the first student timestep, as the few-step
    sampler feeds it; with them (`Pairs.states_at`, the later student timesteps) each pair draws one of the
    student timesteps `timesteps` uniformly, and at a later one the input is the teacher's DDIM state of z there.
    The input is built in `memory_format`, the run's layout, as the student's other inputs come."""
    device = pairs.images.device
    idx = torch.randint(0, len(pairs.seeds), (batch,), device=device, generator=gen)
    x = initial_noise(pairs.seeds[idx], pairs.images.shape[1:], device)
    labels = pairs.labels[idx] if pairs.labels is not None else None
    ts = torch.full((batch,), int(timesteps[0]), device=device, dtype=torch.long)
    if pairs.states is not None:
        if tuple(int(t) for t in timesteps[1:]) != pairs.states_at:
            raise ConfigError(f"the pairs hold states at t={list(pairs.states_at)}, not at the student's later "
                              f"timesteps {[int(t) for t in timesteps[1:]]}")
        k = torch.randint(0, len(timesteps), (batch,), device=device, generator=gen)
        later = k > 0
        x = torch.where(later.view(-1, 1, 1, 1), pairs.states[idx, (k - 1).clamp(min=0)], x)
        # The timestep of draw k without a host-to-device copy of the table, which a CUDA graph capture (the
        # student step's default on a GPU) does not allow.
        for j, t in enumerate(timesteps[1:], start=1):
            ts = torch.where(k == j, int(t), ts)
    x = x.contiguous(memory_format=memory_format)
    with autocast(device, amp):
        out = student(x, ts, labels)
    x0 = to_x0(prediction, x, out.float(), schedule.alphas_cumprod[ts].view(-1, 1, 1, 1))
    return (x0 - pairs.images[idx]).pow(2).mean()


def hinge_generator_loss(fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """-E[D(fake)], with D's per-token logits averaged over tokens and heads."""
    return -torch.stack([lg.float().mean() for lg in fake_logits]).mean()


def hinge_discriminator_loss(real_logits: list[torch.Tensor], fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """E[relu(1 - D(real))] + E[relu(1 + D(fake))], averaged over tokens and heads."""
    real = torch.stack([F.relu(1 - lg.float()).mean() for lg in real_logits]).mean()
    fake = torch.stack([F.relu(1 + lg.float()).mean() for lg in fake_logits]).mean()
    return real + fake


def r1_penalty(real_logits: list[torch.Tensor], features: list[torch.Tensor]) -> torch.Tensor:
    """E_b ||d D_b / d features||^2 over all head inputs, D_b = sum over heads of the token-mean logit."""
    d = torch.stack([lg.float().mean(dim=1) for lg in real_logits]).sum(0)
    grads = torch.autograd.grad(d.sum(), features, create_graph=True)
    return torch.stack([g.float().pow(2).flatten(1).sum(1) for g in grads]).sum(0).mean()


def discriminator_logits(disc: Discriminator, x, labels, augment: tuple[str, ...], gen,
                         amp: str = "fp32") -> list[torch.Tensor]:
    """D's logits of augmented images; gradients reach x through the (frozen or not) backbone."""
    with autocast(x.device, amp):
        return disc(diff_augment(x, augment, gen), labels)


def discriminator_loss(disc: Discriminator, x_real, x_fake, labels, gen, *, augment: tuple[str, ...],
                       r1_gamma: float, amp: str = "fp32") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The discriminator's hinge loss on real vs sg(fake) plus the R1 penalty on its head inputs."""
    with autocast(x_real.device, amp):
        feats = disc.features(diff_augment(x_real, augment, gen))
        if r1_gamma > 0:  # frozen backbone: the features are constants, make them leaves to differentiate
            feats = [f if f.requires_grad else f.detach().requires_grad_(True) for f in feats]
        real_logits = disc.logits(feats, labels)
        fake_logits = disc(diff_augment(x_fake.detach(), augment, gen), labels)
    hinge = hinge_discriminator_loss(real_logits, fake_logits)
    r1 = r1_penalty(real_logits, feats) if r1_gamma > 0 else torch.zeros((), device=x_real.device)
    parts = {"d_real": torch.stack([lg.float().mean() for lg in real_logits]).mean().detach(),
             "d_fake": torch.stack([lg.float().mean() for lg in fake_logits]).mean().detach(),
             "r1": r1.detach()}
    return hinge + 0.5 * r1_gamma * r1, parts
