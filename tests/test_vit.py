"""The ViT feature network, timm/DINO state-dict loading, the discriminator heads and DiffAugment."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastdiff.data import load_dataset
from fastdiff.errors import CheckpointError, ConfigError
from fastdiff.models import vit as vit_mod
from fastdiff.models.discriminator import Discriminator, diff_augment, parse_augment
from fastdiff.models.vit import ViT, ViTConfig, even_taps, load_or_pretrain_vit, load_vit_file, vit_from_timm

TINY = dict(image_size=8, in_channels=1, patch_size=2, dim=16, depth=3, num_heads=2)


def timm_state_dict(dim=24, depth=2, patch=4, grid=4, channels=3, layer_scale=False, registers=0, seed=0):
    """A state dict with timm's ViT key names and shapes (what timm.create_model(...).state_dict() holds)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    sd = {"cls_token": r(1, 1, dim), "pos_embed": r(1, 1 + grid * grid, dim),
          "patch_embed.proj.weight": r(dim, channels, patch, patch), "patch_embed.proj.bias": r(dim),
          "norm.weight": 1 + r(dim), "norm.bias": r(dim), "head.weight": r(1000, dim), "head.bias": r(1000)}
    if registers:
        sd["register_tokens"] = r(1, registers, dim)
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": 1 + r(dim), p + "norm1.bias": r(dim), p + "attn.qkv.weight": r(3 * dim, dim),
                   p + "attn.qkv.bias": r(3 * dim), p + "attn.proj.weight": r(dim, dim), p + "attn.proj.bias": r(dim),
                   p + "norm2.weight": 1 + r(dim), p + "norm2.bias": r(dim), p + "mlp.fc1.weight": r(4 * dim, dim),
                   p + "mlp.fc1.bias": r(4 * dim), p + "mlp.fc2.weight": r(dim, 4 * dim), p + "mlp.fc2.bias": r(dim)})
        if layer_scale:
            sd.update({p + "ls1.gamma": 1 + r(dim), p + "ls2.gamma": 1 + r(dim)})
    return sd


def timm_block_reference(sd, i, x, num_heads):
    """timm's Block.forward written out from the state dict: x + attn(norm1(x)), then x + mlp(norm2(x))."""
    p = f"blocks.{i}."
    b, n, c = x.shape
    h = F.layer_norm(x, (c,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
    qkv = (h @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]).reshape(b, n, 3, num_heads, c // num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(c // num_heads), dim=-1)
    a = (attn @ v).transpose(1, 2).reshape(b, n, c) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
    x = x + a * sd.get(p + "ls1.gamma", 1.0)
    h = F.layer_norm(x, (c,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
    m = F.gelu(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"]) @ sd[p + "mlp.fc2.weight"].T
    return x + (m + sd[p + "mlp.fc2.bias"]) * sd.get(p + "ls2.gamma", 1.0)


def test_tokens_and_taps():
    model = ViT(ViTConfig(**TINY, num_classes=10))
    x = torch.randn(5, 1, 8, 8)
    feats = model.tokens(x, [0, 2])
    assert [f.shape for f in feats] == [(5, 16, 16), (5, 16, 16)]
    assert model(x).shape == (5, 10)
    assert even_taps(4, 2) == [1, 3] and even_taps(12, 3) == [3, 7, 11] and even_taps(3, 3) == [0, 1, 2]
    with pytest.raises(ConfigError, match="cannot tap 5 blocks"):
        even_taps(4, 5)


@pytest.mark.parametrize("layer_scale, registers", [(False, 0), (True, 4)])
def test_timm_state_dict_maps_and_computes_like_timm(layer_scale, registers):
    sd = timm_state_dict(layer_scale=layer_scale, registers=registers)
    model = vit_from_timm(dict(sd), num_heads=3, normalize=False)  # pretraining size: 16 px, a 4x4 grid
    cfg = model.cfg
    assert (cfg.dim, cfg.depth, cfg.patch_size, cfg.in_channels, cfg.image_size, cfg.grid) == (24, 2, 4, 3, 16, 4)
    assert cfg.layer_scale == layer_scale and cfg.num_registers == registers and cfg.mlp_ratio == 4.0
    assert torch.equal(model.blocks[1].attn.out.weight, sd["blocks.1.attn.proj.weight"])
    # The tokens after each block equal timm's computation on the same weights.
    x = torch.randn(2, 3, 16, 16)
    h = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=4).flatten(2).transpose(1, 2)
    h = torch.cat([sd["cls_token"].expand(2, -1, -1), h], 1) + sd["pos_embed"]
    if registers:
        h = torch.cat([h[:, :1], sd["register_tokens"].expand(2, -1, -1), h[:, 1:]], 1)
    expected = []
    for i in range(2):
        h = timm_block_reference(sd, i, h, num_heads=3)
        expected.append(h[:, 1 + registers:])
    for got, want in zip(model.tokens(x, [0, 1]), expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_dino_checkpoint_file_resized_grey_input(tmp_path):
    """A DINO training checkpoint (teacher weights under module.backbone.) saved with torch.save, used on 8x8
    grey images at a 2x2 grid: position embeddings resized, the grey channel repeated, ImageNet normalisation."""
    sd = timm_state_dict()
    path = tmp_path / "dino.pth"
    torch.save({"teacher": {"module.backbone." + k: v for k, v in sd.items() if not k.startswith("head")},
                "epoch": torch.tensor(100)}, path)
    model = load_vit_file(path, image_size=8, num_heads=3)
    assert model.cfg.grid == 2 and model.pos.shape == (1, 5, 24) and model.cfg.pixel_mean == vit_mod.IMAGENET_MEAN
    torch.testing.assert_close(model.pos[:, :1], sd["pos_embed"][:, :1])
    feats = model.tokens(torch.rand(3, 1, 8, 8) * 2 - 1, [1])
    assert feats[0].shape == (3, 4, 24) and torch.isfinite(feats[0]).all()


def test_timm_positions_of_the_patches_only():
    # timm builds its register DINOv2 models with no_embed_class: pos_embed has no class-token row, and the class
    # token gets no position. That is a zero row for it here (the file was refused: "not a square grid").
    sd = timm_state_dict(registers=4)
    sd["pos_embed"][:, 0] = 0
    patches_only = {**sd, "pos_embed": sd["pos_embed"][:, 1:].clone()}
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = vit_from_timm(dict(sd), num_heads=3, normalize=False).tokens(x, [0, 1])
        got = vit_from_timm(patches_only, num_heads=3, normalize=False).tokens(x, [0, 1])
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_backbone_size_resizes_a_fastdiff_vit_file(tmp_path):
    # --backbone-size was ignored for fastdiff's own ViT files (its cached backbones): they loaded at their size
    import json
    from dataclasses import asdict

    from fastdiff.checkpoint import save_tensors

    cfg = ViTConfig(image_size=8, in_channels=1, patch_size=2, dim=16, depth=1, num_heads=2)
    torch.manual_seed(0)
    save_tensors(tmp_path / "vit.safetensors", ViT(cfg).state_dict())
    (tmp_path / "vit.json").write_text(json.dumps({"config": asdict(cfg)}))
    same = load_vit_file(tmp_path / "vit.safetensors")
    big = load_vit_file(tmp_path / "vit.safetensors", image_size=16)
    assert (same.cfg.image_size, big.cfg.image_size, big.cfg.grid) == (8, 16, 8)
    assert big.pos.shape == (1, 1 + 64, 16) and torch.equal(big.pos[:, :1], same.pos[:, :1])
    assert big.tokens(torch.randn(2, 1, 16, 16), [0])[0].shape == (2, 64, 16)


def test_mlp_width_is_rebuilt_exactly():
    # The width comes back from mlp_ratio = hidden / dim: int() truncated 120 / 88 * 88 = 119.99.. to 119
    cfg = ViTConfig(image_size=8, in_channels=1, patch_size=4, dim=88, depth=1, num_heads=2, mlp_ratio=120 / 88)
    assert ViT(cfg).blocks[0].mlp.fc1.weight.shape[0] == 120


def test_bad_backbone_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_vit_file(tmp_path / "missing.pth")
    bad = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7)}, bad)
    with pytest.raises(CheckpointError, match="not a timm/DINO ViT"):
        load_vit_file(bad)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_vit_file(junk)
    # A .pth backbone is checked for non-finite weights as a safetensors file is (the tensor named, not a NaN loss).
    sd = timm_state_dict()
    sd["blocks.1.mlp.fc1.weight"][0, 0] = float("nan")
    nan = tmp_path / "nan.pth"
    torch.save({"teacher": {"module.backbone." + k: v for k, v in sd.items()}}, nan)
    with pytest.raises(CheckpointError, match=r"nan.pth: tensor 'blocks.1.mlp.fc1.weight' holds NaN or infinite"):
        load_vit_file(nan)


def test_pretrained_vit_is_cached(tmp_path, monkeypatch):
    data = load_dataset("synthetic", "train", image_size=8, channels=1)
    cfg = ViTConfig(**TINY, num_classes=10)
    first = load_or_pretrain_vit(data, tmp_path, cfg, steps=3)
    monkeypatch.setattr(vit_mod, "pretrain_vit", lambda *a, **k: pytest.fail("retrained a cached backbone"))
    again = load_or_pretrain_vit(data, tmp_path, cfg, steps=3)
    for k, v in first.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
    # The cached file also loads as a backbone file by path.
    cached = next(tmp_path.glob("vit-*.safetensors"))
    assert load_vit_file(cached).cfg == cfg


@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_discriminator_shapes_and_class_projection(kind):
    torch.manual_seed(0)
    disc = Discriminator(ViT(ViTConfig(**TINY)), num_classes=10, num_heads=2, head_kind=kind, width=8)
    assert disc.taps == [1, 2]
    x = torch.randn(4, 1, 8, 8)
    logits = disc(x, torch.tensor([0, 1, 2, 3]))
    assert [lg.shape for lg in logits] == [(4, 16), (4, 16)]
    other = disc(x, torch.tensor([5, 6, 7, 8]))
    assert not torch.allclose(logits[0], other[0]), "labels must change the logits (projection conditioning)"
    with pytest.raises(ConfigError, match="needs the labels"):
        disc(x, None)


def test_frozen_backbone_passes_input_gradients_only():
    disc = Discriminator(ViT(ViTConfig(**TINY)), num_classes=0, num_heads=1, width=8)
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    sum(lg.sum() for lg in disc(x)).backward()  # the backbone is frozen by construction (no train_backbone)
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.backbone.parameters())
    assert all(p.grad is not None for p in disc.heads.parameters())
    assert len(disc.trainable_parameters()) == len(list(disc.heads.parameters()))


def test_diff_augment():
    x = torch.rand(64, 1, 8, 8, requires_grad=True)
    g = torch.Generator().manual_seed(0)
    y = diff_augment(x, parse_augment("translation,cutout,brightness,contrast"), g)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None
    ones = torch.ones(256, 1, 8, 8)
    cut = diff_augment(ones, ("cutout",), torch.Generator().manual_seed(1))
    holes = (cut == -1).flatten(1).sum(1).float()
    assert holes.max() == 16 and holes.min() >= 4  # a 4x4 square, clipped at the border
    moved = diff_augment(ones, ("translation",), torch.Generator().manual_seed(2))
    assert set(moved.unique().tolist()) == {-1.0, 1.0} and (moved == 1).flatten(1).sum(1).min() >= 49
    assert diff_augment(x, (), g) is x
    with pytest.raises(ConfigError, match="unknown augmentation"):
        parse_augment("translation,rotate")


@pytest.mark.parametrize("labelled", [True, False])
def test_minibatch_std_is_float32_under_autocast(labelled):
    # The std channel of features with a large mean: under bf16 autocast the class sums ran as bf16 matmuls and
    # E[x^2] - E[x]^2 lost the variance (58% off); the statistics are float32 and centred whatever the autocast.
    from fastdiff.models.discriminator import minibatch_std

    g = torch.Generator().manual_seed(0)
    tokens = 5.0 + 0.1 * torch.randn(16, 4, 8, generator=g)
    labels = torch.arange(16) % 3 if labelled else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = minibatch_std(tokens, 4, labels, 3)[..., -1]
    # the float64 truth: each sample's set (its class, or its group of 4: samples i, i+4, i+8, i+12), the std of
    # every token feature over the set, averaged over the features
    x = tokens.double()
    sets = [labels == labels[i] if labelled else torch.arange(16) % 4 == i % 4 for i in range(16)]
    want = torch.stack([(x[s].var(0, unbiased=False) + 1e-8).sqrt().mean(-1) for s in sets])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_an_empty_backbone_file_says_what_is_wrong(tmp_path):
    """It said "cannot read the backbone file afile ()": torch's EOFError has no message."""
    (tmp_path / "afile.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"cannot read the backbone file .*afile.pth \(EOFError: 0 bytes\)"):
        load_vit_file(tmp_path / "afile.pth")
