"""The native extension fastdiff._C against fastdiff.reference: noise, sampler step, GroupNorm+SiLU, autograd,
torch.library/torch.compile integration (test_native_dispatch.py: the rest of fastdiff on it). Tests that need
the extension skip (with the reason) when it is not built (`make ext`); CUDA ones are marked `gpu`."""

import pytest
import torch

from fastdiff import reference
from fastdiff.diffusion import seeds_for
from fastdiff.ops import native

requires_native = pytest.mark.skipif(not native.available(), reason=f"{native.load_error()} (build it: make ext)")
requires_native_cuda = pytest.mark.skipif(not (native.cuda_available() and torch.cuda.is_available()),
                                          reason="needs fastdiff._C built with CUDA kernels and a CUDA device")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
ops = torch.ops.fastdiff_native


def _coefs(n, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    p, q, A, B = (torch.rand(n, generator=g).to(device) for _ in range(4))
    sigma = torch.rand(n, generator=g).to(device)
    sigma[::3] = 0.0  # samples without noise take the kernels' no-noise branch
    return p, q, A, B, sigma


def _noise(x, seeds, step):
    """x_prev = z: the sampler step with p = q = A = B = 0 and sigma = 1."""
    n = x.shape[0]
    zero, one = torch.zeros(n, device=x.device), torch.ones(n, device=x.device)
    return native.sampler_step(x, x, zero, zero, zero, zero, one, seeds, step)


# --- noise -------------------------------------------------------------------------------------------------


@requires_native
@pytest.mark.parametrize("step", [0, 5, 2**32 + 3])
@pytest.mark.parametrize("stream", [reference.STREAM_STEP, reference.STREAM_INIT])
def test_noise_equals_reference_per_element(step, stream):
    seeds = torch.tensor([0, 1, 7, 2**40 + 3, -5, 2**62])
    z = native.philox_normal(seeds, step, 4099, stream)
    torch.testing.assert_close(z, reference.philox_normal(seeds, step, 4099, stream))


@requires_native
def test_seeded_randn_equals_reference():
    seeds = seeds_for(11, 5)
    torch.testing.assert_close(native.seeded_randn(seeds, (3, 5, 7)), reference.seeded_randn(seeds, (3, 5, 7)))


@requires_native
def test_noise_is_standard_normal_and_independent():
    seeds = torch.arange(256)
    x = torch.zeros(256, 1, 25, 40)
    z = _noise(x, seeds, 3).flatten(1)
    n = z.numel()
    assert abs(z.mean().item()) < 5 / n**0.5
    assert abs(z.var().item() - 1) < 5 * (2 / n) ** 0.5
    assert abs((z**4).mean().item() - 3) < 0.1  # the fourth moment catches a wrong Box-Muller
    other_step = _noise(x, seeds, 4).flatten(1)
    for a, b in [(z[:, :-1], z[:, 1:]), (z[:-1], z[1:]), (z, other_step)]:
        corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
        assert abs(corr.item()) < 5 / a.numel() ** 0.5


@requires_native
def test_noise_depends_only_on_seed_step_element():
    x = torch.zeros(3, 2, 5, 7)
    a = _noise(x, torch.tensor([7, 8, 9]), 5)
    b = _noise(x[:2], torch.tensor([9, 7]), 5)
    assert torch.equal(a[2], b[0]) and torch.equal(a[0], b[1])  # neither batch size nor position matters
    assert torch.equal(_noise(x[:1], torch.tensor([7]), torch.tensor(5)), a[:1])  # int or tensor step
    assert not torch.equal(_noise(x[:1], torch.tensor([2**40 + 7]), 5), a[:1])  # the high seed word counts
    cl = _noise(x.to(memory_format=torch.channels_last), torch.tensor([7, 8, 9]), 5)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(cl, a)  # logical NCHW element indices whatever the memory format


# --- sampler step ------------------------------------------------------------------------------------------


@requires_native
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 2, 5, 7), (2, 1, 28, 28), (4, 3, 2), (5,)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sampler_step_matches_reference(shape, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g).to(dtype)
    out = torch.randn(shape, generator=g).to(dtype)
    n = shape[0]
    coefs = _coefs(n)
    seeds = seeds_for(3, n)
    # Arithmetic is float32 for every dtype (float64 too, as in the reference): float32 tolerances at least.
    tol = {"atol": 1e-5, "rtol": 1.3e-6} if dtype == torch.float64 else {}
    for clip, step in [(None, 4), (0.5, torch.tensor(9))]:
        got = native.sampler_step(x, out, *coefs, seeds, step, clip=clip, return_x0=True)
        want = reference.sampler_step(x, out, *coefs, seeds, step, clip=clip, return_x0=True)
        for a, b in zip(got, want):
            assert a.dtype == dtype and a.shape == x.shape
            torch.testing.assert_close(a, b, **tol)
    assert native.sampler_step(x, out, *coefs, seeds, 4).shape == x.shape


@requires_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampler_step_layouts_and_views(dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 6, 5, generator=g).to(dtype)
    out = torch.randn(4, 3, 6, 5, generator=g)  # float32 model output beside a bf16 x, as under autocast
    p, q, A = (torch.tensor(v).expand(4) for v in (0.9, -0.2, 0.7))  # stride-0 coefficient vectors
    B, sigma = torch.rand(4, generator=g), torch.rand(8, generator=g)[::2]  # a strided one too
    seeds = torch.tensor([5, 1, 9, 2], dtype=torch.int32)
    want = reference.sampler_step(x, out, p, q, A, B, sigma, seeds, 7, 1.0)
    for xi in (x, x.to(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
        for oi in (out, out.to(memory_format=torch.channels_last)):
            torch.testing.assert_close(native.sampler_step(xi, oi, p, q, A, B, sigma, seeds, 7, 1.0), want)


@requires_native
@pytest.mark.parametrize("return_x0", [False, True])
def test_sampler_step_gradients_are_the_reference_ones(return_x0):
    g = torch.Generator().manual_seed(4)
    x, out = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    inputs = [x, out, *_coefs(3)]
    seeds = torch.arange(3)
    results = {}
    for name, fn in (("native", native.sampler_step), ("reference", reference.sampler_step)):
        leaves = [t.clone().requires_grad_(i != 1) for i, t in enumerate(inputs)]  # model_out needs none
        y = fn(*leaves, seeds, torch.tensor(3), clip=0.8, return_x0=return_x0)
        ys = y if return_x0 else (y,)
        weights = [torch.randn(t.shape, generator=torch.Generator().manual_seed(k)) for k, t in enumerate(ys)]
        sum((w * t).sum() for w, t in zip(weights, ys)).backward()
        results[name] = ys, [leaf.grad for leaf in leaves]
    (ys_n, grads_n), (ys_r, grads_r) = results["native"], results["reference"]
    assert grads_n[1] is None and grads_r[1] is None
    for a, b in zip(ys_n, ys_r):
        torch.testing.assert_close(a, b)
    for a, b in zip(grads_n[:1] + grads_n[2:], grads_r[:1] + grads_r[2:]):
        torch.testing.assert_close(a, b)


@requires_native
def test_sampler_step_forward_is_native_with_and_without_grad():
    # One kernel whatever autograd needs: a plain loop over a model that requires grad gives the same values,
    # bit for bit, as a no-grad run.
    x, out = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4, requires_grad=True)
    args = (*_coefs(2), torch.arange(2), 3)
    with torch.no_grad():
        want = native.sampler_step(x, out, *args)
    assert torch.equal(native.sampler_step(x, out, *args), want)


@requires_native
def test_bad_arguments_are_clear_errors():
    x = torch.randn(2, 3, 4, 4)
    coefs = _coefs(2)
    with pytest.raises(RuntimeError, match="model_out has shape"):
        native.sampler_step(x, x[:, :2], *coefs, torch.arange(2), 0)
    with pytest.raises(RuntimeError, match=r"seeds must have shape \[2\]"):
        native.sampler_step(x, x, *coefs, torch.arange(3), 0)
    with pytest.raises(RuntimeError, match=r"sigma must have shape \[2\]"):
        native.sampler_step(x, x, *coefs[:4], torch.ones(3), torch.arange(2), 0)
    with pytest.raises(RuntimeError, match="step must be an int or a one-element integer tensor"):
        native.sampler_step(x, x, *coefs, torch.arange(2), torch.tensor(1.5))
    with pytest.raises(RuntimeError, match="not divisible into num_groups=2"):
        native.group_norm_silu(torch.randn(2, 3, 4, 4), 2)


# --- GroupNorm + SiLU --------------------------------------------------------------------------------------

# (2, 40, 23, 23) in channels_last: two 16-channel chunks and 8 channels after them, and 529 rows, a whole block
# of 512 and 17 more (4 at a time, then one), in the NHWC statistics (kernels/cpu/group_norm_common.h).
GN_CASES = [((1, 1, 1, 2), 1), ((2, 6, 1, 1), 3), ((3, 12, 5, 7), 4), ((2, 64, 2, 2), 8), ((2, 32, 8, 8), 8),
            ((2, 16, 40, 40), 4), ((2, 40, 23, 23), 8), ((2, 12, 9), 3)]


def _gn_inputs(shape, affine, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2 + 3
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    c = shape[1]
    w, b = (torch.randn(c, generator=g), torch.randn(c, generator=g)) if affine else (None, None)
    return x, w, b


def _layouts(shape):
    return [False, True] if len(shape) == 4 else [False]


@requires_native
@pytest.mark.parametrize("shape,groups", GN_CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_silu_forward_fp32(shape, groups, affine):
    for channels_last in _layouts(shape):
        x, w, b = _gn_inputs(shape, affine, channels_last)
        y = native.group_norm_silu(x, groups, w, b)
        truth = reference.group_norm_silu(x.double(), groups, *(t.double() if t is not None else None for t in (w, b)))
        torch.testing.assert_close(y, truth.float(), atol=1e-5, rtol=1e-5)
        assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@requires_native
@pytest.mark.parametrize("mean,std", [(1000.0, 0.01), (1e4, 1.0)])
def test_group_norm_silu_is_stable_for_a_large_mean(mean, std):
    # Against the float64 truth, no worse than twice torch's float32 NCHW error (whose floor is the float32
    # rounding of the mean); torch's own channels_last kernel is not the yardstick: it loses the variance here.
    torch.manual_seed(0)
    x, w, b = mean + std * torch.randn(2, 8, 6, 6), torch.randn(8), torch.randn(8)
    truth = reference.group_norm_silu(x.double(), 4, w.double(), b.double())
    theirs = (reference.group_norm_silu(x, 4, w, b).double() - truth).abs().max().item()
    for xi in (x, x.to(memory_format=torch.channels_last)):
        ours = (native.group_norm_silu(xi, 4, w, b).double() - truth).abs().max().item()
        assert ours <= 2 * theirs + 1e-6, f"max error {ours:.3g} vs torch {theirs:.3g}"


@requires_native
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,groups", [((3, 12, 5, 7), 4), ((2, 64, 2, 2), 8)])
def test_group_norm_silu_low_precision(dtype, shape, groups):
    # The kernel's error against the float64 truth is at most twice torch's own low-precision error (+ atol).
    for channels_last in _layouts(shape):
        x, w, b = _gn_inputs(shape, True, channels_last)
        xl = x.to(dtype)
        truth = reference.group_norm_silu(xl.double(), groups, w.double(), b.double())
        ours = (native.group_norm_silu(xl, groups, w, b).double() - truth).abs().max().item()
        theirs = (reference.group_norm_silu(xl, groups, w.to(dtype), b.to(dtype)).double() - truth).abs().max().item()
        assert ours <= 2 * theirs + 1e-3, f"max error {ours:.3g} vs torch {theirs:.3g}"


@requires_native
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_silu_bf16_is_the_float32_kernel_rounded(channels_last):
    # bf16 storage changes only the loads and the final rounding (kernels/cpu/convert.h): over a million
    # elements the output and the input gradient are the float32 kernel's on the same values rounded to nearest
    # even. Not to the bit everywhere: the two instantiations may sum a group's moments in another order, which
    # moves an element across a rounding boundary now and then (by one bf16 ulp). Truncating instead of
    # rounding would differ in about half the elements.
    g = torch.Generator().manual_seed(5)
    shape, groups = (4, 64, 64, 64), 8
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(shape, generator=g) * 3).bfloat16().contiguous(memory_format=memory_format)
    grad = torch.randn(shape, generator=g).bfloat16().contiguous(memory_format=memory_format)
    w, b = torch.randn(64, generator=g), torch.randn(64, generator=g)

    def same_rounded(ours, want):
        assert ours.dtype == torch.bfloat16
        want = want.bfloat16()
        assert (ours.view(torch.int16) != want.view(torch.int16)).float().mean().item() < 1e-4
        torch.testing.assert_close(ours.float(), want.float(), rtol=2**-7, atol=1e-6)  # atol: sums that cancel

    leaves = [x.clone().requires_grad_(True), x.float().requires_grad_(True)]
    params = [(w.clone().requires_grad_(True), b.clone().requires_grad_(True)) for _ in leaves]
    ys = [native.group_norm_silu(xi, groups, *p) for xi, p in zip(leaves, params)]
    same_rounded(ys[0].detach(), ys[1].detach())
    got = [torch.autograd.grad(y, [xi, *p], gi) for y, xi, p, gi in zip(ys, leaves, params, (grad, grad.float()))]
    same_rounded(got[0][0], got[1][0])
    for ours, want in zip(got[0][1:], got[1][1:]):  # weight and bias gradients are float32 either way
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
    # A NaN group stays NaN; a channel scaled past bf16's range rounds to inf where float32's value does.
    special, big = x.clone(), w.clone()
    special[0, 0, 0, 0] = float("nan")
    big[9] = 3.0e38
    y, want = native.group_norm_silu(special, groups, big, b), native.group_norm_silu(special.float(), groups, big, b)
    assert y[0, :8].isnan().all() and torch.equal(y.isnan(), want.isnan())
    assert y[1:, 9].isinf().any() and torch.equal(y.isinf(), want.bfloat16().isinf())


@requires_native
@pytest.mark.parametrize("shape,groups", [((3, 12, 5, 7), 4), ((2, 64, 2, 2), 8), ((2, 16, 40, 40), 4)])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_silu_gradients(shape, groups, affine):
    for channels_last in _layouts(shape):
        x, w, b = _gn_inputs(shape, affine, channels_last, seed=3)
        params = [t.requires_grad_(True) for t in (w, b) if t is not None]
        x.requires_grad_(True)
        grad = torch.randn(shape)
        got = torch.autograd.grad(native.group_norm_silu(x, groups, w, b), [x, *params], grad)
        inputs64 = [t.detach().double().requires_grad_(True) for t in (x, *params)]
        w64, b64 = inputs64[1:] if affine else (None, None)
        y64 = reference.group_norm_silu(inputs64[0], groups, w64, b64)
        want = torch.autograd.grad(y64, inputs64, grad.double())
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e.float(), atol=1e-4, rtol=1e-4)


# --- torch.library and torch.compile -----------------------------------------------------------------------


@requires_native
def test_opcheck():
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    w, b = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    torch.library.opcheck(ops.group_norm_silu.default, (x, 4, w, b, 1e-5))
    torch.library.opcheck(ops.group_norm_silu.default, (x.detach().to(memory_format=torch.channels_last), 4))
    _, mean, rstd = ops.group_norm_silu(x.detach(), 4, w.detach(), b.detach(), 1e-5)
    torch.library.opcheck(ops.group_norm_silu_backward.default,
                          (torch.randn(2, 8, 3, 3), x.detach(), 4, w.detach(), b.detach(), mean, rstd))
    xs, out = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    args = (xs, out, *_coefs(3), torch.arange(3))
    torch.library.opcheck(ops.sampler_step.default, (*args, torch.tensor(2), 1.0, True))
    torch.library.opcheck(ops.sampler_step.int, (*args, 2, None, False))
    torch.library.opcheck(ops.philox_normal.default, (torch.arange(3), 2, 10, 1))


@requires_native
def test_compile_fullgraph_traces_the_native_ops():
    def step(x, w, b, coefs, seeds, i):
        h = native.group_norm_silu(x, 4, w, b)
        return native.sampler_step(x, h, *coefs, seeds, i, clip=1.0, return_x0=True)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    x, w, b = torch.randn(2, 8, 4, 4), torch.randn(8), torch.randn(8)
    coefs, seeds = _coefs(2), torch.arange(2)
    for i in (3, torch.tensor(4)):
        for a, e in zip(compiled(x, w, b, coefs, seeds, i), step(x, w, b, coefs, seeds, i)):
            torch.testing.assert_close(a, e)


@pytest.mark.slow
@requires_native
def test_compile_inductor_runs_the_native_ops():
    def block(x, w, b, coefs, seeds, i):
        h = native.group_norm_silu(x * 2.0, 4, w, b) + 1.0  # pointwise neighbours for inductor to fuse around
        return native.sampler_step(x, h, *coefs, seeds, i, clip=1.0)

    compiled = torch.compile(block, fullgraph=True)
    x, w, b = torch.randn(2, 8, 4, 4), torch.randn(8), torch.randn(8)
    coefs, seeds = _coefs(2), torch.arange(2)
    torch.testing.assert_close(compiled(x, w, b, coefs, seeds, 3), block(x, w, b, coefs, seeds, 3))


# --- CUDA --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@requires_native_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_sampler_step_matches_reference(dtype):
    x = torch.randn(6, 3, 33, 17, device="cuda").to(dtype)
    out = torch.randn_like(x)
    coefs, seeds = _coefs(6, "cuda"), seeds_for(2, 6).cuda()
    step = torch.tensor(11, device="cuda")  # read on the device: no host sync
    for xi in (x, x.to(memory_format=torch.channels_last)):
        got = native.sampler_step(xi, out, *coefs, seeds, step, clip=1.0, return_x0=True)
        want = reference.sampler_step(x, out, *coefs, seeds, 11, clip=1.0, return_x0=True)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e)
    torch.testing.assert_close(native.philox_normal(seeds, 11, 1001), reference.philox_normal(seeds, 11, 1001))


@pytest.mark.gpu
@requires_native_cuda
def test_cuda_sampler_step_under_graph_capture():
    x = torch.randn(4, 1, 28, 28, device="cuda")
    coefs, seeds = _coefs(4, "cuda"), torch.arange(4, device="cuda")
    step = torch.zeros((), dtype=torch.int64, device="cuda")
    static_out = native.sampler_step(x, x, *coefs, seeds, step)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = native.sampler_step(x, x, *coefs, seeds, step)
    for i in (3, 8):
        step.fill_(i)
        graph.replay()
        torch.testing.assert_close(static_out, reference.sampler_step(x, x, *coefs, seeds, i))


@pytest.mark.gpu
@requires_native_cuda
# (2, 384, 32, 32) / 32: a group of 12288 floats, exactly 48 KiB, which with the kernel's static scratch is over
# what a block gets without opting in: it must take the uncached kernel, not fail to launch; (2, 383, 4, 8) / 1:
# 12256 floats, the largest group the cached kernel takes
@pytest.mark.parametrize("shape,groups", [((3, 12, 5, 7), 4), ((4, 64, 2, 2), 8), ((2, 256, 32, 32), 8),
                                          ((2, 384, 32, 32), 32), ((2, 383, 4, 8), 1)])
def test_cuda_group_norm_silu(shape, groups):
    for channels_last in _layouts(shape):
        x, w, b = _gn_inputs(shape, True, channels_last)
        x, w, b = x.cuda().requires_grad_(True), w.cuda().requires_grad_(True), b.cuda().requires_grad_(True)
        grad = torch.randn(shape, device="cuda")
        y = native.group_norm_silu(x, groups, w, b)
        got = torch.autograd.grad(y, [x, w, b], grad)
        inputs64 = [t.detach().double().requires_grad_(True) for t in (x, w, b)]
        y64 = reference.group_norm_silu(inputs64[0], groups, inputs64[1], inputs64[2])
        want = torch.autograd.grad(y64, inputs64, grad.double())
        torch.testing.assert_close(y, y64.float(), atol=1e-5, rtol=1e-5)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@requires_native_cuda
def test_cuda_group_norm_silu_backward_refuses_arguments_on_another_device():
    x = torch.randn(2, 8, 4, 4, device="cuda")
    y, mean, rstd = torch.ops.fastdiff_native.group_norm_silu(x, 2)
    grad = torch.randn_like(x)
    for args, name in (((grad.cpu(), x, 2, None, None, mean, rstd), "grad_out"),
                       ((grad, x, 2, None, None, mean.cpu(), rstd), "mean")):
        with pytest.raises(RuntimeError, match=f"{name} is on cpu but x is on cuda"):
            torch.ops.fastdiff_native.group_norm_silu_backward(*args)


@requires_native
@pytest.mark.parametrize("shape, channels_last", [((2, 32, 0, 4), False), ((2, 32, 0, 4), True), ((2, 8, 0, 0), False),
                                                  ((2, 8, 0), False)])
def test_group_norm_silu_of_an_empty_tensor(shape, channels_last):
    # An empty tensor with a batch (its data pointer null) crashed the process in the kernels' first read
    x = torch.randn(shape)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    w, b = torch.ones(shape[1], requires_grad=True), torch.zeros(shape[1], requires_grad=True)
    y = native.group_norm_silu(x, 8 if shape[1] % 8 == 0 else 1, w, b)
    assert y.shape == x.shape
    gx, gw, gb = torch.autograd.grad(y.sum(), (x, w, b), allow_unused=True)
    assert gx.shape == x.shape and not gw.any() and not gb.any()


@requires_native
def test_silu_of_very_negative_inputs_is_zero():
    # Below y = -60 silu(y) was y * sigmoid(-60): -0.88 at y = -1e26 (the float64 truth is -0), its gradient -3.5
    x = torch.randn(2, 16, 4, 4, requires_grad=True)
    b = torch.full((16,), -1e26, requires_grad=True)
    y = native.group_norm_silu(x, 4, torch.ones(16), b)
    (gb,) = torch.autograd.grad(y.sum(), (b,))
    assert y.abs().max() == 0 and gb.abs().max() == 0


@requires_native
def test_sampler_step_gradients_of_the_coefficients_alone():
    # With none of x, model_out, p, q needing a gradient, x0 has no graph: the backward raised on it
    n = 3
    x, out = torch.randn(n, 1, 4, 4), torch.randn(n, 1, 4, 4)
    p, q, A, B, sigma = _coefs(n)
    A, sigma = A.clone().requires_grad_(), sigma.clone().requires_grad_()
    seeds = seeds_for(0, n)
    got = torch.autograd.grad(native.sampler_step(x, out, p, q, A, B, sigma, seeds, 5).sum(), (A, sigma))
    want = torch.autograd.grad(reference.sampler_step(x, out, p, q, A, B, sigma, seeds, 5).sum(), (A, sigma))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_float64_runs_the_reference_automatically():
    # The kernels compute in float32: float64 through them came back with float32's error labelled float64
    from fastdiff import ops
    from fastdiff.ops import dispatch

    x = torch.randn(2, 16, 5, 5, dtype=torch.float64, requires_grad=True)
    assert dispatch.backend_for(x, dispatch.REGISTRY["group_norm_silu"]) == "torch"
    assert torch.equal(ops.group_norm_silu(x, 4), reference.group_norm_silu(x, 4))
    assert torch.autograd.gradcheck(lambda t: ops.group_norm_silu(t, 4), (x[:1, :, :2, :2].detach().requires_grad_(),))
