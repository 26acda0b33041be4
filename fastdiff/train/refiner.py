"""`fastdiff train-refiner`: train a `Refiner` (fastdiff.models.refiner) for the x0 estimates of a run, as an
objective of the training loop (`fastdiff.train.loop`: AMP, compile, CUDA graphs, DDP, checkpoints, exact resume).

Two kinds of pairs (`inputs`), both regressed with an MSE loss under a one-cycle learning rate:
- "noised" (a DDPM run's default): a real image x0 is noised to t ~ U[t_min, t_max], the generator run (frozen,
  EMA weights) predicts x0_hat from it as its sampler does at its last step, and the refiner learns x0_hat -> x0.
- "samples" (an ADD student's default): the student's own 1-step samples of `pairs` noises, and its frozen teacher's
  DDIM samples of the same noises (`fastdiff.train.add_pairs`, cached in the refiner's run, seeds apart from the
  student's regression pairs and from eval's); the refiner learns student sample -> teacher sample. A few-step
  student's samples come from pure noise, where no real image is the answer: on mnist5k a "noised" refiner of the
  1-step student took its FD_cls from 2.4x to 26.7x the floor (it learned to correct the student's poor x0 estimates
  of noised real images, which its samples are not).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F

from fastdiff import checkpoint as ckpt
from fastdiff.config import RUN_KINDS, RunConfig, TrainConfig, build_section, load_config
from fastdiff.config_checks import check_numbers, flag
from fastdiff.data import load_dataset
from fastdiff.diffusion.parameterization import to_x0
from fastdiff.diffusion.samplers import guided
from fastdiff.errors import ConfigError
from fastdiff.models.refiner import Refiner, refiner_unet_config
from fastdiff.runtime import AccelOptions, autocast, compile_fn, grad_scaler, isolated_rng
from fastdiff.sampling import load_run, resolve_settings, sample
from fastdiff.sources import model_fingerprint
from fastdiff.train.add import load_teacher
from fastdiff.train.add_pairs import PAIR_SEED, teacher_pairs
from fastdiff.train.loop import Part, Session, train_loop
from fastdiff.train.lr import one_cycle_lr
from fastdiff.train.rundir import pinned_now, source_checkpoint
from fastdiff.train.step import adamw

REFINER_PAIR_SEED = PAIR_SEED + (1 << 32)  # "samples" pairs: far from the student's regression pairs and eval's
INPUTS = ("noised", "samples")


def refiner_train_config(**overrides) -> TrainConfig:
    """The loop settings of a refiner run (AdamW's default weight decay, the one-cycle peak lr)."""
    base = dict(steps=1500, batch_size=128, lr=1e-3, weight_decay=0.01, warmup_steps=0, log_every=250,
                ckpt_every=500, sample_every=0)
    return TrainConfig(**{**base, **overrides})


@dataclass
class RefinerConfig:
    generator: str = ""  # the run whose x0 estimates are refined
    inputs: str | None = None  # "noised" | "samples" (module docstring); None: samples for a student, else noised
    pairs: int = 2048  # "samples" pairs
    t_min: int = 0  # pairs come from x0 estimates at t uniform on [t_min, t_max]
    t_max: int | None = None  # None: half the generator's training timesteps
    base_channels: int = 16
    channel_mult: tuple[int, ...] = (1, 2)
    data_dir: str | None = None  # the generator's dataset folder where its recorded one has moved (None: that one)
    # `sources.model_fingerprint` of the generator's weights as sampled (`resolve_refiner` sets it): sampling
    # another model with this refiner warns
    generator_weights: str = ""
    train: TrainConfig = field(default_factory=refiner_train_config)

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)

    def to_dict(self, model: dict | None = None) -> dict:
        """config.json of a refiner run: its settings, the loop's, and the refiner network's (for load_refiner)."""
        refiner = asdict(self)
        train = refiner.pop("train")
        return {"kind": "refiner", "refiner": refiner, "train": train, **({"model": model} if model else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "RefinerConfig":
        """The refiner config of a dict (`to_dict`), every option of the wrong type or outside its range refused
        (the generator-dependent checks: `resolve_refiner`)."""
        if not isinstance(d, dict) or d.get("kind") != "refiner" or not isinstance(d.get("refiner"), dict):
            raise ConfigError("not a refiner run's config.json (its kind must be 'refiner')")
        if "train" in d["refiner"]:
            raise ConfigError("unknown option(s) ['train'] in config section 'refiner'")
        cfg = build_section(cls, d["refiner"], "refiner")
        cfg.train = build_section(TrainConfig, d.get("train", {}), "train")
        check_numbers("refiner", cfg)
        check_numbers("train", cfg.train)
        if not cfg.channel_mult:
            raise ConfigError("refiner.channel_mult is empty; give one multiplier of base_channels per level, "
                              "e.g. [1, 2]")
        return cfg


def make_pairs(loaded, x0: torch.Tensor, labels, t_min: int, t_max: int, gen) -> torch.Tensor:
    """The generator's x0 estimates (clipped like its sampler's) of real images noised to t ~ U[t_min, t_max]."""
    schedule, sc = loaded.schedule, loaded.config.sample
    t = torch.randint(t_min, t_max + 1, (x0.shape[0],), device=x0.device, generator=gen)
    x_t = schedule.add_noise(x0, torch.randn(x0.shape, device=x0.device, generator=gen), t)
    guidance = sc.guidance if labels is not None else 1.0
    with torch.no_grad():
        out = guided(loaded.model, x_t, t, labels, guidance, loaded.model.null_label)
        x0_hat = to_x0(loaded.config.diffusion.prediction, x_t, out, schedule.alphas_cumprod[t].view(-1, 1, 1, 1))
    return x0_hat.clamp(-sc.clip, sc.clip) if sc.clip is not None else x0_hat


def sample_pairs(student, gcfg: RunConfig, n: int, session: Session) -> tuple[torch.Tensor, torch.Tensor]:
    """(the student's 1-step samples, its teacher's DDIM samples) of the same n noises.

    One step: a 1-step sample is a function of its noise alone, as the teacher's DDIM sample is. A multi-step
    student re-noises its x0 with fresh noise at each later step, so its sample is not the teacher's sample of
    the first noise gone astray: on mnist5k a refiner trained on 4-step pairs took the 4-step student from 2.1x to
    13.9x the floor (README, "Few-step students")."""
    device = session.device
    # the student's teacher checkpoint, or its run's newest where that run has since pruned it
    # (the first process's choice on every process, as the generator's: a pruned checkpoint's replacement could
    # differ between them)
    pinned = pinned_now(gcfg.distill.teacher, session.log, "that the student was distilled from")
    teacher = session.world.from_main(pinned)
    gcfg = replace(gcfg, distill=replace(gcfg.distill, teacher=teacher))
    with session.world.main_first():  # the first process draws and caches the pairs, the rest read them
        target = teacher_pairs(load_teacher(gcfg, device), gcfg, session.run_dir, device=device, log=session.log,
                               n=n, seed=REFINER_PAIR_SEED, purpose="the refiner", progress=session.progress)
    with isolated_rng(device):
        own = sample(student, resolve_settings(student, device, steps=1), n=n, seed=REFINER_PAIR_SEED)
    if target.labels is not None and not torch.equal(own.labels.to(device), target.labels):
        raise ConfigError("the student's and its teacher's pair labels differ; train-refiner needs both runs' "
                          "num_classes to agree")
    return own.images.to(device), target.images


class RefinerObjective:
    """The refiner regressed on its pairs, "noised" or "samples" (module docstring; no EMA: the weights are used)."""

    kind, ema, warmup = "refiner", False, False  # one cycle over --steps: no --warmup
    command = RUN_KINDS[kind]
    stats = ("loss", "unrefined_loss", "grad_norm")

    def __init__(self, cfg: RefinerConfig, t_max: int, session: Session):
        tc, device = session.tc, session.device
        # every process reads the generator checkpoint the first one pinned (and recorded) as it started
        cfg = replace(cfg, generator=session.world.from_main(cfg.generator))
        self.cfg, self.t_max = cfg, t_max
        self.loaded = load_run(cfg.generator, device)
        gcfg = self.loaded.config
        self.memory_format = session.memory_format
        model = Refiner(refiner_unet_config(gcfg.model, cfg)).to(device).to(memory_format=self.memory_format)
        opt = adamw(model.parameters(), device, lr=tc.lr, weight_decay=tc.weight_decay)
        self.parts = [Part("model", model, opt, one_cycle_lr(tc.lr, tc.steps), grad_scaler(device, tc.amp))]
        forward = compile_fn(session.world.wrap(model), session.accel)
        conditional = gcfg.model.num_classes > 0
        pairs = sample_pairs(self.loaded, gcfg, cfg.pairs, session) if cfg.inputs == "samples" else None

        def loss_fn(gen, x0, labels):
            if pairs is None:
                x0_hat = make_pairs(self.loaded, x0, labels if conditional else None, cfg.t_min, t_max, gen)
            else:  # the loop's real batch only sets the batch size: the pairs are the data
                i = torch.randint(pairs[0].shape[0], (x0.shape[0],), device=x0.device, generator=gen)
                x0_hat, x0 = pairs[0][i], pairs[1][i]
            with autocast(device, tc.amp):
                out = forward(x0_hat.contiguous(memory_format=self.memory_format))
            return F.mse_loss(out.float(), x0), (F.mse_loss(x0_hat, x0).detach(),)

        self.train_step = session.train_step(self.parts[0], loss_fn, grad_clip=tc.grad_clip,
                                             compiled=session.accel.compile)

    def step(self, step: int, x0, labels):
        loss, grad_norm, unrefined = self.train_step(step, x0, labels)
        return loss, unrefined, grad_norm

    def extra_state(self) -> dict:
        return {"generator": self.cfg.generator}

    def grid(self, model):
        return None

    def describe(self) -> str:
        n_params = sum(p.numel() for p in self.parts[0].module.parameters())
        on = (f"x0 estimates at t in [{self.cfg.t_min}, {self.t_max}]" if self.cfg.inputs == "noised" else
              f"its samples of {self.cfg.pairs} noises -> its teacher's")
        return f"a refiner for {self.cfg.generator} on {on} params={n_params / 1e6:.2f}M"


def resolve_refiner(cfg: RefinerConfig, out, resume: bool = False, log=None) -> tuple[RefinerConfig, RunConfig, int]:
    """What a refiner run in `out` checks and resolves before it opens the directory (`--dry-run` too): every value
    of cfg, its generator pinned (`rundir.source_checkpoint`: a resume reads the one it recorded) and its inputs
    chosen; returns (cfg, the generator's config, t_max)."""
    cfg = RefinerConfig.from_dict(cfg.to_dict())  # a config built in Python is checked as a file's is
    cfg = replace(cfg, generator=source_checkpoint(out, resume, cfg.generator, "refiner", "generator", log=log))
    gcfg = load_config(ckpt.resolve_checkpoint(cfg.generator) / "config.json")
    if not resume or not cfg.generator_weights:  # a resume keeps its own (a run from before 2026-12-07 gets one)
        cfg = replace(cfg, generator_weights=model_fingerprint(load_run(cfg.generator, "cpu").model))
    levels = len(cfg.channel_mult)
    if gcfg.model.image_size % 2 ** (levels - 1):
        raise ConfigError(f"refiner: {levels} levels (channel_mult {list(cfg.channel_mult)}) halve the "
                          f"generator's {gcfg.model.image_size}px images {levels - 1} times, which do not divide "
                          "evenly; use fewer levels")
    T = gcfg.diffusion.num_timesteps
    t_max = T // 2 if cfg.t_max is None else cfg.t_max
    if not 0 <= cfg.t_min <= t_max < T:
        raise ConfigError(f"refiner: need 0 <= t_min ({cfg.t_min}) <= t_max ({t_max}) < {T}")
    if cfg.inputs is None:
        cfg = replace(cfg, inputs="samples" if gcfg.is_student else "noised")
    if cfg.inputs not in INPUTS:
        raise ConfigError(f"refiner: inputs must be one of {', '.join(INPUTS)}, not {cfg.inputs!r}")
    if cfg.inputs == "samples" and not gcfg.is_student:
        raise ConfigError(f"refiner: inputs 'samples' needs an ADD student (their teacher gives the targets); "
                          f"{cfg.generator} is not one: use inputs 'noised'")
    # set to what the other inputs read: used by nothing here (they were dropped without a word); a resumed run
    # that was given them before this check keeps its config
    unused = [f"{key} {value}" for key, value, set_, reads in (
        ("t_max", cfg.t_max, cfg.t_max is not None, "noised"), ("t_min", cfg.t_min, cfg.t_min != 0, "noised"),
        ("pairs", cfg.pairs, cfg.pairs != RefinerConfig.pairs, "samples")) if set_ and cfg.inputs != reads]
    if unused and not resume:
        raise ConfigError(f"refiner: {', '.join(unused)} set, which inputs '{cfg.inputs}' do not use (only "
                          f"'{'noised' if cfg.inputs == 'samples' else 'samples'}' pairs do); drop it")
    if cfg.inputs == "noised" and not resume:  # the run (and --dry-run) records the t_max it trains at, not null
        cfg = replace(cfg, t_max=t_max)
    return cfg, gcfg, t_max


def train_refiner(cfg: RefinerConfig, out, *, device="auto", resume: bool = False, progress: bool = True,
                  echo=print, accel: AccelOptions | None = None) -> dict:
    """Train (or resume) a refiner for the x0 estimates of run `cfg.generator` in run directory `out`. A new run
    records the generator's checkpoint folder, which a resume reads again (`rundir.source_checkpoint`)."""
    resume = flag("resume", resume)  # "no" was taken as true
    cfg, gcfg, t_max = resolve_refiner(cfg, out, resume, log=echo)
    data = load_dataset(gcfg.data.dataset, "train", data_dir=cfg.data_dir or gcfg.data.data_dir,
                        image_size=gcfg.model.image_size, channels=gcfg.model.in_channels)
    config = cfg.to_dict(model=asdict(refiner_unet_config(gcfg.model, cfg)))
    return train_loop(lambda session: RefinerObjective(cfg, t_max, session),
                      kind=RefinerObjective.kind, data=data, tc=cfg.train,
                      config=config, run_dir=out, device=device, resume=resume, progress=progress, echo=echo,
                      accel=accel)
