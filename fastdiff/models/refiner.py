"""The refinement network: a small UNet mapping a sampler's final x0 estimate to a cleaner image.

It is trained on pairs made from real training images: a real image x0 is noised to a timestep t, the
generator run (teacher or student) predicts x0_hat from it, as its sampler does at its last step, and the
refiner learns x0_hat -> x0 with an MSE loss. The refiner is residual (x0_hat + correction, the correction's
last layer zero-initialised, so it starts as the identity) and sees neither t nor the label. Applying it is
optional: `fastdiff sample --refine RUN_DIR`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff import checkpoint as ckpt
from fastdiff.errors import CheckpointError, ConfigError
from fastdiff.models.unet import UNet, UNetConfig


@dataclass
class RefinerConfig:
    generator: str = ""  # the run whose x0 estimates are refined
    steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3
    t_min: int = 0  # pairs come from x0 estimates at t uniform on [t_min, t_max]
    t_max: int | None = None  # None: half the generator's training timesteps
    base_channels: int = 16
    channel_mult: tuple[int, ...] = (1, 2)
    seed: int = 0

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)


class Refiner(nn.Module):
    """refined = x + UNet(x): a residual correction of images in [-1, 1] of the generator's shape."""

    def __init__(self, unet_cfg: UNetConfig):
        super().__init__()
        self.net = UNet(unet_cfg)
        nn.init.zeros_(self.net.conv_out.weight)
        nn.init.zeros_(self.net.conv_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.zeros(x.shape[0], device=x.device)
        return x + self.net(x, t)


def refiner_unet_config(gen_model: UNetConfig, cfg: RefinerConfig) -> UNetConfig:
    groups = 8 if cfg.base_channels % 8 == 0 else 4 if cfg.base_channels % 4 == 0 else 1
    return UNetConfig(image_size=gen_model.image_size, in_channels=gen_model.in_channels,
                      base_channels=cfg.base_channels, channel_mult=cfg.channel_mult, num_res_blocks=1,
                      attn_resolutions=(), dropout=0.0, num_groups=groups, num_classes=0)


def make_pairs(loaded, x0: torch.Tensor, labels, t_min: int, t_max: int, gen) -> torch.Tensor:
    """The generator's x0 estimates (clipped like its sampler's) of real images noised to t ~ U[t_min, t_max]."""
    from fastdiff.diffusion.parameterization import to_x0
    from fastdiff.diffusion.samplers import guided

    schedule, sc = loaded.schedule, loaded.config.sample
    t = torch.randint(t_min, t_max + 1, (x0.shape[0],), device=x0.device, generator=gen)
    x_t = schedule.add_noise(x0, torch.randn(x0.shape, device=x0.device, generator=gen), t)
    guidance = sc.guidance if labels is not None else 1.0
    with torch.no_grad():
        out = guided(loaded.model, x_t, t, labels, guidance, loaded.model.null_label)
        x0_hat = to_x0(loaded.config.diffusion.prediction, x_t, out, schedule.alphas_cumprod[t].view(-1, 1, 1, 1))
    return x0_hat.clamp(-sc.clip, sc.clip) if sc.clip is not None else x0_hat


def train_refiner_run(cfg: RefinerConfig, out, *, device="auto", log=print) -> dict:
    """Train a refiner for the x0 estimates of run `cfg.generator` into run directory `out`."""
    from fastdiff.data import load_dataset
    from fastdiff.runtime import resolve_device, step_generator
    from fastdiff.sampling import load_run
    from fastdiff.train.loop import Batcher, RunLog, prepare_run_dir

    device = resolve_device(device)
    loaded = load_run(cfg.generator, device)
    gcfg = loaded.config
    T = gcfg.diffusion.num_timesteps
    t_max = T // 2 if cfg.t_max is None else cfg.t_max
    if not 0 <= cfg.t_min <= t_max < T or cfg.steps < 1 or cfg.batch_size < 1:
        raise ConfigError(f"refiner: need 0 <= t_min ({cfg.t_min}) <= t_max ({t_max}) < {T}, steps and batch size > 0")
    data = load_dataset(gcfg.data.dataset, "train", data_dir=gcfg.data.data_dir, image_size=gcfg.model.image_size,
                        channels=gcfg.model.in_channels)
    run_dir = Path(out)
    prepare_run_dir(run_dir, resume=False)
    torch.manual_seed(cfg.seed)
    ucfg = refiner_unet_config(gcfg.model, cfg)
    model = Refiner(ucfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    batcher = Batcher(len(data), cfg.batch_size, cfg.seed)
    runlog = RunLog(run_dir, echo=log)
    runlog.line(f"training a refiner for {cfg.generator} on x0 estimates at t in [{cfg.t_min}, {t_max}], "
                f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params")
    record, loss_sum, identity_sum = {}, torch.zeros((), device=device), torch.zeros((), device=device)
    try:
        for step in range(cfg.steps):
            gen = step_generator(cfg.seed, step, device)
            x0, labels = data.batch(batcher.indices(step), device)
            x0_hat = make_pairs(loaded, x0, labels if gcfg.model.num_classes else None, cfg.t_min, t_max, gen)
            loss = F.mse_loss(model(x0_hat), x0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach()
            identity_sum += F.mse_loss(x0_hat, x0)
            if (step + 1) % 250 == 0 or step + 1 == cfg.steps:
                n = 250 if (step + 1) % 250 == 0 else (step + 1) % 250
                record = {"step": step + 1, "loss": float(loss_sum) / n, "unrefined_loss": float(identity_sum) / n}
                runlog.stats(record)
                runlog.line(f"refiner step {step + 1}/{cfg.steps} mse {record['loss']:.4f} "
                            f"(x0 estimate itself: {record['unrefined_loss']:.4f})")
                loss_sum.zero_()
                identity_sum.zero_()
        config = {"kind": "refiner", "refiner": asdict(cfg), "model": asdict(ucfg)}
        ckpt.write_json_atomic(run_dir / "config.json", config)
        path = ckpt.save_checkpoint(run_dir, cfg.steps, tensors={"model": model.state_dict()},
                                    state={"step": cfg.steps, "kind": "refiner"}, config=config)
        runlog.line(f"checkpoint {path}")
    finally:
        runlog.close()
    return record


def load_refiner(run_dir, device="cpu") -> Refiner:
    """The refiner of a `fastdiff train-refiner` run directory, in eval mode without gradients."""
    path = ckpt.resolve_checkpoint(run_dir)
    config = ckpt.load_json(path, "config")
    if config.get("kind") != "refiner":
        raise CheckpointError(f"{run_dir} is not a refiner run; train one with `fastdiff train-refiner`")
    try:
        model = Refiner(UNetConfig(**config["model"]))
    except (TypeError, KeyError) as e:
        raise CheckpointError(f"{path}/config.json is not a refiner config ({e})") from None
    ckpt.load_model_weights(model, ckpt.load_tensors(path, "model"), path)
    return model.to(device).eval().requires_grad_(False)
