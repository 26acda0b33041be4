"""GroupNorm + SiLU: the Triton kernels (interpreter on CPU, compiled on GPU) against `fastdiff.reference`."""

import importlib

import pytest
import torch

from fastdiff import nn as fnn
from fastdiff import reference
from fastdiff.errors import ConfigError
from fastdiff.ops import group_norm_silu, use_backend
from fastdiff.ops.group_norm_silu import (
    CHUNK,
    MAX_FUSED_FWD,
    PATHS,
    SPLIT_BY_DEFAULT,
    _launch_plan,
    forced_path,
    group_norm_silu_bwd,
    group_norm_silu_fwd,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TINY_SHAPES = [((1, 2, 1, 1), 1), ((2, 6, 5, 7), 3), ((3, 8, 4, 4), 4)]  # minimal, odd, power of two
GPU_SHAPES = [((2, 64, 33, 33), 32), ((8, 256, 32, 32), 32), ((4, 96, 64, 64), 8), ((2, 32, 128, 128), 4)]


def _inputs(shape, dtype, device, channels_last, affine=True, mean=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) + mean).to(device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    C = shape[1]
    w = (1 + 0.5 * torch.randn(C, generator=g)).to(device, dtype) if affine else None
    b = (0.5 * torch.randn(C, generator=g)).to(device, dtype) if affine else None
    dy = torch.randn(shape, generator=g).to(device, dtype)
    return x, w, b, dy


def _grads(fn, x, w, b, dy):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = fn(*leaves)
    params = [t for t in leaves if t is not None]
    return (y.detach(), *torch.autograd.grad(y, params, dy))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_forward_and_backward_match_reference(device, dtype, channels_last, assert_lowp_close):
    shapes = TINY_SHAPES if device.type == "cpu" else GPU_SHAPES
    for i, (shape, G) in enumerate(shapes):
        x, w, b, dy = _inputs(shape, dtype, device, channels_last, affine=i != 1)
        ours = _grads(lambda x, w, b: group_norm_silu(x, G, w, b), x, w, b, dy)
        assert ours[0].dtype == dtype and ours[0].stride() == x.stride()
        truth = _grads(lambda x, w, b: reference.group_norm_silu(x, G, w, b, upcast=True), x, w, b, dy.float())
        if dtype == torch.float32:
            for name, a, t in zip(["y", "dx", "dw", "db"], ours, truth):
                torch.testing.assert_close(a, t, atol=2e-5, rtol=2e-5, msg=lambda m: f"{shape} {name}: {m}")
        else:
            torch_lowp = _grads(lambda x, w, b: reference.group_norm_silu(x, G, w, b), x, w, b, dy)
            for name, a, r, t in zip(["y", "dx", "dw", "db"], ours, torch_lowp, truth):
                assert_lowp_close(a, r, t, name=f"{shape} {name}", atol=2e-3 if name in ("y", "dx") else 5e-3)


@pytest.mark.parametrize("path", ["split", "looped"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_chunked_paths_match_reference(device, channels_last, path):
    # A small max_fused splits groups into chunks at tiny sizes (the last one partial); then the chunks run as
    # many programs per group (split: statistics merged across programs) or as one program's loop (looped).
    shape, G = ((2, 6, 9, 5), 2) if device.type == "cpu" else ((2, 64, 96, 96), 4)
    chunk = 16 if device.type == "cpu" else 4096
    x, w, b, dy = _inputs(shape, torch.float32, device, channels_last)
    with forced_path(path):
        y, mean, rstd = group_norm_silu_fwd(x, w, b, G, 1e-5, max_fused=chunk, chunk=chunk)
        dx, dw, db = group_norm_silu_bwd(dy, x, w, b, mean, rstd, G, max_fused=chunk, chunk=chunk)
    truth = _grads(lambda x, w, b: reference.group_norm_silu(x, G, w, b), x, w, b, dy)
    for name, a, t in zip(["y", "dx", "dw", "db"], (y, dx, dw, db), truth):
        torch.testing.assert_close(a, t, atol=2e-5, rtol=2e-5, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(mean, x.reshape(shape[0], G, -1).mean(-1).flatten(), atol=1e-5, rtol=0)


def test_every_path_gives_the_same_result_without_weight_and_bias(device):
    # The paths differ only in how a group's chunks are scheduled: the statistics and outputs of one program
    # holding the whole group, to rounding.
    shape, G = ((2, 4, 6, 6), 2) if device.type == "cpu" else ((4, 64, 64, 64), 8)
    chunk = 16 if device.type == "cpu" else 4096
    x, _, _, dy = _inputs(shape, torch.float32, device, False)

    def run(path, limit):
        with forced_path(path):
            y, mean, rstd = group_norm_silu_fwd(x, None, None, G, 1e-5, max_fused=limit, chunk=limit)
            dx, _, _ = group_norm_silu_bwd(dy, x, None, None, mean, rstd, G, max_fused=limit, chunk=limit)
        return y, mean, rstd, dx

    whole = run(None, 1 << 20)
    for path in PATHS:
        for name, a, f in zip(["y", "mean", "rstd", "dx"], run(path, chunk), whole):
            torch.testing.assert_close(a, f, atol=2e-5, rtol=2e-5, msg=lambda m: f"{path} {name}: {m}")


def test_forced_path_is_checked_and_restored(monkeypatch):
    gn = importlib.import_module("fastdiff.ops.group_norm_silu")  # the module (fastdiff.ops exports the function)
    with pytest.raises(ConfigError, match="unknown path 'loop'"):
        with forced_path("loop"):
            pass
    x = torch.zeros(1, 2, 256, 256)  # one group of 2x65536 elements: split into chunks
    with pytest.raises(RuntimeError, match="boom"), forced_path("looped"):
        raise RuntimeError("boom")
    assert gn._forced is None and _launch_plan(x, 1, MAX_FUSED_FWD, CHUNK)[1] is (not SPLIT_BY_DEFAULT)
    with forced_path("looped"):
        plan, looped = _launch_plan(x, 1, MAX_FUSED_FWD, CHUNK)
        assert looped and plan[3] > 1
        assert _launch_plan(torch.zeros(1, 2, 8, 8), 1, MAX_FUSED_FWD, CHUNK)[1] is False  # one chunk: fused
    # looped by default (once SPLIT_BY_DEFAULT flips) only with at least as many groups as SMs
    monkeypatch.setattr(gn, "SPLIT_BY_DEFAULT", False)
    monkeypatch.setattr(gn, "_num_sms", lambda device: 132)
    assert _launch_plan(torch.zeros(32, 256, 64, 64), 32, MAX_FUSED_FWD, CHUNK)[1] is True
    assert _launch_plan(torch.zeros(1, 256, 64, 64), 32, MAX_FUSED_FWD, CHUNK)[1] is False  # 32 groups: split


@pytest.mark.parametrize("path", [None, *PATHS], ids=["fused", *PATHS])
def test_statistics_are_stable_for_a_large_mean(device, path):
    # mean 1e3, std 1: E[x^2] - E[x]^2 in float32 would lose every significant digit of the variance.
    shape, G = ((2, 4, 8, 8), 2) if device.type == "cpu" else ((4, 128, 64, 64), 32)
    x, w, b, _ = _inputs(shape, torch.float32, device, False, mean=1e3)
    limit = 32 if path is not None else 1 << 20
    with forced_path(path):
        y, mean, rstd = group_norm_silu_fwd(x, w, b, G, 1e-5, max_fused=limit, chunk=limit)
    truth = reference.group_norm_silu(x.double(), G, w.double(), b.double())
    torch_err = (reference.group_norm_silu(x, G, w, b).double() - truth).abs().max().item()
    err = (y.double() - truth).abs().max().item()
    assert err <= 2 * torch_err + 1e-5, f"max err {err:.3g} vs torch fp32 {torch_err:.3g}"
    xs = x.double().view(shape[0], G, -1)
    torch.testing.assert_close(mean.double(), xs.mean(-1).flatten(), atol=1e-4, rtol=0)
    torch.testing.assert_close(rstd.double(), (xs.var(-1, unbiased=False) + 1e-5).rsqrt().flatten(), rtol=1e-4, atol=0)


def test_opcheck(device):
    shape, G = ((2, 4, 3, 3), 2) if device.type == "cpu" else ((4, 64, 16, 16), 8)
    x, w, b, dy = _inputs(shape, torch.float32, device, False)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    torch.library.opcheck(torch.ops.fastdiff.group_norm_silu_fwd.default, (x, w, b, G, 1e-5))
    torch.library.opcheck(torch.ops.fastdiff.group_norm_silu_fwd.default, (x.detach(), None, None, G, 1e-5))
    y, mean, rstd = torch.ops.fastdiff.group_norm_silu_fwd(x.detach(), w.detach(), b.detach(), G, 1e-5)
    torch.library.opcheck(torch.ops.fastdiff.group_norm_silu_bwd.default,
                          (dy, x.detach(), w.detach(), b.detach(), mean, rstd, G))


def test_module_matches_on_every_backend(device):
    shape, G = ((2, 8, 5, 5), 4) if device.type == "cpu" else ((8, 128, 32, 32), 32)
    m = fnn.GroupNormSiLU(G, shape[1]).to(device)
    torch.nn.init.normal_(m.weight)
    x = torch.randn(shape, device=device)
    y_triton = m(x)
    with use_backend("torch"):
        torch.testing.assert_close(y_triton, m(x), atol=2e-5, rtol=2e-5)


def test_compiles_without_graph_breaks(device):
    shape, G = ((2, 4, 3, 3), 2) if device.type == "cpu" else ((8, 64, 32, 32), 8)
    m = torch.nn.Sequential(torch.nn.Conv2d(shape[1], shape[1], 1), fnn.GroupNormSiLU(G, shape[1])).to(device)
    x = torch.randn(shape, device=device)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True)
    y = compiled(x)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    y_ref = torch.nn.Sequential(m[0], torch.nn.GroupNorm(G, shape[1]).to(device), torch.nn.SiLU())(x)
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=2e-5)
    for g, p in zip(grads, m[0].parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["non_dense", "width_of_one"])
def test_odd_layouts(device, layout):
    # non_dense: a slice whose h and w do not merge into one index runs on a contiguous copy; results and layouts
    # still match. width_of_one: a transposed [N, C, 1, H] view is [N, C, H, 1] with W's stride not 1; it recursed
    # without end (its "contiguous" copy was itself).
    if layout == "non_dense":
        x = torch.randn((2, 8, 6, 9) if device.type == "cpu" else (8, 64, 34, 33), device=device)[:, :, :, 1:-1]
    else:
        x = torch.randn((2, 8, 1, 7) if device.type == "cpu" else (4, 64, 1, 1024), device=device).transpose(2, 3)
        assert x.is_contiguous() and x.stride(3) != 1
    w, b = torch.randn(x.shape[1], device=device), torch.randn(x.shape[1], device=device)
    dy = torch.randn(x.shape, device=device)
    ours = _grads(lambda x, w, b: group_norm_silu(x, 4, w, b), x, w, b, dy)
    ref = _grads(lambda x, w, b: reference.group_norm_silu(x, 4, w, b), x, w, b, dy)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("view", ["strided", "expanded"])
def test_weight_and_bias_views(device, view):
    # The kernels read weight[c] at offset c: a strided weight was read at the wrong elements, and an expanded one
    # (stride 0) past its one element
    shape = (2, 6, 4, 5) if device.type == "cpu" else (4, 64, 32, 32)
    C = shape[1]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device)
    dy = torch.randn(shape, generator=g).to(device)
    n = 2 * C if view == "strided" else 1
    results = []
    for fn in (group_norm_silu, reference.group_norm_silu):
        wb = (1 + torch.randn(n, generator=torch.Generator().manual_seed(1))).to(device).requires_grad_()
        bb = torch.randn(n, generator=torch.Generator().manual_seed(2)).to(device).requires_grad_()
        w, b = (wb[::2], bb[1::2]) if view == "strided" else (wb.expand(C), bb.expand(C))
        xl = x.clone().requires_grad_()
        y = fn(xl, 2, w, b)
        results.append((y.detach(), *torch.autograd.grad(y, (xl, wb, bb), dy)))
    for a, r in zip(*results):
        torch.testing.assert_close(a, r, atol=2e-5, rtol=2e-5)
