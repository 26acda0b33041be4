import pytest
import torch

from fastdiff.config import PRESETS, preset_config
from fastdiff.errors import ConfigError
from fastdiff.models import UNet, UNetConfig


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_cifar10_ddpm_has_the_papers_parameter_count():
    # Ho et al. 2020 report 35.7M; the reference implementation (and diffusers' ddpm-cifar10-32) has 35,746,307.
    assert n_params(UNet(preset_config("cifar10-ddpm").model)) == 35_746_307


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "cifar10-ddpm"])
def test_presets_forward(preset):
    cfg = preset_config(preset).model
    m = UNet(cfg).eval()
    x = torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size)
    labels = torch.tensor([0, cfg.num_classes]) if cfg.num_classes else None  # a real and the null label
    with torch.no_grad():
        assert m(x, torch.tensor([0, 999]), labels).shape == x.shape


def test_class_conditioning_changes_output_and_null_is_default():
    cfg = UNetConfig(image_size=8, in_channels=1, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                     attn_resolutions=(4,), num_groups=4, num_classes=3, dropout=0.0)
    m = UNet(cfg).eval()
    torch.nn.init.normal_(m.class_embed.weight)
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([10])
    with torch.no_grad():
        a, b = m(x, t, torch.tensor([0])), m(x, t, torch.tensor([1]))
        assert not torch.allclose(a, b)
        torch.testing.assert_close(m(x, t, None), m(x, t, torch.tensor([3])))


def test_wrong_shape_is_a_clear_error():
    m = UNet(preset_config("digits").model)
    with pytest.raises(ConfigError, match=r"images \[batch, 1, H, W\].*got shape \[2, 3, 8, 8\]"):
        m(torch.randn(2, 3, 8, 8), torch.zeros(2))
    with pytest.raises(ConfigError, match="multiples of 4"):
        m(torch.randn(2, 1, 10, 10), torch.zeros(2))


def test_bad_config():
    with pytest.raises(ConfigError, match="not divisible"):
        UNetConfig(image_size=30, channel_mult=(1, 2, 2))
