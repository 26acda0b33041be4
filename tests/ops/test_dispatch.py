import pytest
import torch

from fastdiff import ops, reference
from fastdiff.errors import ConfigError
from fastdiff.ops.dispatch import backend_for


def test_cpu_defaults_to_reference(monkeypatch):
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, 4, 3, 3)
    assert backend_for(x, ("torch", "triton")) == "torch"
    torch.testing.assert_close(ops.group_norm_silu(x, 2), reference.group_norm_silu(x, 2))
    t = torch.tensor([0.0, 10.0])
    torch.testing.assert_close(ops.timestep_embedding(t, 8), reference.timestep_embedding(t, 8))


def test_unknown_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "cuda-magic")
    with pytest.raises(ConfigError, match="FASTDIFF_BACKEND='cuda-magic' is not a backend"):
        backend_for(torch.zeros(1))


def test_forced_torch(monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "torch")
    assert backend_for(torch.zeros(1)) == "torch"
