"""fastdiff's UNet <-> diffusers' UNet2DModel: configs, schedulers and whole folders in diffusers' layout (the
weights' names: `fastdiff.interop.diffusers_weights`).

The two networks are the same DDPM UNet (Ho et al. 2020) under different names. Nothing here imports diffusers:
the folders are JSON + safetensors, written and read directly.

    export_run(run, out)          a run or checkpoint -> a diffusers pipeline folder (DDPMPipeline.from_pretrained)
    import_unet(folder)           a UNet2DModel folder (or a pipeline folder with unet/) -> fastdiff UNet
    load_diffusers(folder, dev)   -> (UNet in eval mode, RunConfig, NoiseSchedule), for fastdiff.load
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from fastdiff.checkpoint import check_finite, write_error
from fastdiff.config import DiffusionConfig, RunConfig, SampleConfig, UNetConfig
from fastdiff.diffusion.diffusers_options import BETA_SCHEDULES, PREDICTIONS, resolve_options
from fastdiff.diffusion.schedules import NoiseSchedule
from fastdiff.errors import CheckpointError, ConfigError, FastdiffError, FastdiffWarning
from fastdiff.files import signals_held
from fastdiff.images import check_writable
from fastdiff.interop.diffusers_weights import (
    attention_levels,
    from_diffusers,
    renamed_legacy_attention,
    to_diffusers,
)
from fastdiff.models.unet import UNet
from fastdiff.schedulers import DIFFUSERS_VERSION, DDPMScheduler

WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_BIN = "diffusion_pytorch_model.bin"  # older hub folders (read only)

# UNet2DModel options: the value fastdiff's UNet has (None: mapped from UNetConfig below; any other key of a
# config.json that is neither here nor a '_' metadata key is an error, as is a value other than these).
FIXED = {
    "center_input_sample": False, "time_embedding_type": "positional", "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1, "downsample_type": "conv", "upsample_type": "conv", "act_fn": "silu",
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
}
SYNONYMS = {"act_fn": {"swish": "silu"}}  # values diffusers builds the same layer for (its get_activation)
MAPPED = ("sample_size", "in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
          "up_block_types", "dropout", "attention_head_dim", "norm_num_groups", "attn_norm_num_groups", "norm_eps",
          "num_class_embeds", "flip_sin_to_cos", "freq_shift", "downsample_padding", "time_embedding_dim",
          "num_train_timesteps")


NULL_KEY = "_fastdiff_null_label"  # in a UNet2DModel config.json fastdiff wrote: the class row that is its null label
WEIGHTS_KEY = "_fastdiff_weights"  # and which of the run's weights it holds: "ema" or "raw"


# ---- configs ----------------------------------------------------------------------------------------------------
def _attention_channels(cfg: UNetConfig) -> set[int]:
    chans = [cfg.base_channels * m for m, a in zip(cfg.channel_mult, attention_levels(cfg)) if a]
    return set(chans + [cfg.base_channels * cfg.channel_mult[-1]])  # + the middle block's


def unet2d_config(cfg: UNetConfig) -> dict:
    """diffusers' UNet2DModel config.json for fastdiff's UNet of `cfg`."""
    if cfg.num_heads == 1:
        head_dim = None  # one head per attention layer, whatever its width
    elif len(_attention_channels(cfg)) == 1:
        head_dim = _attention_channels(cfg).pop() // cfg.num_heads
    else:
        raise ConfigError(f"num_heads={cfg.num_heads} on attention layers of widths {sorted(_attention_channels(cfg))} "
                          "has no diffusers equivalent (its attention_head_dim is one width for all layers)")
    _check_blocks(cfg.num_res_blocks, [cfg.base_channels * m for m in cfg.channel_mult], "num_res_blocks")
    levels = attention_levels(cfg)
    # The null label, fastdiff's last class row, is no diffusers convention: the key says so (diffusers drops keys
    # that start with "_"), and a folder without it imports with every row a class and no null class.
    null = {NULL_KEY: cfg.num_classes} if cfg.num_classes and cfg.null_class else {}
    return {
        "_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION, **null, **FIXED,
        "sample_size": cfg.image_size, "in_channels": cfg.in_channels, "out_channels": cfg.in_channels,
        "block_out_channels": [cfg.base_channels * m for m in cfg.channel_mult],
        "layers_per_block": cfg.num_res_blocks,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in levels],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels)],
        "dropout": cfg.dropout, "attention_head_dim": head_dim, "norm_num_groups": cfg.num_groups,
        "attn_norm_num_groups": None, "norm_eps": cfg.norm_eps,
        "num_class_embeds": cfg.num_classes + cfg.null_class if cfg.num_classes else None,
        "flip_sin_to_cos": cfg.flip_sin_to_cos, "freq_shift": cfg.freq_shift,
        "downsample_padding": cfg.downsample_padding, "time_embedding_dim": None, "num_train_timesteps": None,
    }


def unet_config_from(d: dict) -> UNetConfig:
    """fastdiff's UNetConfig for a UNet2DModel config.json; a ConfigError names whatever has no equivalent."""
    unknown = sorted(k for k in d if not k.startswith("_") and k not in FIXED and k not in MAPPED)
    if unknown:
        raise ConfigError(f"UNet2DModel option(s) {unknown} have no equivalent in fastdiff's UNet")
    for key, value in FIXED.items():
        given = d.get(key, value)
        if (SYNONYMS.get(key, {}).get(given, given) if isinstance(given, str) else given) != value:
            raise ConfigError(f"UNet2DModel {key}={d[key]!r} is not supported by fastdiff's UNet (it has {value!r})")
    chans = d.get("block_out_channels", (224, 448, 672, 896))
    if not isinstance(chans, (list, tuple)) or not chans or any(
            isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in chans):
        raise ConfigError(f"block_out_channels={chans!r} must be a list of positive integers")
    chans = list(chans)
    base = chans[0]
    if any(c % base for c in chans):
        raise ConfigError(f"block_out_channels={chans} are not multiples of the first, as fastdiff's channel_mult")
    down = list(d.get("down_block_types", ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")))
    up = list(d.get("up_block_types", ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")))
    bad = [b for b in down if b not in ("DownBlock2D", "AttnDownBlock2D")] + \
          [b for b in up if b not in ("UpBlock2D", "AttnUpBlock2D")]
    if bad:
        raise ConfigError(f"block types {bad} are not supported (fastdiff maps DownBlock2D, AttnDownBlock2D, "
                          "UpBlock2D and AttnUpBlock2D)")
    attn = [b == "AttnDownBlock2D" for b in down]
    if len(down) != len(chans) or [b == "AttnUpBlock2D" for b in reversed(up)] != attn:
        raise ConfigError(f"up_block_types={up} do not mirror down_block_types={down} with {len(chans)} levels, "
                          "as fastdiff's UNet does")
    size = d.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ConfigError(f"sample_size={size} is not square; fastdiff's UNet config has one image_size")
        size = size[0]
    if not isinstance(size, int):
        raise ConfigError(f"sample_size={size!r}: fastdiff needs the image size the model was trained at")
    groups = d.get("norm_num_groups", 32)
    if d.get("attn_norm_num_groups") not in (None, groups):
        raise ConfigError(f"attn_norm_num_groups={d['attn_norm_num_groups']} differs from norm_num_groups={groups}")
    in_ch = d.get("in_channels", 3)
    if d.get("out_channels", 3) != in_ch:
        raise ConfigError(f"out_channels={d.get('out_channels', 3)} differs from in_channels={in_ch} (fastdiff's UNet "
                          "predicts eps, v or x0 of the input's shape; learned variances are not supported)")
    if d.get("time_embedding_dim") not in (None, 4 * base):
        raise ConfigError(f"time_embedding_dim={d['time_embedding_dim']} is not 4 * block_out_channels[0] = {4 * base}")
    if d.get("downsample_padding", 1) not in (0, 1):
        raise ConfigError(f"downsample_padding={d['downsample_padding']} is not supported (0 or 1)")
    classes = d.get("num_class_embeds") or 0
    null = d.get(NULL_KEY)
    if null is not None and (not classes or null != classes - 1):
        raise ConfigError(f"{NULL_KEY}={null!r} is not the last of num_class_embeds={classes} class rows, as fastdiff "
                          "writes it; remove the key (every row a class) or correct it")
    _check_blocks(d.get("layers_per_block", 2), chans, "layers_per_block")
    heads = _heads(d.get("attention_head_dim", 8), chans, attn)
    return UNetConfig(
        image_size=size, in_channels=in_ch, base_channels=base, channel_mult=tuple(c // base for c in chans),
        num_res_blocks=d.get("layers_per_block", 2), attn_resolutions=tuple(size // 2**i for i, a in enumerate(attn)
                                                                             if a),
        num_heads=heads, dropout=float(d.get("dropout", 0.0)), num_groups=groups,
        num_classes=classes - 1 if null is not None else classes, null_class=null is not None or not classes,
        flip_sin_to_cos=bool(d.get("flip_sin_to_cos", True)),
        freq_shift=float(d.get("freq_shift", 0)), downsample_padding=d.get("downsample_padding", 1),
        norm_eps=float(d.get("norm_eps", 1e-5)),
    )


def _check_blocks(blocks, chans, name: str) -> None:
    """0 blocks per level with widths that change between levels: the two UNets build different layers there (no
    resnet changes a level's width), so their weights do not map (diffusers refused such an export's weights; an
    import of such a folder failed on the shapes)."""
    if blocks == 0 and len(set(chans)) > 1:
        raise ConfigError(f"{name}=0 with widths {chans} that change between levels has no equivalent in the other "
                          "library's UNet (widths change in the resnets); use at least 1 block per level")


def _heads(head_dim, chans, attn) -> int:
    if head_dim is None:
        return 1
    widths = sorted({c for c, a in zip(chans, attn) if a} | {chans[-1]})
    heads = {w // head_dim for w in widths}
    if len(heads) != 1 or any(w % head_dim for w in widths):
        raise ConfigError(f"attention_head_dim={head_dim} gives a different head count on attention layers of widths "
                          f"{widths}; fastdiff's UNet has one num_heads for all of them")
    return heads.pop()


# ---- schedulers -------------------------------------------------------------------------------------------------
def scheduler_for(dc: DiffusionConfig, sc: SampleConfig) -> DDPMScheduler:
    """The DDPMScheduler that samples like fastdiff's DDPM sampler with this run's schedule and clip."""
    beta = {v: k for k, v in BETA_SCHEDULES.items()}[dc.schedule]  # every schedule a run config takes
    scale = 1.0 if dc.num_timesteps == 1000 else 1000.0 / dc.num_timesteps  # diffusers' endpoints are unscaled
    return DDPMScheduler(
        num_train_timesteps=dc.num_timesteps, beta_start=dc.beta_start * scale, beta_end=dc.beta_end * scale,
        beta_schedule=beta, rescale_betas_zero_snr=dc.zero_terminal_snr,
        prediction_type={v: k for k, v in PREDICTIONS.items()}[dc.prediction], variance_type="fixed_small",
        clip_sample=sc.clip is not None, clip_sample_range=sc.clip or 1.0, timestep_spacing=sc.spacing,
    )


def run_sections(sched: dict | None) -> tuple[DiffusionConfig, SampleConfig]:
    """The diffusion and sample sections of a run config for a scheduler_config.json (None: diffusers' defaults).

    Keys fastdiff's own samplers cannot honour are errors naming them (fastdiff.schedulers honours more)."""
    sched = dict(sched or {})
    cls = sched.get("_class_name", "DDPMScheduler")
    opts = resolve_options(sched, cls if cls in ("DDPMScheduler", "DDIMScheduler") else "DDPMScheduler")
    hint = "; sample it with diffusers and fastdiff.schedulers, which honour it"
    if opts["trained_betas"] is not None:
        raise ConfigError(f"trained_betas has no field in fastdiff's run config{hint}")
    if opts["steps_offset"] and opts["timestep_spacing"] == "leading":
        raise ConfigError(f"steps_offset={opts['steps_offset']} is not supported by fastdiff's samplers{hint}")
    if not opts.get("set_alpha_to_one", True):
        raise ConfigError(f"set_alpha_to_one=False is not supported by fastdiff's samplers{hint}")
    if opts.get("variance_type", "fixed_small") not in ("fixed_small", "fixed_small_log"):
        raise ConfigError(f"variance_type={opts['variance_type']!r} is not supported by fastdiff's DDPM sampler{hint}")
    T = int(opts["num_train_timesteps"])
    scale = 1.0 if T == 1000 else T / 1000.0
    diffusion = DiffusionConfig(
        schedule=BETA_SCHEDULES[opts["beta_schedule"]], num_timesteps=T, beta_start=opts["beta_start"] * scale,
        beta_end=opts["beta_end"] * scale, zero_terminal_snr=bool(opts["rescale_betas_zero_snr"]),
        prediction=PREDICTIONS[opts["prediction_type"]],
    )
    sample = SampleConfig(spacing=opts["timestep_spacing"],
                          clip=float(opts["clip_sample_range"]) if opts["clip_sample"] else None)
    return diffusion, sample


# ---- folders ----------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (json.JSONDecodeError, OSError) as e:
        raise CheckpointError(f"{path} is not readable JSON ({e})") from None


def _unet_folder(path: Path) -> Path:
    if (path / "model_index.json").exists() and (path / "unet" / "config.json").exists():
        return path / "unet"
    return path


def is_diffusers_folder(path) -> bool:
    """A diffusers pipeline folder (model_index.json + unet/) or a UNet2DModel folder (its config.json)."""
    p = Path(path)
    if not p.is_dir():
        return False
    config = _unet_folder(p) / "config.json"
    try:
        return config.exists() and json.loads(config.read_text()).get("_class_name") == "UNet2DModel"
    except (ValueError, RecursionError, OSError, AttributeError):  # not JSON, not UTF-8, nested too deep: the
        # loader it falls to then names what is wrong with the file
        return False


def import_unet(folder, device="cpu") -> tuple[UNet, UNetConfig, dict | None]:
    """A UNet2DModel folder (or a pipeline folder with unet/ and scheduler/) as fastdiff's UNet, loaded strictly.

    Returns (UNet in eval mode, its UNetConfig, the scheduler_config.json dict or None)."""
    root = Path(folder)
    if not is_diffusers_folder(root):
        raise CheckpointError(f"{root} is not a diffusers UNet2DModel folder (config.json with _class_name "
                              "UNet2DModel) or pipeline folder (model_index.json with unet/)")
    unet_dir = _unet_folder(root)
    cfg = unet_config_from(_read_json(unet_dir / "config.json"))
    model = UNet(cfg)
    fd_shapes = {k: v.shape for k, v in model.state_dict().items()}
    state = renamed_legacy_attention(_read_weights(unet_dir))
    model.load_state_dict(from_diffusers(state, cfg, fd_shapes), strict=True)
    sched_file = root / "scheduler" / "scheduler_config.json"
    sched = _read_json(sched_file) if unet_dir != root and sched_file.exists() else None
    return model.to(device).eval().requires_grad_(False), cfg, sched


def _read_weights(unet_dir: Path) -> dict[str, torch.Tensor]:
    """The folder's weights, all finite (as every checkpoint fastdiff loads: `checkpoint.check_finite`)."""
    path = unet_dir / WEIGHTS if (unet_dir / WEIGHTS).exists() else unet_dir / WEIGHTS_BIN
    if not path.exists():
        raise CheckpointError(f"{unet_dir} has no {WEIGHTS} (or {WEIGHTS_BIN})")
    try:
        if path.name == WEIGHTS:
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"the weights in {unet_dir} are not readable ({e})") from None
    return check_finite(path, state)


RUN_CONFIG = "fastdiff_run.json"  # in a folder fastdiff exported: the run's config (diffusers ignores the file)


def load_diffusers(path, device="cpu") -> tuple[UNet, RunConfig, NoiseSchedule]:
    """(UNet in eval mode, a RunConfig, schedule). In a folder fastdiff exported, the run's own config (its
    sampling defaults, dataset and, for a student, its timesteps), where it still describes the UNet and the
    scheduler that the folder holds; else one whose diffusion and sample sections reflect the scheduler config
    (preset "diffusers": no dataset of its own)."""
    model, ucfg, sched = import_unet(path, device)
    pipeline = Path(path).resolve().parent
    if sched is None and (pipeline / "model_index.json").exists():  # its scheduler was dropped without a word
        warnings.warn(f"{path} is the UNet of the pipeline folder {pipeline}, whose scheduler (schedule, prediction, "
                      f"clip) is read only where that folder is loaded; sampling it with diffusers' defaults instead",
                      FastdiffWarning, stacklevel=2)
    diffusion, sample = run_sections(sched)
    cfg = RunConfig(preset="diffusers", model=ucfg, diffusion=diffusion, sample=sample)
    saved = Path(path) / RUN_CONFIG
    if saved.exists():
        from fastdiff.config import load_config

        run = load_config(saved)
        # the export scaled beta_start/end by 1000/T and the import by T/1000: equal up to float rounding
        same = dataclasses.replace(run.diffusion, beta_start=diffusion.beta_start, beta_end=diffusion.beta_end)
        if (run.model == ucfg and same == diffusion and math.isclose(run.diffusion.beta_start, diffusion.beta_start)
                and math.isclose(run.diffusion.beta_end, diffusion.beta_end)):
            # the scheduler's spacing and clip, as a diffusers pipeline of the folder samples (the export wrote
            # the run's; an edit of scheduler_config.json was ignored)
            cfg = dataclasses.replace(run, sample=dataclasses.replace(run.sample, spacing=sample.spacing,
                                                                      clip=sample.clip))
    return model, cfg, NoiseSchedule.from_config(cfg.diffusion, device)


EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def export_run(run_or_checkpoint, out_dir, *, use_ema: bool = True, dtype: str = "fp32") -> Path:
    """Write a run's UNet (EMA weights by default) as a diffusers pipeline folder that DDPMPipeline loads:
    model_index.json, unet/ (config.json, diffusion_pytorch_model.safetensors) and scheduler/, and the run's
    config (RUN_CONFIG), from which `fastdiff.load` and `fastdiff sample` take its sampling defaults.

    diffusers' DDPMPipeline and DDIMPipeline sample an unconditional model only: a class-conditional one takes
    `class_labels` in a loop of one's own (its unet/config.json names the null label of guidance,
    `_fastdiff_null_label`). A student's own sampler is fastdiff's: in diffusers, DDIM at 1 step is the same.
    dtype: the weights' dtype in the file, "fp32" (as trained), "fp16" or "bf16" (half the size; both load into
    float32 models, in fastdiff and diffusers, within that dtype's rounding)."""
    from fastdiff.config_checks import path_arg
    from fastdiff.sampling import load_run

    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"unknown export dtype {dtype!r}; use one of {', '.join(EXPORT_DTYPES)}")
    out_dir = path_arg("out_dir", out_dir)
    loaded = load_run(run_or_checkpoint, "cpu", use_ema=use_ema)
    cfg = loaded.config
    config = unet2d_config(cfg.model)
    scheduler = scheduler_for(cfg.diffusion, cfg.sample)
    out = Path(out_dir).resolve()  # "." has no name to build the temporary sibling's from
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not an empty folder; choose a new folder for the export")
    check_writable(out, folder=True, what="the export folder")
    made = [p for p in out.parents if not p.exists()]  # removed again if the export fails
    moved = []
    # Written into a temporary sibling and renamed into place: a failure leaves no half-written export behind
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if not is_diffusers_folder(run_or_checkpoint):  # which of a run's weights (a pretrained model's are EMA)
        config = {**config, WEIGHTS_KEY: "ema" if use_ema else "raw"}
    try:
        (tmp / "unet").mkdir(parents=True)
        # plain writes inside the temporary folder: its rename is the atomic step, and an error names the export
        weights = {k: v.to(EXPORT_DTYPES[dtype]) if v.is_floating_point() else v
                   for k, v in to_diffusers(loaded.model.state_dict(), cfg.model).items()}
        (tmp / "unet" / WEIGHTS).write_bytes(safetensors_bytes(weights))
        (tmp / "unet" / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        scheduler.save_pretrained(tmp / "scheduler")
        index = {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
                 "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / RUN_CONFIG).write_text(cfg.to_json() + "\n")
        if out.exists():  # empty (checked above), perhaps the shell's current folder: filled, not replaced
            with signals_held():  # model_index.json last: until it is in, the folder is no diffusers folder
                for name in ("unet", "scheduler", RUN_CONFIG, "model_index.json"):
                    os.rename(tmp / name, out / name)
                    moved.append(out / name)
            tmp.rmdir()
        else:
            os.rename(tmp, out)
    except BaseException as e:  # a full disk, Ctrl-C, SIGTERM: no half-written export stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        for path in moved:  # the empty folder it was
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        for folder in made:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(e, OSError):
            raise FastdiffError(write_error(f"the export {out}", e)) from None
        raise
    return out


__all__ = ["export_run", "from_diffusers", "import_unet", "is_diffusers_folder", "load_diffusers", "run_sections",
           "scheduler_for", "to_diffusers", "unet2d_config", "unet_config_from"]
