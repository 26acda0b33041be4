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


@pytest.mark.parametrize("max_period", [10000.0, 100.0])
def test_matches_reference(device, max_period):
    n = 64 if device.type == "cpu" else 4096  # enough timesteps for both max errors to reach their typical size
    for t in _timesteps(device, n):
        for dim in DIMS if device.type == "cpu" else DIMS + [1024, 1025]:
            emb = timestep_embedding(t, dim, max_period)
            ref = reference.timestep_embedding(t, dim, max_period)
            assert emb.shape == (n, dim) and emb.dtype == torch.float32
            # The arguments t*f reach 1e3, where one float32 ulp of f moves cos by ~1e-4: compare against the
            # float64 truth and allow twice torch's own float32 error.
            half = dim // 2
            f = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64, device=device) / half)
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
    m = fnn.TimestepEmbedding(16, 32).to(device)
    t = torch.tensor([0, 10, 999], device=device)
    out = m(t)
    with use_backend("torch"):
        torch.testing.assert_close(out, m(t), atol=1e-5, rtol=1e-5)


def test_compiles_without_graph_breaks(device):
    m = fnn.TimestepEmbedding(8, 16).to(device)
    t = torch.tensor([3.0, 500.0], device=device)
    torch._dynamo.reset()
    out = torch.compile(m, fullgraph=True)(t)
    ref = m.linear_2(torch.nn.functional.silu(m.linear_1(reference.timestep_embedding(t, 8))))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
