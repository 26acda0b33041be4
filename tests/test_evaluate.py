import numpy as np
import pytest
import torch

from fastdiff.evaluate import frechet_distance
from fastdiff.models.classifier import _augment


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5000, 4))
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-8)
    # Same covariance, shifted mean: FD = ||shift||^2.
    assert frechet_distance(a, a + np.array([1.0, 2.0, 0.0, 0.0])) == pytest.approx(5.0, rel=1e-6)
    # Isotropic Gaussians N(0, s1^2 I) and N(0, s2^2 I): FD = d (s1 - s2)^2.
    b = rng.normal(size=(200_000, 3)) * 2.0
    c = rng.normal(size=(200_000, 3)) * 0.5
    assert frechet_distance(b, c) == pytest.approx(3 * 1.5**2, rel=0.02)


def test_frechet_distance_matches_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    a = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 0.3
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy_linalg.sqrtm(s_a @ s_b).real
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)


def test_augment_shifts_within_bounds():
    x = torch.zeros(4, 1, 8, 8)
    x[:, :, 4, 4] = 1
    y = _augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and (y.sum(dim=(1, 2, 3)) == 1).all()
