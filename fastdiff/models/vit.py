"""A small Vision Transformer (Dosovitskiy et al. 2021) used as the feature network of the ADD discriminator.

Patch embedding (a strided conv), a class token and learned position embeddings, then pre-norm blocks
x = x + attn(LN(x)); x = x + mlp(LN(x)) (optionally with DINOv2's layer scale). `tokens(x, taps)` returns the
patch tokens after the tapped blocks, which the discriminator heads read.

The backbone comes from one of two checkpoints:
- a ViT classifier that fastdiff pretrains on the dataset and caches (`load_or_pretrain_vit`), or
- a local timm / DINO / DINOv2-format state dict (`vit_from_timm`): its keys are mapped onto this module, the
  architecture is read off the tensor shapes, and the position embeddings are resized to the input grid.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.checkpoint import check_finite, read_json, read_tensors, save_tensors
from fastdiff.errors import CheckpointError, ConfigError
from fastdiff.nn import attention
from fastdiff.runlock import waiting_lock
from fastdiff.runtime import isolated_rng
from fastdiff.state_dicts import mismatch


@dataclass
class ViTConfig:
    image_size: int = 8  # the input is resized to this size first when it differs
    in_channels: int = 1
    patch_size: int = 2
    dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 0  # > 0: a classification head on the class token (used for pretraining)
    num_registers: int = 0  # DINOv2 register tokens
    layer_scale: bool = False  # DINOv2 per-channel residual scales
    # Pixel normalisation after mapping [-1, 1] to [0, 1]; empty: the [-1, 1] input is used as it is.
    pixel_mean: tuple[float, ...] = ()
    pixel_std: tuple[float, ...] = ()

    def __post_init__(self):
        self.pixel_mean, self.pixel_std = tuple(self.pixel_mean), tuple(self.pixel_std)
        if self.image_size % self.patch_size:
            raise ConfigError(f"ViT image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.dim % self.num_heads:
            raise ConfigError(f"ViT dim={self.dim} is not divisible by num_heads={self.num_heads}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


class Attention(nn.Module):
    """Multi-head self-attention with one qkv projection (rows: q, k, v, each head-major, as in timm)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        h = attention(qkv[0], qkv[1], qkv[2])  # [b, heads, n, c/heads]
        return self.out(h.transpose(1, 2).reshape(b, n, c))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.attn = Attention(cfg.dim, cfg.num_heads)
        self.ln2 = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.mlp = MLP(cfg.dim, round(cfg.dim * cfg.mlp_ratio))  # round: 120 / 88 * 88 is 119.99...
        self.gamma1 = nn.Parameter(torch.ones(cfg.dim)) if cfg.layer_scale else None
        self.gamma2 = nn.Parameter(torch.ones(cfg.dim)) if cfg.layer_scale else None

    def forward(self, x):
        a = self.attn(self.ln1(x))
        x = x + (a * self.gamma1 if self.gamma1 is not None else a)
        m = self.mlp(self.ln2(x))
        return x + (m * self.gamma2 if self.gamma2 is not None else m)


class ViT(nn.Module):
    """ViT over images in [-1, 1]: `forward` gives class logits, `tokens` the patch tokens of chosen blocks."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch = nn.Conv2d(cfg.in_channels, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.registers = nn.Parameter(torch.zeros(1, cfg.num_registers, cfg.dim)) if cfg.num_registers else None
        self.pos = nn.Parameter(torch.randn(1, 1 + cfg.grid**2, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.ln = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.head = nn.Linear(cfg.dim, cfg.num_classes) if cfg.num_classes else None
        # The backbone's input normalisation (timm / DINO files), kept on the model's device: not in state_dict.
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(1, -1, 1, 1), persistent=False)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Resize, match channels (grey <-> RGB) and normalise images in [-1, 1] for this backbone."""
        cfg = self.cfg
        if x.shape[-1] != cfg.image_size or x.shape[-2] != cfg.image_size:
            x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False)
        if x.shape[1] != cfg.in_channels:
            if x.shape[1] == 1:
                x = x.expand(-1, cfg.in_channels, -1, -1)
            elif cfg.in_channels == 1:
                x = x.mean(1, keepdim=True)
            else:
                raise ConfigError(f"the ViT takes {cfg.in_channels}-channel images, got {x.shape[1]} channels")
        if cfg.pixel_mean:
            x = ((x + 1) / 2 - self.pixel_mean.to(x.dtype)) / self.pixel_std.to(x.dtype)
        return x

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(self.prepare(x)).flatten(2).transpose(1, 2)  # [b, grid^2, dim]
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1) + self.pos
        if self.registers is not None:  # DINOv2: registers after the class token, without position embedding
            h = torch.cat([h[:, :1], self.registers.expand(h.shape[0], -1, -1), h[:, 1:]], dim=1)
        return h

    def tokens(self, x: torch.Tensor, taps: list[int]) -> list[torch.Tensor]:
        """Patch tokens [b, grid^2, dim] after each block index in `taps` (0-based, ascending)."""
        h, out, first = self._embed(x), [], 1 + self.cfg.num_registers
        for i, block in enumerate(self.blocks[: max(taps) + 1]):
            h = block(h)
            if i in taps:
                out.append(h[:, first:])
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise ConfigError("this ViT has no classification head (num_classes = 0)")
        h = self._embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h[:, 0]))


def even_taps(depth: int, count: int) -> list[int]:
    """`count` block indices evenly spaced over `depth` blocks, always including the last one."""
    if not 1 <= count <= depth:
        raise ConfigError(f"cannot tap {count} blocks of a {depth}-block ViT; use 1 to {depth} heads")
    return sorted({round((k + 1) * depth / count) - 1 for k in range(count)})


# ---------------------------------------------------------------------------------------------------------------
# timm / DINO / DINOv2 state dicts

# timm name -> fastdiff name: prefixes of whole keys, then parts inside block keys.
_TIMM_PREFIXES = (("patch_embed.proj.", "patch."), ("cls_token", "cls"), ("pos_embed", "pos"),
                  ("reg_token", "registers"), ("register_tokens", "registers"), ("norm.", "ln."))
_TIMM_INFIXES = ((".norm1.", ".ln1."), (".norm2.", ".ln2."), (".attn.proj.", ".attn.out."),
                 (".ls1.gamma", ".gamma1"), (".ls2.gamma", ".gamma2"))
_IGNORED = ("head.", "head_dist.", "mask_token", "fc_norm.", "pre_logits.")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def unwrap_state_dict(obj) -> dict[str, torch.Tensor]:
    """The backbone tensors of a checkpoint: DINO training checkpoints nest them under teacher / student
    (prefixed module.backbone.), others under model or state_dict, possibly prefixed module. or backbone."""
    for key in ("teacher", "model", "state_dict", "student"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("the backbone file holds no state dict of tensors; expected a timm or DINO ViT")
    out = {}
    for k, v in obj.items():
        for prefix in ("module.", "backbone.", "encoder."):
            k = k[len(prefix):] if k.startswith(prefix) else k
        out[k] = v
    return out


def map_timm_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename timm-format keys to this module's names; drop classifier heads and DINOv2's mask token."""
    mapped = {}
    for key, value in sd.items():
        if key.startswith(_IGNORED):
            continue
        for old, new in _TIMM_PREFIXES:
            if key.startswith(old):
                key = new + key[len(old):]
        for old, new in _TIMM_INFIXES:
            key = key.replace(old, new)
        mapped[key] = value
    return mapped


def _resize_pos(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """[1, 1 + g^2, d] position embeddings (class token first) bicubically resized to a grid x grid layout."""
    cls, patches = pos[:, :1], pos[:, 1:]
    g = math.isqrt(patches.shape[1])
    if g * g != patches.shape[1]:
        raise CheckpointError(f"position embeddings for {patches.shape[1]} patches are not a square grid")
    if g == grid:
        return pos
    p = patches.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
    p = F.interpolate(p, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, p.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos.dtype)], dim=1)


def vit_from_timm(sd: dict[str, torch.Tensor], *, image_size: int | None = None, num_heads: int | None = None,
                  normalize: bool = True) -> ViT:
    """A ViT holding a timm/DINO-format state dict (no classification head).

    The architecture is read from the shapes: width from pos_embed, patch size and channels from
    patch_embed.proj, depth from the block count, MLP ratio from fc1, layer scale and registers from their
    keys. Heads are not stored in the weights: `num_heads` (default: width / 64, the ViT convention).
    image_size (default: the pretraining size) sets the input grid; position embeddings are resized to it.
    normalize: inputs are normalised with the ImageNet mean and std, as these models were trained.
    """
    sd = map_timm_keys(unwrap_state_dict(sd))
    missing = [k for k in ("patch.weight", "pos", "cls", "blocks.0.attn.qkv.weight") if k not in sd]
    if missing:
        raise CheckpointError(f"not a timm/DINO ViT state dict: no {', '.join(missing)} after mapping its keys")
    dim = sd["pos"].shape[-1]
    patch, channels = sd["patch.weight"].shape[-1], sd["patch.weight"].shape[1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    registers = sd["registers"].shape[1] if "registers" in sd else 0
    positions = sd["pos"].shape[1]
    if math.isqrt(positions) ** 2 == positions:  # timm's no_embed_class models (its DINOv2 with registers): the
        # patches' positions only, none added to the class token, which a zero position for it is
        sd["pos"] = torch.cat([torch.zeros_like(sd["pos"][:, :1]), sd["pos"]], dim=1)
    pretrain_grid = math.isqrt(sd["pos"].shape[1] - 1)
    cfg = ViTConfig(image_size=image_size or pretrain_grid * patch, in_channels=channels, patch_size=patch, dim=dim,
                    depth=depth, num_heads=num_heads or max(1, dim // 64),
                    mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / dim, num_registers=registers,
                    layer_scale="blocks.0.gamma1" in sd,
                    pixel_mean=IMAGENET_MEAN[:channels] if normalize else (),
                    pixel_std=IMAGENET_STD[:channels] if normalize else ())
    sd["pos"] = _resize_pos(sd["pos"], cfg.grid)
    model = ViT(cfg)
    if "ln.weight" not in sd:  # timm models with global average pooling keep fc_norm instead; unused here
        sd["ln.weight"], sd["ln.bias"] = model.ln.weight.detach().clone(), model.ln.bias.detach().clone()
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise CheckpointError(f"the ViT state dict does not map onto fastdiff's ViT: {mismatch(e)}") from None
    return model


def check_vit_file(path) -> Path:
    """A backbone file's path, which must exist (one CheckpointError naming the fix)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"backbone file {path} does not exist; pass a timm/DINO ViT state dict, or "
                              "--backbone pretrain to train one on the dataset")
    return path


def load_vit_file(path, *, image_size: int | None = None, num_heads: int | None = None) -> ViT:
    """A backbone from a local file: a fastdiff ViT (.safetensors with its .json config beside it), or a
    timm/DINO state dict (.safetensors, .pth, .pt, .bin)."""
    path = check_vit_file(path)
    meta = path.with_suffix(".json")
    if path.suffix == ".safetensors" and meta.exists():
        model = _load_cached(path, meta)
        if image_size is None or image_size == model.cfg.image_size:
            return model
        cfg = replace(model.cfg, image_size=image_size)  # --backbone-size: its positions resized, as a timm file's
        sd = model.state_dict()
        sd["pos"] = _resize_pos(sd["pos"], cfg.grid)
        model = ViT(cfg)
        model.load_state_dict(sd)
        return model
    try:
        sd = read_tensors(path) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu",
                                                                                  weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise CheckpointError(f"cannot read the backbone file {path} ({str(e) or type(e).__name__}: "
                              f"{path.stat().st_size} bytes)") from None
    if path.suffix != ".safetensors":  # read_tensors has checked those; here the backbone's tensors, once unwrapped
        check_finite(path, unwrap_state_dict(sd))
    return vit_from_timm(sd, image_size=image_size, num_heads=num_heads)


# ---------------------------------------------------------------------------------------------------------------
# Pretraining on the dataset (a classifier, cached like the evaluation classifier)


def pretrain_vit(images: torch.Tensor, labels: torch.Tensor, cfg: ViTConfig, *, steps: int = 1500,
                 batch_size: int = 128, lr: float = 1e-3, seed: int = 0, device="cpu", log=None,
                 progress: bool = False) -> ViT:
    """Train a ViT classifier on images in [-1, 1] (random translations, label smoothing); returns it in eval."""
    from fastdiff.models.classifier import fit_classifier

    torch.manual_seed(seed)
    model = ViT(cfg).to(device)
    return fit_classifier(model, images, labels, steps=steps, batch_size=batch_size, lr=lr, seed=seed, log=log,
                          name="ViT backbone", progress=progress)


def _load_cached(path: Path, meta_path: Path) -> ViT:
    try:
        meta = json.loads(meta_path.read_text())
        model = ViT(ViTConfig(**meta["config"]))
        model.load_state_dict(read_tensors(path))
    except Exception as e:  # noqa: BLE001 - any failure to read it is the same user error
        raise CheckpointError(f"cannot load the ViT {path} with {meta_path} ({e}); delete both to retrain") from None
    return model


def load_or_pretrain_vit(data, cache_dir, cfg: ViTConfig, *, steps: int = 1500, device="cpu", log=None,
                         progress: bool = False) -> ViT:
    """The dataset's pretrained ViT classifier, trained once and cached in cache_dir as safetensors + JSON.

    The global random state is the same after it whether it trained the ViT or read it, so a run that builds its
    discriminator on it is the same either way (and on every process of a distributed run, where the first
    trains it and the rest read it)."""
    with isolated_rng(device):
        return _load_or_pretrain_vit(data, cache_dir, cfg, steps=steps, device=device, log=log, progress=progress)


def _load_or_pretrain_vit(data, cache_dir, cfg: ViTConfig, *, steps: int, device, log, progress: bool) -> ViT:
    c, h, _ = data.shape
    tag = f"vit-{data.name}-{c}x{h}-p{cfg.patch_size}d{cfg.dim}x{cfg.depth}"
    path = Path(cache_dir) / f"{tag}.safetensors"
    meta_path = path.with_suffix(".json")
    with waiting_lock("cache", path):  # two distillations at once: the second waits, then reads the first's
        return _read_or_pretrain(data, cfg, path, meta_path, steps=steps, device=device, log=log, progress=progress)


def _read_or_pretrain(data, cfg: ViTConfig, path: Path, meta_path: Path, *, steps: int, device, log,
                      progress: bool) -> ViT:
    if path.exists() and meta_path.exists():
        meta = read_json(meta_path)
        if meta.get("steps") == steps and meta.get("config") == json.loads(json.dumps(asdict(cfg))):
            return _load_cached(path, meta_path).to(device).eval()
    if log:
        log(f"pretraining the ViT backbone on {data.name} ({steps} steps; cached as {path})")
    model = pretrain_vit(data.float_images(), data.labels, cfg, steps=steps, device=device, log=log, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(path, model.state_dict(), meta={"config": asdict(cfg), "steps": steps, "train_images": len(data)})
    return model
