"""`fastdiff distill`: Adversarial Diffusion Distillation (Sauer et al. 2023) of a DDPM teacher run into a
1-4 step student, with the same loop features as DDPM training (AMP, EMA, warm-up, gradient clipping, atomic
checkpoints, exact resume, stats.jsonl, progress bar, NaN guard).

Each step (Algorithm 1 of the paper): noise real images to student timesteps, take the student's x0; update the
student on hinge-adversarial + distillation loss (`add_losses`); then update the discriminator heads on real vs
the detached student output, with R1. The teacher is frozen; the student starts from the teacher's EMA weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from fastdiff import checkpoint as ckpt
from fastdiff.config import ADDConfig, RunConfig, load_config
from fastdiff.data import load_dataset
from fastdiff.diffusion import NoiseSchedule, student_timesteps
from fastdiff.diffusion.parameterization import check_prediction
from fastdiff.errors import ConfigError
from fastdiff.models import UNet
from fastdiff.models.discriminator import Discriminator, parse_augment
from fastdiff.models.vit import ViT, ViTConfig, load_or_pretrain_vit, load_vit_file
from fastdiff.runtime import check_amp, grad_scaler, mix_seed, resolve_device, step_generator
from fastdiff.train.add_losses import (
    c_of_t,
    discriminator_logits,
    discriminator_loss,
    distillation_loss,
    hinge_generator_loss,
    student_x0,
)
from fastdiff.train.loop import EMA, Batcher, IntervalMeter, RunLog, prepare_run_dir, warmup_lambda

STATS = ("loss", "g_adv", "distill", "d_loss", "r1", "d_real", "d_fake")


def teacher_run_dir(dc: ADDConfig) -> Path:
    return ckpt.resolve_checkpoint(dc.teacher).parent.parent


def load_teacher(cfg: RunConfig, device) -> UNet:
    """The frozen teacher (EMA weights); its model and diffusion config must be the student's."""
    path = ckpt.resolve_checkpoint(cfg.distill.teacher)
    tcfg = load_config(path / "config.json")
    if tcfg.is_student:
        raise ConfigError(f"{path} is an ADD student; distil from a DDPM teacher run")
    if tcfg.model != cfg.model or tcfg.diffusion != cfg.diffusion:
        raise ConfigError(f"the teacher {path} has another model or diffusion config than this student run; "
                          "start a new --out for this teacher")
    teacher = UNet(tcfg.model)
    ckpt.load_model_weights(teacher, ckpt.load_tensors(path, "ema", device), path)
    return teacher.to(device).eval().requires_grad_(False)


def build_discriminator(cfg: RunConfig, data, device, log) -> Discriminator:
    """ViT backbone (pretrained on the dataset and cached, a timm/DINO file, or none) with trainable heads."""
    dc, mc = cfg.distill, cfg.model
    vcfg = ViTConfig(image_size=mc.image_size, in_channels=mc.in_channels, patch_size=dc.backbone_patch,
                     dim=dc.backbone_dim, depth=dc.backbone_depth, num_heads=dc.backbone_heads)
    train_backbone = dc.train_backbone
    if dc.backbone == "pretrain":
        vcfg.num_classes = data.num_classes
        cache = Path(cfg.data.data_dir) if cfg.data.data_dir and Path(cfg.data.data_dir).is_dir() else None
        backbone = load_or_pretrain_vit(data, cache or teacher_run_dir(dc), vcfg, steps=dc.backbone_steps,
                                        device=device, log=log)
    elif dc.backbone == "none":
        log("no backbone checkpoint (--backbone none): the ViT starts from random weights and trains with the heads")
        backbone, train_backbone = ViT(vcfg), True
    else:
        backbone = load_vit_file(dc.backbone, image_size=dc.backbone_size or None)
        log(f"backbone {dc.backbone}: ViT {backbone.cfg.depth}x{backbone.cfg.dim}, patch {backbone.cfg.patch_size}, "
            f"input {backbone.cfg.image_size}px, {'trained' if train_backbone else 'frozen'}")
    disc = Discriminator(backbone, mc.num_classes, num_heads=dc.disc_heads, head_kind=dc.disc_head,
                         width=dc.disc_width, use_spectral_norm=dc.spectral_norm, train_backbone=train_backbone,
                         mbstd_group=dc.disc_mbstd)
    return disc.to(device)


def _check(cfg: RunConfig, device) -> None:
    tc, dc = cfg.train, cfg.distill
    if dc is None:
        raise ConfigError("this config has no distill section; build it with fastdiff distill --teacher RUN")
    check_amp(tc.amp, device)
    check_prediction(cfg.diffusion.prediction)
    c_of_t(dc.distill_weighting, torch.ones(1))
    parse_augment(dc.augment)
    student_timesteps(dc.student_timesteps)
    if tc.steps < 1 or tc.batch_size < 1 or dc.disc_steps < 1:
        raise ConfigError(f"--steps ({tc.steps}), --batch-size ({tc.batch_size}) and --disc-steps ({dc.disc_steps}) "
                          "must be positive")


class _State:
    """Models, optimizers and counters of a distillation run, saved and restored together."""

    def __init__(self, cfg: RunConfig, data, device, log):
        tc, dc = cfg.train, cfg.distill
        torch.manual_seed(tc.seed)
        self.teacher = load_teacher(cfg, device)
        self.student = UNet(cfg.model).to(device)
        self.student.load_state_dict(self.teacher.state_dict())
        self.student.requires_grad_(True)
        fmt = torch.channels_last if tc.channels_last else torch.contiguous_format
        self.student = self.student.to(memory_format=fmt)
        self.ema = EMA(self.student, tc.ema_decay)
        self.disc = build_discriminator(cfg, data, device, log)
        fused = device.type == "cuda"
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=tc.lr, betas=dc.betas,
                                     weight_decay=tc.weight_decay, fused=fused)
        self.disc_opt = torch.optim.AdamW(self.disc.trainable_parameters(), lr=dc.disc_lr, betas=dc.betas,
                                          weight_decay=0.0, fused=fused)
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_lambda(tc.warmup_steps))
        self.scaler, self.disc_scaler = grad_scaler(device, tc.amp), grad_scaler(device, tc.amp)
        self.step, self.images_seen = 0, 0

    def disc_tensors(self) -> dict[str, torch.Tensor]:
        sd = self.disc.state_dict()
        return sd if self.disc.train_backbone else {k: v for k, v in sd.items() if not k.startswith("backbone.")}

    def save(self, run_dir: Path, cfg: RunConfig) -> str:
        opt_t, opt_meta = ckpt.optimizer_tensors(self.opt)
        dopt_t, dopt_meta = ckpt.optimizer_tensors(self.disc_opt)
        state = {"step": self.step, "images_seen": self.images_seen, "optimizer": opt_meta,
                 "disc_optimizer": dopt_meta, "lr_scheduler": self.lr_sched.state_dict(),
                 "grad_scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                 "disc_grad_scaler": self.disc_scaler.state_dict() if self.disc_scaler.is_enabled() else None,
                 "kind": "add-student", "student_timesteps": list(cfg.distill.student_timesteps),
                 "teacher": cfg.distill.teacher}
        tensors = {"model": self.student.state_dict(), "ema": self.ema.model.state_dict(), "optimizer": opt_t,
                   "disc": self.disc_tensors(), "disc_optimizer": dopt_t}
        return str(ckpt.save_checkpoint(run_dir, self.step, tensors=tensors, state=state, config=cfg.to_dict(),
                                        keep=cfg.train.keep_checkpoints))

    def restore(self, path: Path, device) -> None:
        ckpt.load_model_weights(self.student, ckpt.load_tensors(path, "model", device), path)
        ckpt.load_model_weights(self.ema.model, ckpt.load_tensors(path, "ema", device), path)
        disc = ckpt.load_tensors(path, "disc", device)
        if not self.disc.train_backbone:
            disc.update({"backbone." + k: v for k, v in self.disc.backbone.state_dict().items()})
        ckpt.load_model_weights(self.disc, disc, path)
        state = ckpt.load_json(path, "state")
        ckpt.load_optimizer(self.opt, ckpt.load_tensors(path, "optimizer", device), state["optimizer"])
        ckpt.load_optimizer(self.disc_opt, ckpt.load_tensors(path, "disc_optimizer", device), state["disc_optimizer"])
        self.lr_sched.load_state_dict(state["lr_scheduler"])
        for scaler, key in ((self.scaler, "grad_scaler"), (self.disc_scaler, "disc_grad_scaler")):
            if state.get(key):
                scaler.load_state_dict(state[key])
        self.step, self.images_seen = state["step"], state["images_seen"]


def _generator_update(st: _State, cfg: RunConfig, schedule, x0, labels, ts, augment, gen):
    tc, dc = cfg.train, cfg.distill
    st.disc.set_trainable(False)  # the adversarial gradient reaches the student only
    x0_s, _ = student_x0(st.student, schedule, x0, labels, ts, gen, prediction=cfg.diffusion.prediction,
                         amp=tc.amp)
    g_adv = hinge_generator_loss(discriminator_logits(st.disc, x0_s, labels, augment, gen, tc.amp))
    dist = distillation_loss(st.teacher, schedule, x0_s, labels, gen, prediction=cfg.diffusion.prediction,
                             t_min=dc.teacher_t_min, t_max=dc.teacher_t_max, guidance=dc.teacher_guidance,
                             null_label=st.teacher.null_label, weighting=dc.distill_weighting, amp=tc.amp)
    loss = dc.adv_weight * g_adv + dc.distill_weight * dist
    st.opt.zero_grad(set_to_none=True)
    st.scaler.scale(loss).backward()
    st.scaler.unscale_(st.opt)
    torch.nn.utils.clip_grad_norm_(st.student.parameters(), tc.grad_clip)
    st.scaler.step(st.opt)
    st.scaler.update()
    st.lr_sched.step()
    st.disc.set_trainable(True)
    return x0_s.detach(), loss.detach(), g_adv.detach(), dist.detach()


def _discriminator_update(st: _State, cfg: RunConfig, x0, x_fake, labels, augment, gen):
    dc = cfg.distill
    d_loss, parts = discriminator_loss(st.disc, x0, x_fake, labels, gen, augment=augment, r1_gamma=dc.r1_gamma,
                                       amp=cfg.train.amp)
    st.disc_opt.zero_grad(set_to_none=True)
    st.disc_scaler.scale(d_loss).backward()
    st.disc_scaler.step(st.disc_opt)
    st.disc_scaler.update()
    return d_loss.detach(), parts


def train_step(st: _State, cfg: RunConfig, schedule, data, batcher, ts, augment, device):
    """One student update and `disc_steps` discriminator updates; returns the terms of STATS."""
    tc = cfg.train
    gen = step_generator(tc.seed, st.step, device)
    torch.manual_seed(mix_seed(tc.seed, st.step, stream=1))  # dropout masks
    x0, labels = data.batch(batcher.indices(st.step), device)
    labels = labels if cfg.model.num_classes else None
    x_fake, loss, g_adv, dist = _generator_update(st, cfg, schedule, x0, labels, ts, augment, gen)
    for k in range(cfg.distill.disc_steps):
        if k > 0:  # further discriminator steps see fresh student outputs
            with torch.no_grad():
                x_fake, _ = student_x0(st.student, schedule, x0, labels, ts, gen,
                                       prediction=cfg.diffusion.prediction, amp=tc.amp)
        d_loss, parts = _discriminator_update(st, cfg, x0, x_fake, labels, augment, gen)
    st.ema.update(st.student, st.step)
    st.step += 1
    st.images_seen += tc.batch_size
    return loss, g_adv, dist, d_loss, parts["r1"], parts["d_real"], parts["d_fake"]


def train_add(cfg: RunConfig, out, *, device="auto", resume: bool = False, progress: bool = True,
              echo=print) -> dict:
    """Distil (or resume distilling) the teacher named in cfg.distill into a student run in `out`."""
    run_dir = Path(out)
    device = resolve_device(device)
    _check(cfg, device)
    tc, dc, mc = cfg.train, cfg.distill, cfg.model
    data = load_dataset(cfg.data.dataset, "train", data_dir=cfg.data.data_dir, image_size=mc.image_size,
                        channels=mc.in_channels)
    prepare_run_dir(run_dir, resume)
    ckpt.remove_stale_temporaries(run_dir)
    log = RunLog(run_dir, echo=(lambda s: tqdm.write(s)) if progress else echo)
    st = _State(cfg, data, device, log.line)
    last_ckpt = None
    if resume:
        path = ckpt.latest_good_checkpoint(run_dir, log=echo) or ckpt.latest_checkpoint(run_dir)
        st.restore(path, device)
        last_ckpt = str(path)
    ckpt.write_json_atomic(run_dir / "config.json", cfg.to_dict())
    schedule = NoiseSchedule.from_config(cfg.diffusion, device)
    ts = torch.tensor(dc.student_timesteps, device=device)
    augment = parse_augment(dc.augment)
    batcher = Batcher(len(data), tc.batch_size, tc.seed)
    n_disc = sum(p.numel() for p in st.disc.trainable_parameters())
    log.line(f"{'resuming at step ' + str(st.step) if resume else 'distilling'} teacher={dc.teacher} "
             f"student timesteps={list(dc.student_timesteps)} prediction={cfg.diffusion.prediction} "
             f"disc trainable params={n_disc / 1e6:.2f}M backbone={'trained' if st.disc.train_backbone else 'frozen'} "
             f"device={device} amp={tc.amp} steps={tc.steps} batch={tc.batch_size}")

    if cfg.diffusion.prediction == "eps" and not cfg.diffusion.zero_terminal_snr:
        ab = float(schedule.alphas_cumprod[max(dc.student_timesteps)])
        log.line(f"note: an eps-prediction student's x0 at t={max(dc.student_timesteps)} multiplies its eps error by "
                 f"1/sqrt(ab) = {ab ** -0.5:.0f}; a v-prediction teacher (e.g. preset digits-v) distils better")
    bar = tqdm(total=tc.steps, initial=st.step, disable=not progress, unit="step", dynamic_ncols=True)
    meter = IntervalMeter(STATS, device, st.step)
    record = {}
    st.student.train()
    try:
        while st.step < tc.steps:
            meter.add(*train_step(st, cfg, schedule, data, batcher, ts, augment, device))
            done = st.step
            bar.update(1)
            if done % tc.log_every == 0 or done % tc.ckpt_every == 0 or done == tc.steps:
                record = {"step": done, "kimg": st.images_seen / 1000,
                          **meter.read(done, tc.batch_size, last_ckpt), "lr": st.lr_sched.get_last_lr()[0]}
                log.stats(record)
                log.line(f"step {done}/{tc.steps} loss {record['loss']:.4f} adv {record['g_adv']:.3f} "
                         f"distill {record['distill']:.4f} D {record['d_loss']:.3f} "
                         f"{record['images_per_sec']:.0f} img/s")
                bar.set_postfix(loss=f"{record['loss']:.4f}", D=f"{record['d_loss']:.3f}")
                if done % tc.ckpt_every == 0 or done == tc.steps:
                    last_ckpt = st.save(run_dir, cfg)
                    log.line(f"checkpoint {last_ckpt}")
    finally:
        bar.close()
        log.close()
    return record
