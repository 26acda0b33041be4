"""pytest-benchmark micro-benchmarks of the end-to-end paths: a short sampling run and one training step of a
small UNet, plain against accelerated, on whatever device is present (CPU-sized by default).

    pytest benchmarks/bench_e2e.py                       # on the CPU: plain loop vs static-buffer sampler
    pytest benchmarks/bench_e2e.py --benchmark-json out.json

On a GPU the `fast` variants use every fast path (bf16, channels_last, compile, CUDA graphs). The sizes are
small on purpose: this is the launch-bound regime where graphs matter; `fastdiff bench` measures the presets.
"""

import pytest
import torch

from fastdiff.diffusion import NoiseSchedule, ddpm_table, initial_noise, make_timesteps, run_table, seeds_for
from fastdiff.models import UNet
from fastdiff.models.unet import UNetConfig
from fastdiff.runtime import AccelOptions, compile_fn
from fastdiff.sampling.fast import FastSampler
from fastdiff.train.ddpm import diffusion_loss
from fastdiff.train.step import make_train_step

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CONFIG = UNetConfig(image_size=16, in_channels=1, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                    attn_resolutions=(8,), dropout=0.0, num_groups=8, num_classes=10)
BATCH = 8
STEPS = 10


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _options() -> AccelOptions:
    return AccelOptions.for_device(DEVICE) if DEVICE.type == "cuda" else AccelOptions(channels_last=True)


@pytest.fixture(scope="module")
def sampling():
    torch.manual_seed(0)
    model = UNet(CONFIG).to(DEVICE).eval().requires_grad_(False)
    schedule = NoiseSchedule("linear", 1000)
    table = ddpm_table(schedule, make_timesteps(1000, STEPS), device=DEVICE)
    seeds = seeds_for(0, BATCH).to(DEVICE)
    x = initial_noise(seeds, (1, 16, 16), DEVICE)
    labels = (torch.arange(BATCH) % 10).to(DEVICE)
    return model, table, seeds, x, labels


@pytest.mark.parametrize("path", ["plain", "fast"])
def test_sample_ddpm_10_steps(benchmark, sampling, path):
    model, table, seeds, x, labels = sampling
    if path == "plain":
        def run():
            with torch.no_grad():
                out = run_table(model, x, table, seeds=seeds, labels=labels, guidance=2.0, null_label=10, clip=1.0)
            _sync()
            return out
    else:
        fast = FastSampler(model, _options(), device=DEVICE, shape=(1, 16, 16), guidance=2.0, null_label=10, clip=1.0)

        def run():
            out = fast.run(x, table, seeds=seeds, labels=labels)
            _sync()
            return out
    out = benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("path", ["plain", "fast"])
def test_train_step(benchmark, path):
    torch.manual_seed(0)
    model = UNet(CONFIG).to(DEVICE).train()
    options = _options() if path == "fast" else AccelOptions()
    if options.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=DEVICE.type == "cuda")
    schedule = NoiseSchedule("linear", 1000, device=DEVICE)
    forward = compile_fn(model, options)
    amp = "bf16" if path == "fast" and DEVICE.type == "cuda" else "fp32"

    def loss_fn(gen, x0, labels):
        return diffusion_loss(forward, schedule, x0, labels, gen, prediction="eps", p_uncond=0.1, null_label=10,
                              device=DEVICE, amp=amp)

    step = make_train_step(model, opt, loss_fn, grad_clip=1.0, seed=0, device=DEVICE, amp=amp, options=options)
    x0 = (torch.rand(BATCH, 1, 16, 16) * 2 - 1).to(DEVICE)
    labels = (torch.arange(BATCH) % 10).to(DEVICE)
    counter = iter(range(10**6))

    def run():
        loss, _ = step(next(counter), x0, labels)
        _sync()
        return loss

    loss = benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    assert torch.isfinite(loss)
