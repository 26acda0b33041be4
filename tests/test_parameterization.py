import pytest
import torch

from fastdiff.diffusion.parameterization import to_eps, to_x0, training_target, x0_coefficients
from fastdiff.errors import ConfigError


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_round_trips(prediction):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(64, 3, generator=g, dtype=torch.float64)
    ab = torch.rand(64, 1, generator=g, dtype=torch.float64) * 0.98 + 0.01
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    out = training_target(prediction, x0, eps, ab)
    torch.testing.assert_close(to_x0(prediction, x_t, out, ab), x0)
    torch.testing.assert_close(to_eps(prediction, x_t, out, ab), eps)
    p, q = x0_coefficients(prediction, ab)
    torch.testing.assert_close(p * x_t + q * out, x0)


def test_v_definition():
    x0, eps, ab = torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([0.25])
    assert torch.allclose(training_target("v", x0, eps, ab), torch.tensor([0.5 * 2.0 - (0.75**0.5) * 1.0]))


def test_eps_cannot_invert_zero_snr():
    with pytest.raises(ConfigError, match="zero terminal SNR"):
        x0_coefficients("eps", torch.tensor([0.5, 0.0], dtype=torch.float64))


def test_unknown_prediction():
    with pytest.raises(ConfigError, match="unknown prediction"):
        training_target("score", torch.zeros(1), torch.zeros(1), torch.ones(1))
