"""fastdiff from Python: `fastdiff.load(...)` a trained run, a pretrained model or a diffusers folder, or wrap your
own denoiser in a `fastdiff.Pipeline`, then `.sample(n)`.

Sampling goes through the one entry point (`fastdiff.sampling.resolve_settings` and `sample`), so `fastdiff
sample` and `Pipeline.sample` give the same images bit for bit for the same settings, and the fast path
(channels_last, bf16 autocast, torch.compile, one CUDA graph replay per step; on by default on a GPU) serves any
model callable as model(x, t, labels), with t a float tensor of timesteps [batch].
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from fastdiff import checkpoint as ckpt
from fastdiff.config import RunConfig, SampleConfig
from fastdiff.config_checks import path_arg
from fastdiff.diffusion import NoiseSchedule
from fastdiff.errors import CheckpointError, ConfigError
from fastdiff.images import to_uint8
from fastdiff.runtime import resolve_device
from fastdiff.sampling import Denoiser, SampleSettings, load_run, resolve_settings, sample

OUTPUTS = ("tensor", "numpy", "pil")


class Pipeline:
    """A denoiser with its schedule and sampling defaults; `.sample(n)` draws images.

    Built by `fastdiff.load`, or around your own model: `Pipeline(model, schedule=NoiseSchedule("linear", 1000),
    image_shape=(1, 28, 28), num_classes=10, null_label=10, prediction="eps")`. The model is called as
    model(x, t, labels) with x [batch, C, H, W], t a float tensor [batch] and labels int64 [batch] (None when
    unconditional); it returns eps, v or x0 (`prediction`) of x's shape. null_label is the label of its
    unconditional class (None: no classifier-free guidance). `defaults` (a `fastdiff.config.SampleConfig`) are the
    settings `.sample` uses when not told otherwise (DDIM, 50 steps, clip 1, no guidance). A module samples in eval
    mode (and is put back as it was), and the fast path converts its weights to its layout in place (channels_last
    on most CPUs and GPUs: `.contiguous()` a state dict's tensors to save them, or sample with
    `channels_last=False`). One sampling of a model at a time (`fastdiff.sampling.sample`). The device is the
    module's; pass `device=` for a model that is no torch module (a function around one).
    """

    def __init__(self, model: Callable, *, schedule: NoiseSchedule, image_shape, num_classes: int = 0,
                 null_label: int | None = None, prediction: str = "eps", device=None,
                 defaults: SampleConfig | None = None):
        if not callable(model):
            raise ConfigError(f"the model must be callable as model(x, t, labels), got {type(model).__name__}")
        if not isinstance(schedule, NoiseSchedule):
            raise ConfigError("schedule must be a fastdiff.NoiseSchedule, e.g. NoiseSchedule('linear', 1000)")
        params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
        if other := sorted({str(p.dtype) for p in params if p.is_floating_point() and p.dtype != torch.float32}):
            raise ConfigError(f"the model's weights are {', '.join(other)}; fastdiff samples float32 weights (in bf16 "
                              "or fp16 with amp=...): pass model.float()")
        if device is None:  # a callable that is no module: the CPU unless told
            device = params[0].device if params else torch.device("cpu")
        self.denoiser = Denoiser(model=model, schedule=schedule, image_shape=image_shape, device=device,
                                 num_classes=num_classes, null_label=null_label, prediction=prediction,
                                 defaults=defaults if defaults is not None else SampleConfig())
        self.settings()  # the defaults checked now (steps None was a TypeError, guidance -3 an error at .sample)


    @classmethod
    def from_denoiser(cls, denoiser: Denoiser) -> "Pipeline":
        pipe = cls.__new__(cls)
        pipe.denoiser = denoiser
        return pipe

    @property
    def model(self) -> Callable:
        """The denoiser, callable as model(x, t, labels)."""
        return self.denoiser.model

    @property
    def schedule(self) -> NoiseSchedule:
        return self.denoiser.schedule

    @property
    def config(self) -> RunConfig | None:
        """The run's config (None for a model wrapped with `Pipeline(...)`)."""
        return self.denoiser.config

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    def settings(self, **overrides) -> SampleSettings:
        """The resolved settings of a `.sample` call with these overrides (see `fastdiff.sampling.settings`)."""
        return resolve_settings(self.denoiser, **overrides)

    def sample(self, n: int, *, labels=None, seed: int = 0, sampler: str | None = None, steps: int | None = None,
               guidance: float | None = None, eta: float | None = None, output: str = "tensor", **options):
        """n images; sample i has seed seed + i, so it does not depend on n or the batch size (beyond bf16
        rounding where the model runs under bf16 autocast: the default on a GPU and on a CPU with AMX or
        AVX-512 BF16).

        labels: None (balanced classes i mod num_classes on a conditional model), an int, or a sequence repeated
        to fill n. sampler / steps / guidance / eta and options (spacing, clip, batch_size, compile, cuda_graphs,
        channels_last, amp, compile_mode, max_rows, refiner) default to the run's settings; None, for any of them,
        is the run's setting (clip="none" or float("inf"): no clipping). output: "tensor" (float [n, C, H, W] on
        the CPU, in [-1, 1] unless clip is "none" or above 1), "numpy" (uint8 [n, H, W, C]) or "pil" (a list of PIL
        images, of 1 to 4 channels: L, LA, RGB, RGBA).
        """
        if output not in OUTPUTS:
            raise ConfigError(f"unknown output {output!r}; use one of {', '.join(OUTPUTS)}")
        channels = self.denoiser.image_shape[0]
        if output == "pil" and channels > 4:  # refused before the sampling, not after it
            raise ConfigError(f"PIL images have 1 to 4 channels, the model's {channels}; use output 'numpy' or "
                              "'tensor'")
        settings = self.settings(sampler=sampler, steps=steps, guidance=guidance, eta=eta, **options)
        images = sample(self.denoiser, settings, n=n, seed=seed, labels=labels).images
        if output == "tensor":
            return images
        arrays = to_uint8(images)
        if output == "numpy":
            return arrays
        return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arrays]

    def __repr__(self) -> str:
        d = self.denoiser
        return (f"Pipeline({d.name}, image_shape={d.image_shape}, num_classes={d.num_classes}, "
                f"prediction={d.prediction!r}, {d.schedule!r}, device={d.device})")


def pretrained_folder(name: str) -> Path:
    """The folder of the pretrained model NAME (an error listing the shipped names when there is none)."""
    return ckpt.resolve_checkpoint(f"pretrained:{name}")


def load(path, *, device="auto", use_ema: bool = True) -> Pipeline:
    """A Pipeline from a run directory (its latest checkpoint), a checkpoint folder, `pretrained:NAME` or a
    diffusers pipeline or UNet2DModel folder, on `device` ("auto": CUDA when available).

    use_ema: sample a run's EMA weights (its default); a pretrained folder holds the one set of weights to use.
    """
    device = resolve_device(device)
    path = path_arg("path", path)
    if not path.startswith("pretrained:") and not Path(path).exists():
        raise CheckpointError(f"{path} does not exist; pass a run directory, a checkpoint folder, pretrained:NAME or a "
                              "diffusers folder")
    return Pipeline.from_denoiser(load_run(path, device, use_ema=use_ema))
