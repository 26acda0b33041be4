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


def test_cpu_attention_is_torch_attention_in_float32_and_no_less_accurate_in_bf16():
    # fastdiff.nn.attention runs CPU tensors through float32 matmuls and softmax instead of torch's fused kernel.
    import torch.nn.functional as F

    from fastdiff.nn import attention

    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(6, 2, 49, 16, generator=g) * 2 for _ in range(4))
    leaves = [[t.clone().requires_grad_(True) for t in (q, k, v)] for _ in range(2)]
    ours, theirs = attention(*leaves[0]), F.scaled_dot_product_attention(*leaves[1])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(ours, leaves[0], grad), torch.autograd.grad(theirs, leaves[1], grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    low = [t.bfloat16() for t in (q, k, v)]
    truth = F.scaled_dot_product_attention(*(t.double() for t in low))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as in a bf16 UNet: the output keeps v's dtype
        out = attention(*low)
    assert out.dtype == torch.bfloat16
    err = (out.double() - truth).abs().max().item()
    torch_err = (F.scaled_dot_product_attention(*low).double() - truth).abs().max().item()
    assert err <= torch_err * 1.01, (err, torch_err)


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_attention_of_either_layout_runs_on_a_fused_kernel(channels_last):
    # split_heads of an NCHW qkv gives heads whose last dimension has stride h*w, which the fused kernels refuse
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fastdiff.models.unet import split_heads
    from fastdiff.nn import attention

    qkv = torch.randn(4, 3 * 128, 16, 16, device="cuda", dtype=torch.bfloat16)
    if channels_last:
        qkv = qkv.contiguous(memory_format=torch.channels_last)
    q, k, v = split_heads(qkv, 2)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        out = attention(q, k, v)
    with sdpa_kernel([SDPBackend.MATH]):
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
