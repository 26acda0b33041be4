"""The fused sampler step: formula, in-kernel Philox noise (per element equal to the reference), statistics,
invariance to batch and position, torch.library registration, torch.compile, and a whole DDIM run."""

import pytest
import torch

from fastdiff import reference
from fastdiff.diffusion.samplers import initial_noise, sample_ddim, seeds_for
from fastdiff.diffusion.schedules import NoiseSchedule
from fastdiff.models.unet import UNet, UNetConfig
from fastdiff.ops import sampler_step, use_backend

TINY_SHAPES = [(1, 1, 1, 1), (3, 2, 5, 7), (2, 3, 8, 8)]  # minimal, odd (numel % 4 != 0), power of two
GPU_SHAPES = [(64, 3, 32, 32), (16, 4, 63, 65), (256, 3, 64, 64)]
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}


def _coefs(n, device, seed=0, expanded=False):
    g = torch.Generator().manual_seed(seed)
    if expanded:  # what the samplers pass: one table row, expanded (stride 0) to the batch
        row = torch.rand(5, generator=g).to(device)
        return [row[i].expand(n) for i in range(5)]
    return [torch.rand(n, generator=g).to(device) for _ in range(5)]


def _noise(shape, seeds, step, device, dtype=torch.float32, channels_last=False):
    """z alone: with p = q = A = B = 0 and sigma = 1 the step returns its noise."""
    x = torch.zeros(shape, device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    zero, one = torch.zeros(shape[0], device=device), torch.ones(shape[0], device=device)
    return sampler_step(x, x, zero, zero, zero, zero, one, seeds.to(device), step)


@pytest.mark.parametrize("dtype", list(RTOL), ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_matches_reference_per_element(device, dtype, channels_last):
    # Same noise per element, not only in distribution: both sides draw from one Philox stream and differ only by
    # the float32 rounding of log/sqrt/sin/cos (and fused multiply-adds on the GPU).
    for i, shape in enumerate(TINY_SHAPES if device.type == "cpu" else GPU_SHAPES):
        g = torch.Generator().manual_seed(i)
        x, out = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(2))
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        p, q, A, B, sigma = _coefs(shape[0], device, seed=i, expanded=i % 2 == 1)
        seeds = (torch.arange(shape[0]) * 7919 + (2**40 if i == 2 else 0)).to(device)
        step = torch.tensor(17, device=device) if i % 2 else 17
        clip = 1.0 if i != 1 else None
        y, x0 = sampler_step(x, out, p, q, A, B, sigma, seeds, step, clip=clip, return_x0=True)
        y_ref, x0_ref = reference.sampler_step(x, out, p, q, A, B, sigma, seeds, 17, clip=clip, return_x0=True)
        assert y.dtype == dtype and y.stride() == x.stride()
        tol = dict(rtol=RTOL[dtype], atol=1e-5 if dtype == torch.float32 else RTOL[dtype])
        torch.testing.assert_close(y, y_ref, **tol, msg=lambda m: f"{shape} x_prev: {m}")
        torch.testing.assert_close(x0, x0_ref, **tol, msg=lambda m: f"{shape} x0: {m}")
        only_prev = sampler_step(x, out, p, q, A, B, sigma, seeds, step, clip=clip)
        torch.testing.assert_close(only_prev, y, rtol=0, atol=0)


def test_without_noise_it_is_the_formula(device):
    shape = (3, 2, 4, 4) if device.type == "cpu" else (64, 3, 64, 64)
    g = torch.Generator().manual_seed(0)
    x, out = (torch.randn(shape, generator=g).to(device) for _ in range(2))
    p, q, A, B, _ = _coefs(shape[0], device)
    zero = torch.zeros(shape[0], device=device)
    y, x0 = sampler_step(x, out, p, q, A, B, zero, torch.arange(shape[0], device=device), 3, clip=0.5,
                         return_x0=True)
    v = lambda c: c.view(-1, 1, 1, 1)  # noqa: E731
    x0_expected = (v(p) * x + v(q) * out).clamp(-0.5, 0.5)
    torch.testing.assert_close(x0, x0_expected)
    torch.testing.assert_close(y, v(A) * x0_expected + v(B) * x)


def test_noise_is_standard_normal_and_uncorrelated(device):
    n, shape = (64, (64, 1, 16, 16)) if device.type == "cpu" else (1024, (1024, 3, 32, 32))
    seeds = seeds_for(11, n)
    z = _noise(shape, seeds, 5, device).double().flatten(1)
    m = z.numel()
    assert abs(z.mean().item()) < 5 / m**0.5
    assert abs(z.var().item() - 1) < 5 * (2 / m) ** 0.5
    assert abs((z**4).mean().item() - 3) < 25 * (96 / m) ** 0.5  # var of z^4 is 105 - 9 = 96
    other_step = _noise(shape, seeds, 6, device).double().flatten(1)
    for a, b in [(z[:, :-1], z[:, 1:]), (z[:, :-4], z[:, 4:]), (z[:-1], z[1:]), (z, other_step)]:
        corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
        assert abs(corr) < 5 / a.numel() ** 0.5, corr


def test_noise_ignores_batch_size_position_and_layout(device):
    shape = (2, 3, 5, 6) if device.type == "cpu" else (64, 3, 64, 64)
    seeds = torch.tensor([5, 2**33 + 1] + list(range(100, 100 + shape[0] - 2)))
    z = _noise(shape, seeds, 9, device)
    alone = _noise((1, *shape[1:]), seeds[1:2], 9, device)
    shuffled = _noise((3, *shape[1:]), torch.tensor([7, int(seeds[1]), 5]), 9, device)
    assert torch.equal(alone[0], z[1]) and torch.equal(shuffled[1], z[1]) and torch.equal(shuffled[2], z[0])
    assert torch.equal(_noise(shape, seeds, torch.tensor(9, device=device), device), z)
    cl = _noise(shape, seeds, 9, device, channels_last=True)
    torch.testing.assert_close(cl, z, rtol=0, atol=0)
    odd = (shape[0], 3, 5, 5)  # channels_last with H*W % 4 != 0 takes the contiguous fallback
    torch.testing.assert_close(_noise(odd, seeds, 9, device, channels_last=True), _noise(odd, seeds, 9, device))


def test_opcheck(device):
    shape = (2, 3, 4, 4) if device.type == "cpu" else (8, 3, 32, 32)
    x, out = torch.randn(shape, device=device), torch.randn(shape, device=device)
    p, q, A, B, sigma = _coefs(shape[0], device)
    seeds = torch.arange(shape[0], device=device)
    op = torch.ops.fastdiff.sampler_step.default
    torch.library.opcheck(op, (x, out, p, q, A, B, sigma, seeds, None, 4, 1.0, True))
    torch.library.opcheck(op, (x, out, p, q, A, B, sigma, seeds, torch.tensor(4, device=device), 0, None, False))


def test_compiles_without_graph_breaks_or_recompiles(device):
    shape = (2, 3, 4, 4) if device.type == "cpu" else (64, 3, 32, 32)
    x, out = torch.randn(shape, device=device), torch.randn(shape, device=device)
    coefs = _coefs(shape[0], device)
    seeds = torch.arange(shape[0], device=device)

    def step_fn(x, out, step):
        return sampler_step(x, out * 0.5, *coefs, seeds, step, clip=1.0, return_x0=True)

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(step_fn, fullgraph=True)
    for step in range(3):  # a device tensor step: one graph for all steps
        step_t = torch.tensor(step, device=device)
        for a, b in zip(compiled(x, out, step_t), reference.sampler_step(x, out * 0.5, *coefs, seeds, step, clip=1.0,
                                                                         return_x0=True)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_ddim_eta0_same_images_on_triton_and_torch(device, no_tf32):
    size, n, steps = (8, 2, 3) if device.type == "cpu" else (32, 64, 25)
    cfg = UNetConfig(image_size=size, in_channels=1, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                     attn_resolutions=(), num_groups=4, dropout=0.0)
    torch.manual_seed(0)
    model = UNet(cfg).to(device).eval()
    schedule = NoiseSchedule("linear", 1000, device=device)
    seeds = seeds_for(3, n)
    x_T = initial_noise(seeds, (1, size, size), device=device)
    with torch.no_grad():
        triton_images = sample_ddim(model, x_T, schedule, steps=steps, eta=0.0, seeds=seeds, clip=1.0)
        with use_backend("torch"):
            torch_images = sample_ddim(model, x_T, schedule, steps=steps, eta=0.0, seeds=seeds, clip=1.0)
    torch.testing.assert_close(triton_images, torch_images, rtol=1e-4, atol=1e-4)
    to_uint8 = lambda im: ((im.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # noqa: E731
    assert (to_uint8(triton_images).int() - to_uint8(torch_images).int()).abs().max() <= 1


def test_strided_views_and_mixed_layouts(device):
    shape = (3, 2, 6, 9) if device.type == "cpu" else (32, 3, 66, 65)
    g = torch.Generator().manual_seed(1)
    base = torch.randn(shape, generator=g).to(device)
    x = base[..., 1:-1]  # h and w do not merge: the contiguous fallback
    out = torch.randn(x.shape, generator=g).to(device).to(memory_format=torch.channels_last)
    coefs = _coefs(x.shape[0], device)
    seeds = torch.arange(x.shape[0], device=device)
    y, x0 = sampler_step(x, out, *coefs, seeds, 2, return_x0=True)
    y_ref, x0_ref = reference.sampler_step(x, out, *coefs, seeds, 2, return_x0=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x0, x0_ref, rtol=1e-5, atol=1e-5)
    y_nchw = sampler_step(x.contiguous(), out, *coefs, seeds, 2)  # x NCHW, model output channels_last
    torch.testing.assert_close(y_nchw, y_ref, rtol=1e-5, atol=1e-5)



def _step_an_empty_batch(device, backend):
    x = torch.randn(0, 2, 4, 4, device=device)
    coefs = _coefs(0, device)
    seeds = torch.zeros(0, dtype=torch.int64, device=device)
    with use_backend(backend):
        for step in (3, torch.tensor(3, device=device)):
            y, x0 = sampler_step(x, torch.randn_like(x), *coefs, seeds, step, clip=1.0, return_x0=True)
            assert y.shape == x0.shape == x.shape and y.device == x.device


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_an_empty_batch_steps_to_empty_outputs(backend):
    # The reference indexed x[0] for the noise size, an IndexError on a batch of none, where the native and Triton
    # kernels return empty outputs; every backend now agrees
    from fastdiff.ops import native

    if backend == "native" and not native.available():
        pytest.skip(f"{native.load_error()} (build it: make ext)")
    _step_an_empty_batch(torch.device("cpu"), backend)


def test_the_kernel_steps_an_empty_batch_to_empty_outputs(device):
    _step_an_empty_batch(device, None)


def test_a_step_tensor_of_another_integer_type(device):
    # An int32 step overflowed the kernel's 32-bit mask of it (the reference takes any integer step)
    x = torch.randn(2, 3, 4, 4, device=device)
    out = torch.randn_like(x)
    coefs, seeds = _coefs(2, device), torch.arange(2, device=device)
    for step in (17, -1):
        ref = reference.sampler_step(x, out, *coefs, seeds, step)
        y = sampler_step(x, out, *coefs, seeds, torch.tensor(step, dtype=torch.int32, device=device))
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("clip", [None, 0.5])
def test_the_kernels_backward_is_the_references(device, clip):
    # The Triton op had no autograd formula: a loss through a sampling step failed on a GPU where the CPU's native
    # and reference steps differentiate
    x = torch.randn(2, 3, 4, 4, device=device)
    out = torch.randn_like(x)
    coefs, seeds = _coefs(2, device), torch.arange(2, device=device)
    grads = []
    for fn in (sampler_step, reference.sampler_step):
        leaves = [t.clone().requires_grad_() for t in (x, out, *coefs)]
        y, x0 = fn(*leaves[:2], *leaves[2:], seeds, torch.tensor(5, device=device), clip=clip, return_x0=True)
        grads.append(torch.autograd.grad((y * y).sum() + x0.sum(), leaves))
        only_coefs = [t.clone().requires_grad_() for t in coefs]  # x0 has no graph to go back through
        y = fn(x, out, *only_coefs, seeds, 5, clip=clip)
        grads.append(torch.autograd.grad(y.sum(), only_coefs))
    for a, r in zip(grads[0] + grads[1], grads[2] + grads[3]):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
