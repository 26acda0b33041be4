"""fastdiff's UNet <-> diffusers' UNet2DModel: the weights' names (`fastdiff.interop.diffusers` maps the configs and
the folders). The one structural difference is attention: fastdiff fuses q, k and v into one 1x1 conv (`qkv`,
rows q | k | v, heads contiguous), diffusers has three Linear layers (`to_q`, `to_k`, `to_v`) and `to_out.0`
for fastdiff's `proj`."""

from __future__ import annotations

import torch

from fastdiff.config import UNetConfig
from fastdiff.errors import CheckpointError, ConfigError


def attention_levels(cfg: UNetConfig) -> list[bool]:
    """Whether each level (highest resolution first) has attention."""
    return [cfg.image_size // 2**i in cfg.attn_resolutions for i in range(len(cfg.channel_mult))]


_RES = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
        "skip": "conv_shortcut"}


def _module_pairs(cfg: UNetConfig) -> list[tuple[str, str, str]]:
    """(fastdiff module, diffusers module, kind) for every module with weights; kind is res, attn or plain."""
    pairs = [("time_embed.linear_1", "time_embedding.linear_1", "plain"),
             ("time_embed.linear_2", "time_embedding.linear_2", "plain"), ("class_embed", "class_embedding", "plain"),
             ("conv_in", "conv_in", "plain"), ("norm_out", "conv_norm_out", "plain"), ("conv_out", "conv_out", "plain"),
             ("mid.0", "mid_block.resnets.0", "res"), ("mid.1", "mid_block.attentions.0", "attn"),
             ("mid.2", "mid_block.resnets.1", "res")]
    levels = attention_levels(cfg)
    # Down and up blocks pair alike: fastdiff numbers its blocks flat (down.k / up.k), diffusers per level; the up
    # path runs the levels in reverse with one extra resnet each (for the skip) and upsamplers where down has
    # downsamplers.
    for side, order, resnets, sampler in (("down", levels, cfg.num_res_blocks, "downsamplers"),
                                           ("up", levels[::-1], cfg.num_res_blocks + 1, "upsamplers")):
        k = 0
        for i, attn in enumerate(order):
            for j in range(resnets):
                pairs.append((f"{side}.{k}.0", f"{side}_blocks.{i}.resnets.{j}", "res"))
                if attn:
                    pairs.append((f"{side}.{k}.1", f"{side}_blocks.{i}.attentions.{j}", "attn"))
                k += 1
            if i != len(levels) - 1:
                pairs.append((f"{side}.{k}.0.conv", f"{side}_blocks.{i}.{sampler}.0.conv", "plain"))
                k += 1
    return pairs


def _key_map(cfg: UNetConfig, fd_keys) -> dict[str, tuple[str, str]]:
    """fastdiff key -> (diffusers key or, for a fused qkv, its three keys joined by '|', the tensor transform)."""
    modules = {fd: (df, kind) for fd, df, kind in _module_pairs(cfg)}
    out = {}
    for key in fd_keys:
        module, _, leaf = key.rpartition(".")
        owner, _, sub = module.rpartition(".")
        if module in modules:  # a plain module
            out[key] = (f"{modules[module][0]}.{leaf}", "same")
        elif owner in modules and modules[owner][1] == "res" and sub in _RES:
            out[key] = (f"{modules[owner][0]}.{_RES[sub]}.{leaf}", "same")
        elif owner in modules and modules[owner][1] == "attn":
            df = modules[owner][0]
            if sub == "norm":
                out[key] = (f"{df}.group_norm.{leaf}", "same")
            elif sub == "qkv":
                out[key] = ("|".join(f"{df}.to_{n}.{leaf}" for n in "qkv"), "qkv")
            elif sub == "proj":
                out[key] = (f"{df}.to_out.0.{leaf}", "conv1x1")
        if key not in out:
            raise ConfigError(f"fastdiff UNet parameter {key!r} has no diffusers name (a bug: the UNet changed)")
    return out


def to_diffusers(state: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """fastdiff UNet state dict -> UNet2DModel state dict."""
    out = {}
    for key, (df, how) in _key_map(cfg, state).items():
        t = state[key].detach().cpu()
        if how == "qkv":  # [3C, C, 1, 1] conv -> three [C, C] Linear weights (or [3C] -> three [C] biases)
            for name, part in zip(df.split("|"), t.chunk(3, dim=0)):
                out[name] = part.flatten(1) if part.dim() == 4 else part.clone()
        elif how == "conv1x1":
            out[df] = t.flatten(1) if t.dim() == 4 else t.clone()
        else:
            out[df] = t.clone()
    return {k: v.contiguous() for k, v in out.items()}


def _diffusers_shape(fd_shape: torch.Size, how: str) -> tuple[int, ...]:
    """The shape of the diffusers tensor (each of the three for qkv) that becomes a fastdiff tensor of fd_shape."""
    if how == "same" or len(fd_shape) == 1 and how == "conv1x1":
        return tuple(fd_shape)
    if how == "conv1x1":
        return tuple(fd_shape[:2])
    return (fd_shape[0] // 3, *fd_shape[1:2])  # qkv: one third of the rows, as a Linear weight or bias


LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def renamed_legacy_attention(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Attention weights under the names of diffusers before 0.15 (query, key, value, proj_attn), still in many hub
    folders, under today's (to_q, to_k, to_v, to_out.0), as diffusers renames them when it loads them."""
    out = {}
    for key, tensor in state.items():
        module, _, leaf = key.rpartition(".")
        owner, _, sub = module.rpartition(".")
        if sub in LEGACY_ATTENTION and owner.rpartition(".")[0].endswith("attentions"):
            key = f"{owner}.{LEGACY_ATTENTION[sub]}.{leaf}"
        out[key] = tensor
    return out


def from_diffusers(state: dict[str, torch.Tensor], cfg: UNetConfig, fd_shapes: dict[str, torch.Size]):
    """UNet2DModel state dict -> fastdiff UNet state dict (shapes `fd_shapes`); every key of `state` must map, each
    to a tensor of exactly the shape its config gives it (not merely as many elements)."""
    left = dict(state)
    out = {}
    for key, (df, how) in _key_map(cfg, fd_shapes).items():
        names = df.split("|")
        missing = [n for n in names if n not in left]
        if missing:
            raise CheckpointError(f"the diffusers weights have no {missing[0]!r} (for fastdiff's {key!r}); "
                                  "the folder's config.json does not describe its weights")
        parts = [left.pop(n) for n in names]
        want = _diffusers_shape(fd_shapes[key], how)
        for name, part in zip(names, parts):
            if tuple(part.shape) != want:
                raise CheckpointError(f"the diffusers weight {name!r} has shape {list(part.shape)} where the "
                                      f"folder's config.json gives {list(want)}; the config.json does not describe "
                                      "its weights")
        t = torch.cat(parts, dim=0) if how == "qkv" else parts[0]
        out[key] = t.reshape(fd_shapes[key])
    if left:
        raise CheckpointError(f"diffusers weight(s) {sorted(left)[:5]}{' ...' if len(left) > 5 else ''} do not map "
                              "to fastdiff's UNet (an architecture fastdiff does not implement)")
    return out
