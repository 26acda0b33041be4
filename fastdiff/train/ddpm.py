"""DDPM training of the UNet teacher (Ho et al. 2020, Algorithm 1) with eps / v / x0 targets, classifier-free
guidance label dropout, AdamW with warm-up, gradient clipping, EMA, AMP, atomic checkpoints and exact resume."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fastdiff import checkpoint as ckpt
from fastdiff.config import RunConfig
from fastdiff.data import load_dataset
from fastdiff.diffusion import NoiseSchedule, training_target
from fastdiff.diffusion.parameterization import check_prediction
from fastdiff.errors import ConfigError
from fastdiff.models import UNet
from fastdiff.runtime import AccelOptions, autocast, check_amp, compile_fn, grad_scaler, peak_memory_mb, resolve_device
from fastdiff.train.distributed import QuietLog, init_world
from fastdiff.train.loop import EMA, Batcher, RunLog, check_finite, prepare_run_dir, warmup_lambda
from fastdiff.train.step import make_train_step


def diffusion_loss(model, schedule: NoiseSchedule, x0, labels, gen, *, prediction: str, p_uncond: float,
                   null_label: int | None, device, amp: str) -> torch.Tensor:
    """Sample t and eps, noise x0 to x_t, regress the network output on the prediction target."""
    b = x0.shape[0]
    t = torch.randint(0, schedule.num_timesteps, (b,), device=device, generator=gen)
    eps = torch.randn(x0.shape, device=device, generator=gen)
    x_t = schedule.add_noise(x0, eps, t)
    if null_label is not None:
        drop = torch.rand(b, device=device, generator=gen) < p_uncond
        labels = torch.where(drop, torch.full_like(labels, null_label), labels)
    else:
        labels = None
    ab = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    target = training_target(prediction, x0, eps, ab)
    with autocast(device, amp):
        out = model(x_t, t, labels)
    return F.mse_loss(out.float(), target)


def _flip(x: torch.Tensor, gen) -> torch.Tensor:
    mask = torch.rand(x.shape[0], device=x.device, generator=gen) < 0.5
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)


def train_ddpm(cfg: RunConfig, out, *, device="auto", resume: bool = False, progress: bool = True,
               echo=print, accel: AccelOptions | None = None) -> dict:
    """Train (or resume) a DDPM run in directory `out`; returns the final stats record.

    `accel` picks the fast paths (default: compile + CUDA graphs on a GPU, the plain step on the CPU).
    """
    run_dir = Path(out)
    world, device = init_world(resolve_device(device), cfg.train.batch_size)  # torchrun: one process per device
    tc, mc = cfg.train, cfg.model
    check_amp(tc.amp, device)
    check_prediction(cfg.diffusion.prediction)
    if tc.steps < 1 or tc.batch_size < 1:
        raise ConfigError(f"--steps ({tc.steps}) and --batch-size ({tc.batch_size}) must be positive")

    data = load_dataset(cfg.data.dataset, "train", data_dir=cfg.data.data_dir, image_size=mc.image_size,
                        channels=mc.in_channels)
    if mc.num_classes and data.num_classes != mc.num_classes:
        raise ConfigError(f"the model has {mc.num_classes} classes but {cfg.data.dataset} has {data.num_classes}; "
                          f"set the model's num_classes to {data.num_classes} (or 0 for unconditional)")
    if world.is_main:
        prepare_run_dir(run_dir, resume)
        ckpt.remove_stale_temporaries(run_dir)
    world.barrier()

    torch.manual_seed(tc.seed)
    model = UNet(mc).to(device)
    memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    ema = EMA(model, tc.ema_decay) if world.is_main else None
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay,
                            fused=device.type == "cuda")
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(tc.warmup_steps))
    scaler = grad_scaler(device, tc.amp)
    schedule = NoiseSchedule.from_config(cfg.diffusion, device)
    batcher = Batcher(len(data), tc.batch_size, tc.seed)
    null_label = model.null_label

    start, images_seen, last_ckpt = 0, 0, None
    if resume:
        path = ckpt.latest_good_checkpoint(run_dir, log=echo) or ckpt.latest_checkpoint(run_dir)
        ckpt.load_model_weights(model, ckpt.load_tensors(path, "model", device), path)
        if ema is not None:
            ckpt.load_model_weights(ema.model, ckpt.load_tensors(path, "ema", device), path)
        state = ckpt.load_json(path, "state")
        ckpt.load_optimizer(opt, ckpt.load_tensors(path, "optimizer", device), state["optimizer"])
        lr_sched.load_state_dict(state["lr_scheduler"])
        scaler.load_state_dict(state["grad_scaler"]) if state.get("grad_scaler") else None
        start, images_seen, last_ckpt = state["step"], state["images_seen"], str(path)
    if world.is_main:
        ckpt.write_json_atomic(run_dir / "config.json", cfg.to_dict())
    progress = progress and world.is_main

    log = RunLog(run_dir, echo=(lambda s: tqdm.write(s)) if progress else echo) if world.is_main else QuietLog()
    accel = AccelOptions.for_device(device) if accel is None else accel.check(device)
    accel = world.adjust(accel, log.line)
    forward = compile_fn(world.wrap(model), accel)

    def loss_fn(gen, x0, labels):
        x0 = _flip(x0, gen) if cfg.data.hflip else x0
        return diffusion_loss(forward, schedule, x0, labels, gen, prediction=cfg.diffusion.prediction,
                              p_uncond=tc.p_uncond, null_label=null_label, device=device, amp=tc.amp)

    step_fn = make_train_step(model, opt, loss_fn, grad_clip=tc.grad_clip, seed=world.seed(tc.seed), device=device,
                              amp=tc.amp, options=accel, scaler=scaler, log=log.line)
    n_params = sum(p.numel() for p in model.parameters())
    log.line(f"{'resuming at step ' + str(start) if resume else 'training'} preset={cfg.preset} "
             f"dataset={cfg.data.dataset} ({len(data)} images {tuple(data.shape)}) params={n_params / 1e6:.2f}M "
             f"device={device} amp={tc.amp} steps={tc.steps} batch={tc.batch_size} "
             f"step={type(step_fn).__name__}({'compiled' if accel.compile else 'eager'}) processes={world.size}")

    def save(step: int) -> str:
        opt_tensors, opt_meta = ckpt.optimizer_tensors(opt)
        state = {"step": step, "images_seen": images_seen, "optimizer": opt_meta,
                 "lr_scheduler": lr_sched.state_dict(), "grad_scaler": scaler.state_dict() if scaler.is_enabled()
                 else None, "kind": "ddpm"}
        tensors = {"model": model.state_dict(), "ema": ema.model.state_dict(), "optimizer": opt_tensors}
        path = ckpt.save_checkpoint(run_dir, step, tensors=tensors, state=state, config=cfg.to_dict(),
                                    keep=tc.keep_checkpoints)
        return str(path)

    bar = tqdm(total=tc.steps, initial=start, disable=not progress, unit="step", dynamic_ncols=True)
    loss_sum = torch.zeros((), device=device)
    interval_start, t_interval = start, time.perf_counter()
    record = {}
    model.train()
    try:
        for step in range(start, tc.steps):
            x0, labels = data.batch(world.shard(batcher.indices(step)), device)
            x0 = x0.contiguous(memory_format=memory_format)
            loss, grad_norm = step_fn(step, x0, labels)  # flips, noise and dropout come from (seed, step)
            lr_sched.step()
            if ema is not None:
                ema.update(model, step)
            images_seen += tc.batch_size
            loss_sum += loss.detach()
            done = step + 1
            bar.update(1)
            if done % tc.log_every == 0 or done % tc.ckpt_every == 0 or done == tc.steps:
                n = done - interval_start
                mean_loss = check_finite(world.mean(loss_sum), interval_start, done, last_ckpt) / n
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                setup_s = step_fn.take_setup_seconds()  # compile and capture time, kept out of images/s
                dt = time.perf_counter() - t_interval - setup_s
                record = {"step": done, "kimg": images_seen / 1000, "loss": mean_loss,
                          "grad_norm": float(grad_norm), "lr": lr_sched.get_last_lr()[0],
                          "images_per_sec": n * tc.batch_size / dt, "sec_per_kimg": dt / (n * tc.batch_size / 1000),
                          "peak_mem_mb": peak_memory_mb(device), "time": time.time()}
                if setup_s:
                    record["setup_s"] = setup_s
                log.stats(record)
                log.line(f"step {done}/{tc.steps} loss {mean_loss:.4f} {record['images_per_sec']:.0f} img/s")
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                loss_sum.zero_()
                interval_start, t_interval = done, time.perf_counter()
                if (done % tc.ckpt_every == 0 or done == tc.steps) and world.is_main:
                    last_ckpt = save(done)
                    log.line(f"checkpoint {last_ckpt}")
    finally:
        bar.close()
        log.close()
        world.close()
    return record
