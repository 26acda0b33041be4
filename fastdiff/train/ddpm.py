"""DDPM training of the UNet teacher (Ho et al. 2020, Algorithm 1) with eps / v / x0 targets, classifier-free
guidance label dropout, AdamW with warm-up and gradient clipping: the objective; the loop (EMA, AMP, checkpoints,
exact resume, logs) is `fastdiff.train.loop`'s."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdiff.config import RUN_KINDS, RunConfig, checked
from fastdiff.config_checks import flag
from fastdiff.data import load_dataset
from fastdiff.diffusion import NoiseSchedule, ddim_table, make_timesteps, training_target
from fastdiff.diffusion.parameterization import check_prediction
from fastdiff.errors import ConfigError
from fastdiff.models import UNet
from fastdiff.runtime import AccelOptions, autocast, compile_fn, grad_scaler
from fastdiff.train.loop import Part, Session, train_loop
from fastdiff.train.lr import warmup_lr
from fastdiff.train.monitor import GRID_STEPS, sample_grid
from fastdiff.train.step import adamw


def diffusion_loss(model, schedule: NoiseSchedule, x0, labels, gen, *, prediction: str, p_uncond: float,
                   null_label: int | None, device, amp: str) -> torch.Tensor:
    """Sample t and eps, noise x0 to x_t, regress the network output on the prediction target. labels: None for an
    unconditional model; with a null label, each is dropped to it with probability p_uncond (classifier-free
    guidance)."""
    b = x0.shape[0]
    t = torch.randint(0, schedule.num_timesteps, (b,), device=device, generator=gen)
    eps = torch.randn(x0.shape, device=device, generator=gen)
    x_t = schedule.add_noise(x0, eps, t)
    if labels is not None and null_label is not None:
        drop = torch.rand(b, device=device, generator=gen) < p_uncond
        labels = torch.where(drop, torch.full_like(labels, null_label), labels)
    ab = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    target = training_target(prediction, x0, eps, ab)
    with autocast(device, amp):
        out = model(x_t, t, labels)
    return F.mse_loss(out.float(), target)


def _flip(x: torch.Tensor, gen) -> torch.Tensor:
    mask = torch.rand(x.shape[0], device=x.device, generator=gen) < 0.5
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)


class DDPMObjective:
    """The UNet regressed on its prediction target at uniform timesteps; one train step per training step."""

    kind, stats, ema, warmup = "ddpm", ("loss", "grad_norm"), True, True
    command = RUN_KINDS[kind]

    def __init__(self, cfg: RunConfig, session: Session):
        tc, mc, device = session.tc, cfg.model, session.device
        self.cfg = cfg
        self.memory_format = session.memory_format
        model = UNet(mc).to(device).to(memory_format=self.memory_format)
        opt = adamw(model.parameters(), device, lr=tc.lr, weight_decay=tc.weight_decay)
        self.parts = [Part("model", model, opt, warmup_lr(tc.lr, tc.warmup_steps), grad_scaler(device, tc.amp))]
        self.schedule = NoiseSchedule.from_config(cfg.diffusion, device)
        forward = compile_fn(session.world.wrap(model), session.accel)
        null_label = model.null_label

        def loss_fn(gen, x0, labels):  # flips, timesteps, noise and label dropout come from (seed, step)
            x0 = _flip(x0, gen) if cfg.data.hflip else x0
            labels = labels if mc.num_classes else None
            return diffusion_loss(forward, self.schedule, x0, labels, gen, prediction=cfg.diffusion.prediction,
                                  p_uncond=tc.p_uncond, null_label=null_label, device=device, amp=tc.amp)

        self.train_step = session.train_step(self.parts[0], loss_fn, grad_clip=tc.grad_clip,
                                             compiled=session.accel.compile)

    def step(self, step: int, x0, labels):
        return self.train_step(step, x0.contiguous(memory_format=self.memory_format), labels)

    def extra_state(self) -> dict:
        return {}

    def grid(self, model):
        sc, mc = self.cfg.sample, self.cfg.model
        T = self.schedule.num_timesteps
        ts = make_timesteps(T, min(GRID_STEPS, T), sc.spacing)  # a schedule of fewer timesteps: all of them
        table = ddim_table(self.schedule, ts, prediction=self.cfg.diffusion.prediction, device=self.schedule.device)
        return sample_grid(model, table, shape=(mc.in_channels, mc.image_size, mc.image_size),
                           num_classes=mc.num_classes, guidance=sc.guidance, null_label=model.null_label,
                           clip=sc.clip, device=self.schedule.device)

    def describe(self) -> str:
        n_params = sum(p.numel() for p in self.parts[0].module.parameters())
        return f"preset={self.cfg.preset} params={n_params / 1e6:.2f}M"


def train_ddpm(cfg: RunConfig, out, *, device="auto", resume: bool = False, progress: bool = True,
               echo=print, accel: AccelOptions | None = None) -> dict:
    """Train (or resume) a DDPM run in directory `out`; returns the final stats record.

    `accel` picks the fast paths (default: compile + CUDA graphs on a GPU, the plain step on the CPU).
    """
    resume = flag("resume", resume)  # "no" was taken as true
    cfg = checked(cfg, student=False, saved=resume)
    mc = cfg.model
    check_prediction(cfg.diffusion.prediction)
    data = load_dataset(cfg.data.dataset, "train", data_dir=cfg.data.data_dir, image_size=mc.image_size,
                        channels=mc.in_channels)
    if mc.num_classes and data.num_classes != mc.num_classes:
        raise ConfigError(f"the model has {mc.num_classes} classes but {cfg.data.dataset} has {data.num_classes}; "
                          f"set the model's num_classes to {data.num_classes} (or 0 for unconditional)")
    return train_loop(lambda session: DDPMObjective(cfg, session),
                      kind=DDPMObjective.kind, data=data, tc=cfg.train, config=cfg.to_dict(),
                      run_dir=out, device=device, resume=resume, progress=progress, echo=echo, accel=accel)
