"""`fastdiff distill`: Adversarial Diffusion Distillation (Sauer et al. 2023) of a DDPM teacher run into a
1-4 step student, as an objective of the training loop (`fastdiff.train.loop`: AMP, EMA, warm-up, atomic
checkpoints, exact resume, stats.jsonl, progress bar, NaN guard).

Each step (Algorithm 1 of the paper): noise real images to student timesteps, take the student's x0; update the
student on hinge-adversarial + distillation loss (`add_losses`); then update the discriminator heads on real vs
the detached student output, with R1. The teacher is frozen; the student starts from the teacher's EMA weights.

The two updates are two train steps (`Session.train_step`), each with its own optimizer, loss scaler and random
stream. The student's step is the DDPM step: compiled, CUDA-graphed and DistributedDataParallel where DDPM's is.
With `adv_weight` 0 (distillation and regression alone) there is no discriminator: none is built, its backbone is
not pretrained, and the run has the student's step alone. The discriminator's step is graphed where the student's
is, but never compiled (its R1 penalty differentiates twice, which torch.compile does not support) and never
wrapped in DDP (R1 calls autograd.grad, which DDP does not support): with several processes its gradients are
averaged by an all-reduce after backward.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from fastdiff import checkpoint as ckpt
from fastdiff import state_dicts
from fastdiff.config import RUN_KINDS, ADDConfig, RunConfig, checked, load_config
from fastdiff.config_checks import flag, guides_untrained_null
from fastdiff.data import load_dataset
from fastdiff.diffusion import NoiseSchedule, make_timesteps, student_table, student_timesteps
from fastdiff.errors import ConfigError
from fastdiff.models import UNet
from fastdiff.models.discriminator import Discriminator, parse_augment
from fastdiff.models.vit import ViT, ViTConfig, check_vit_file, load_or_pretrain_vit, load_vit_file
from fastdiff.runtime import AccelOptions, compile_fn, grad_scaler, step_generator
from fastdiff.sampling import Denoiser, load_run
from fastdiff.sources import user_cache_dir
from fastdiff.train.add_losses import (
    discriminator_logits,
    discriminator_loss,
    distillation_loss,
    hinge_generator_loss,
    regression_loss,
    student_x0,
)
from fastdiff.train.add_pairs import check_states, regress_states, teacher_pairs
from fastdiff.train.distributed import World
from fastdiff.train.loop import Part, Session, train_loop
from fastdiff.train.lr import warmup_lr
from fastdiff.train.monitor import sample_grid
from fastdiff.train.rundir import source_checkpoint
from fastdiff.train.step import adamw


def cache_dir(dc: ADDConfig) -> Path:
    """Where the teacher's derived files (the pretrained ViT backbone, the regression pairs) are cached, for the
    next student of it: beside the teacher; for a `pretrained:NAME` teacher (inside the installed package, which is
    not written to), the user's cache (`sources.user_cache_dir()/NAME`)."""
    path = ckpt.resolve_checkpoint(dc.teacher)
    return user_cache_dir() / path.name if ckpt.is_pretrained(path) else path.parent.parent


def check_teacher(tcfg: RunConfig, cfg: RunConfig, path) -> None:
    """A teacher (config tcfg, at path) that student run cfg can distil: a DDPM run of the student's model and
    diffusion config, with a null label it trained where the student's teacher guidance needs one."""
    if tcfg.is_student:
        raise ConfigError(f"{path} is an ADD student; distil from a DDPM teacher run")
    if tcfg.model != cfg.model or tcfg.diffusion != cfg.diffusion:
        raise ConfigError(f"the teacher {path} has another model or diffusion config than this student run; "
                          "start a new --out for this teacher")
    if guides_untrained_null(tcfg, cfg.distill.teacher_guidance):
        raise ConfigError(f"--teacher-guidance {cfg.distill.teacher_guidance:g} guides the teacher {path} against "
                          "its null class, which it never trained (train.p_uncond 0); use --teacher-guidance 1")


def load_teacher(cfg: RunConfig, device) -> Denoiser:
    """The frozen teacher (EMA weights), checked (`check_teacher`)."""
    teacher = load_run(cfg.distill.teacher, device)
    check_teacher(teacher.config, cfg, teacher.path)
    return teacher


def build_discriminator(cfg: RunConfig, data, device, log, world: World, progress: bool = False) -> Discriminator:
    """ViT backbone (pretrained on the dataset and cached, a timm/DINO file, or none) with trainable heads."""
    dc, mc = cfg.distill, cfg.model
    vcfg = ViTConfig(image_size=mc.image_size, in_channels=mc.in_channels, patch_size=dc.backbone_patch,
                     dim=dc.backbone_dim, depth=dc.backbone_depth, num_heads=dc.backbone_heads)
    train_backbone = dc.train_backbone
    if dc.backbone == "pretrain":
        vcfg.num_classes = data.num_classes
        cache = Path(cfg.data.data_dir) if cfg.data.data_dir and Path(cfg.data.data_dir).is_dir() else None
        with world.main_first():  # the first process pretrains and caches it, the rest read it
            backbone = load_or_pretrain_vit(data, cache or cache_dir(dc), vcfg, steps=dc.backbone_steps,
                                            device=device, log=log, progress=progress)
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


class ADDObjective:
    """Student (parts[0], averaged into the EMA) and discriminator (parts[1], where adv_weight is not 0); the
    teacher is frozen."""

    kind, ema, warmup = "add-student", True, True
    command = RUN_KINDS[kind]
    STATS = ("loss", "g_adv", "distill", "regress", "d_loss", "r1", "d_real", "d_fake", "grad_norm")
    ADVERSARIAL_STATS = ("g_adv", "d_loss", "r1", "d_real", "d_fake")  # none without a discriminator

    def __init__(self, cfg: RunConfig, data, session: Session):
        # every process reads the teacher checkpoint the first one pinned (and recorded) as it started
        cfg = replace(cfg, distill=replace(cfg.distill, teacher=session.world.from_main(cfg.distill.teacher)))
        tc, dc, device = session.tc, cfg.distill, session.device
        self.cfg, self.tc, self.world, self.device = cfg, tc, session.world, device
        teacher = load_teacher(cfg, device)
        with session.world.main_first():  # the first process draws and caches the pairs, the rest read them
            self.pairs = (teacher_pairs(teacher, cfg, cache_dir(dc), device=device, log=session.log,
                                        states_at=regress_states(cfg), progress=session.progress)
                          if dc.regress_weight > 0 else None)
        self.memory_format = session.memory_format
        # the run's layout, whatever sampling the pairs left it in (fresh and cached pairs give the same run)
        self.teacher = teacher.model.to(memory_format=self.memory_format)
        student = UNet(cfg.model).to(device)
        student.load_state_dict(self.teacher.state_dict())
        student.requires_grad_(True)
        student = student.to(memory_format=self.memory_format)
        opt = adamw(student.parameters(), device, lr=tc.lr, betas=dc.betas, weight_decay=tc.weight_decay)
        self.parts = [Part("model", student, opt, warmup_lr(tc.lr, tc.warmup_steps), grad_scaler(device, tc.amp))]
        disc = None
        if dc.adv_weight > 0:
            disc = build_discriminator(cfg, data, device, session.log, session.world, session.progress)
            disc_opt = adamw(disc.trainable_parameters(), device, lr=dc.disc_lr, betas=dc.betas, weight_decay=0.0)
            self.parts.append(Part("disc", disc, disc_opt, lambda step: dc.disc_lr, grad_scaler(device, tc.amp),
                                   tensors=self._disc_tensors, load=self._load_disc))
        else:
            session.log("--adv-weight 0: no discriminator (the student learns from the teacher's distillation and "
                        "regression losses alone)")
        self.student, self.disc = student, disc
        self.stats = tuple(k for k in self.STATS if disc is not None or k not in self.ADVERSARIAL_STATS)
        self.schedule = NoiseSchedule.from_config(cfg.diffusion, device)
        self.ts = torch.tensor(dc.student_timesteps, device=device)
        self.augment = parse_augment(dc.augment)
        self.forward = compile_fn(session.world.wrap(student), session.accel)
        # spectral-norm vectors move in both updates
        buffers = (list(disc.buffers()) if disc is not None else []) + list(student.buffers())
        self.student_step = session.train_step(self.parts[0], self._student_loss, grad_clip=tc.grad_clip,
                                               compiled=session.accel.compile, buffers=buffers)
        if disc is not None:
            self.disc_step = session.train_step(self.parts[1], self._disc_loss, grad_clip=float("inf"),
                                                compiled=False, stream=1, buffers=buffers)
            if session.world.distributed:
                for p in disc.trainable_parameters():
                    p.register_post_accumulate_grad_hook(self._average_grad)

    def _average_grad(self, param: torch.Tensor) -> None:
        """The discriminator's gradients averaged over the processes (it is not wrapped in DDP); a hook returns
        nothing."""
        param.grad.copy_(self.world.mean(param.grad))

    def _student_loss(self, gen, x0, labels):
        """adv_weight * hinge adversarial + distill_weight * distillation (+ regress_weight * regression on the
        teacher pairs); D's weights get no gradient."""
        tc, dc, prediction = self.tc, self.cfg.distill, self.cfg.diffusion.prediction
        labels = labels if self.cfg.model.num_classes else None
        x0_s, _ = student_x0(self.forward, self.schedule, x0, labels, self.ts, gen, prediction=prediction,
                             amp=tc.amp)
        g_adv = torch.zeros((), device=self.device)
        if self.disc is not None:
            self.disc.set_trainable(False)  # the adversarial gradient reaches the student only
            g_adv = hinge_generator_loss(discriminator_logits(self.disc, x0_s, labels, self.augment, gen, tc.amp))
            self.disc.set_trainable(True)  # autograd recorded the graph above without D's weights
        dist = distillation_loss(self.teacher, self.schedule, x0_s, labels, gen, prediction=prediction,
                                 t_min=dc.teacher_t_min, t_max=dc.teacher_t_max, guidance=dc.teacher_guidance,
                                 null_label=self.teacher.null_label, weighting=dc.distill_weighting, amp=tc.amp)
        loss = dc.adv_weight * g_adv + dc.distill_weight * dist
        reg = torch.zeros((), device=self.device)
        if self.pairs is not None:
            reg = regression_loss(self.forward, self.schedule, self.pairs, dc.student_timesteps, x0.shape[0], gen,
                                  prediction=prediction, amp=tc.amp, memory_format=self.memory_format)
            loss = loss + dc.regress_weight * reg
        return loss, (x0_s.detach(), g_adv.detach(), dist.detach(), reg.detach())

    def _disc_loss(self, gen, x0, x_fake, labels):
        labels = labels if self.cfg.model.num_classes else None
        d_loss, parts = discriminator_loss(self.disc, x0, x_fake, labels, gen, augment=self.augment,
                                           r1_gamma=self.cfg.distill.r1_gamma, amp=self.tc.amp)
        return d_loss, (parts["r1"], parts["d_real"], parts["d_fake"])

    def step(self, step: int, x0, labels):
        """One student update and `disc_steps` discriminator updates; returns the values of `stats`."""
        dc, tc = self.cfg.distill, self.tc
        x0 = x0.contiguous(memory_format=self.memory_format)
        loss, grad_norm, x_fake, g_adv, dist, reg = self.student_step(step, x0, labels)
        if self.disc is None:
            return loss, dist, reg, grad_norm
        for k in range(dc.disc_steps):
            if k > 0:  # further discriminator steps see fresh student outputs (each process its own noise)
                gen = step_generator(self.world.seed(tc.seed), step * dc.disc_steps + k, self.device, stream=3)
                with torch.no_grad():
                    x_fake, _ = student_x0(self.student, self.schedule, x0,
                                           labels if self.cfg.model.num_classes else None, self.ts, gen,
                                           prediction=self.cfg.diffusion.prediction, amp=tc.amp)
            d_loss, _, r1, d_real, d_fake = self.disc_step(step * dc.disc_steps + k, x0, x_fake, labels)
        return loss, g_adv, dist, reg, d_loss, r1, d_real, d_fake, grad_norm

    def _disc_tensors(self) -> dict[str, torch.Tensor]:
        sd = self.disc.state_dict()
        return sd if self.disc.train_backbone else {k: v for k, v in sd.items() if not k.startswith("backbone.")}

    def _load_disc(self, tensors: dict, path: Path) -> None:
        if not self.disc.train_backbone:
            tensors.update({"backbone." + k: v for k, v in self.disc.backbone.state_dict().items()})
        state_dicts.load_model_weights(self.disc, tensors, path)

    def extra_state(self) -> dict:
        return {"student_timesteps": list(self.cfg.distill.student_timesteps), "teacher": self.cfg.distill.teacher}

    def grid(self, model):
        mc, sc = self.cfg.model, self.cfg.sample
        ts = student_timesteps(self.cfg.distill.student_timesteps, sc.steps if sc.sampler == "student" else None)
        table = student_table(self.schedule, ts, prediction=self.cfg.diffusion.prediction, device=self.device)
        return sample_grid(model, table, shape=(mc.in_channels, mc.image_size, mc.image_size),
                           num_classes=mc.num_classes, guidance=sc.guidance, null_label=model.null_label,
                           clip=sc.clip, device=self.device)

    def describe(self) -> str:
        dc = self.cfg.distill
        text = (f"distilling teacher={dc.teacher} student timesteps={list(dc.student_timesteps)} "
                f"prediction={self.cfg.diffusion.prediction} ")
        if self.disc is None:
            text += "no discriminator (adv_weight 0)"
        else:
            n_disc = sum(p.numel() for p in self.disc.trainable_parameters())
            text += (f"disc trainable params={n_disc / 1e6:.2f}M "
                     f"backbone={'trained' if self.disc.train_backbone else 'frozen'}")
        if self.cfg.diffusion.prediction == "eps" and not self.cfg.diffusion.zero_terminal_snr:
            t = max(dc.student_timesteps)
            ab = float(self.schedule.alphas_cumprod[t])
            text += (f"; note: an eps-prediction student's x0 at t={t} multiplies its eps error by 1/sqrt(ab) = "
                     f"{ab ** -0.5:.0f}; a v-prediction teacher (e.g. preset digits-v) distils better")
        return text


def resolve_add(cfg: RunConfig, out, resume: bool = False, log=None) -> RunConfig:
    """What a student run in `out` checks and resolves before it opens the directory (`--dry-run` too, which
    passed what the run then refused): its config, its teacher's checkpoint pinned (`rundir.source_checkpoint`: a
    resume reads the one it recorded) and checked against it, and a backbone file that exists."""
    cfg = checked(cfg, student=True, saved=resume)
    teacher = source_checkpoint(out, resume, cfg.distill.teacher, "distill", "teacher", log=log)
    cfg = replace(cfg, distill=replace(cfg.distill, teacher=teacher))
    tcfg = load_config(ckpt.resolve_checkpoint(teacher) / "config.json")
    check_teacher(tcfg, cfg, teacher)
    # these two failed inside the opened run: the states of its pairs (the teacher's own spacing), the backbone file
    dc, spacing = cfg.distill, tcfg.sample.spacing
    grid = make_timesteps(tcfg.diffusion.num_timesteps, dc.regress_steps, spacing).tolist()
    check_states(regress_states(cfg), grid, dc.regress_steps, spacing)
    if dc.backbone not in ("pretrain", "none"):
        check_vit_file(dc.backbone)
    return cfg


def train_add(cfg: RunConfig, out, *, device="auto", resume: bool = False, progress: bool = True,
              echo=print, accel: AccelOptions | None = None) -> dict:
    """Distil (or resume distilling) the teacher named in cfg.distill into a student run in `out`.

    `accel` as for `train_ddpm` (default: compile + CUDA graphs on a GPU, the plain steps on the CPU). A new run
    records the teacher's checkpoint folder, which a resume reads again (`rundir.source_checkpoint`).
    """
    resume = flag("resume", resume)  # "no" was taken as true
    cfg = resolve_add(cfg, out, resume, log=echo)
    mc = cfg.model
    data = load_dataset(cfg.data.dataset, "train", data_dir=cfg.data.data_dir, image_size=mc.image_size,
                        channels=mc.in_channels)
    return train_loop(lambda session: ADDObjective(cfg, data, session), kind=ADDObjective.kind, data=data, tc=cfg.train,
                      config=cfg.to_dict(), run_dir=out, device=device, resume=resume, progress=progress, echo=echo,
                      accel=accel)
