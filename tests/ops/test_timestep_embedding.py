"""The sinusoidal timestep embedding kernel against `fastdiff.reference.timestep_embedding`."""

import math

import pytest
import torch

from fastdiff import nn as fnn
from fastdiff import reference
from fastdiff.ops import timestep_embedding, use_backend

DIMS = [1, 2, 7, 8, 33, 128]


def _timesteps(device, n):
    g = torch.Generator().manual_seed(0)
    return [
        torch.randint(0, 1000, (n,), generator=g).to(device),  # int64 (the training loop)
        (torch.rand(n, generator=g) * 999).to(device),  # float32 (the samplers)
        torch.cat([torch.tensor([0.0, 1.0, 999.0]), torch.rand(n - 3, generator=g) * 999]).double().to(device),
    ]


@pytest.mark.parametrize("freq_shift", [0.0, 1.0])
@pytest.mark.parametrize("max_period", [10000.0, 100.0])
def test_matches_reference(device, max_period, freq_shift):
    n = 64 if device.type == "cpu" else 4096  # enough timesteps for both max errors to reach their typical size
    for t in _timesteps(device, n):
        for dim in DIMS if device.type == "cpu" else DIMS + [1024, 1025]:
            if freq_shift and dim // 2 < 2:  # f_i divides by half - freq_shift
                continue
            emb = timestep_embedding(t, dim, max_period, freq_shift)
            ref = reference.timestep_embedding(t, dim, max_period, freq_shift)
            assert emb.shape == (n, dim) and emb.dtype == torch.float32
            # The arguments t*f reach 1e3, where one float32 ulp of f moves cos by ~1e-4: compare against the
            # float64 truth and allow twice torch's own float32 error.
            half = dim // 2
            f = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64, device=device)
                         / (half - freq_shift))
            args = t.double()[:, None] * f[None]
            truth = torch.cat([args.cos(), args.sin(), torch.zeros(n, dim % 2, dtype=torch.float64, device=device)], 1)
            err, ref_err = (emb.double() - truth).abs().max().item(), (ref.double() - truth).abs().max().item()
            assert err <= 2 * ref_err + 1e-6, f"dim {dim}, {t.dtype}: err {err:.3g} vs torch {ref_err:.3g}"
            if dim % 2:
                assert torch.all(emb[:, -1] == 0)


def test_opcheck(device):
    t = torch.tensor([1.0, 50.0, 999.0], device=device)
    torch.library.opcheck(torch.ops.fastdiff.timestep_embedding.default, (t, 9, 10000.0))
    torch.library.opcheck(torch.ops.fastdiff.timestep_embedding.default, (t.long(), 16, 10000.0))


def test_module_matches_on_every_backend(device):
    # The module on this device's backend and on the torch reference, both against the float64 truth by the rule
    # of test_matches_reference: at t = 999 one float32 ulp of a frequency moves cos by ~1e-4, and the device's
    # float32 exp need not round as the CPU's does, so a fixed tolerance against the reference alone is no bound.
    m = fnn.TimestepEmbedding(16, 32).to(device)
    t = torch.tensor([0, 10, 999], device=device)
    out = m(t)
    with use_backend("torch"):
        ref = m(t)
    f = torch.exp(-math.log(10000.0) * torch.arange(8, dtype=torch.float64, device=device) / 8)
    args = t.double()[:, None] * f[None]
    m64 = fnn.TimestepEmbedding(16, 32).to(device).double()
    m64.load_state_dict(m.state_dict())
    truth = m64.linear_2(torch.nn.functional.silu(m64.linear_1(torch.cat([args.cos(), args.sin()], 1))))
    err, ref_err = (out.double() - truth).abs().max().item(), (ref.double() - truth).abs().max().item()
    assert err <= 2 * ref_err + 1e-6, f"err {err:.3g} vs the reference's {ref_err:.3g}"


def test_compiles_without_graph_breaks(device):
    m = fnn.TimestepEmbedding(8, 16).to(device)
    t = torch.tensor([3.0, 500.0], device=device)
    torch._dynamo.reset()
    out = torch.compile(m, fullgraph=True)(t)
    ref = m.linear_2(torch.nn.functional.silu(m.linear_1(reference.timestep_embedding(t, 8))))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
