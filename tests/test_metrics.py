"""fastdiff.metrics: Frechet distance, KID and precision/recall on feature sets with known answers."""

import itertools

import numpy as np
import pytest
import torch

from fastdiff.metrics import frechet_distance, kid, knn_radii, mmd2_unbiased, precision_recall


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
    # One feature (np.cov gives it as a 0-d array): (mu_a - mu_b)^2 + (s_a - s_b)^2.
    assert frechet_distance(b[:, :1], c[:, :1] + 1.0) == pytest.approx(1.0 + 1.5**2, rel=0.02)
    with pytest.raises(ValueError, match="feature sizes differ: 3 and 2"):
        frechet_distance(b, c[:, :2])


def test_frechet_distance_matches_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    a = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 0.3
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy_linalg.sqrtm(s_a @ s_b).real
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)


def _direct_mmd2(x, y):
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3 written as the double sums of its definition."""
    d = len(x[0])

    def k(a, b):
        return (sum(p * q for p, q in zip(a, b)) / d + 1) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    xy = sum(k(a, b) for a in x for b in y) / (m * n)
    return xx + yy - 2 * xy


def test_kid_by_hand():
    # d = 2: k within x = (0/2 + 1)^3 = 1; within y = (-2/2 + 1)^3 = 0; across: (1.5)^3 twice and (0.5)^3 twice,
    # mean 1.75. MMD^2 = 1 + 0 - 2 * 1.75 = -2.5 (the unbiased estimate can be negative).
    x = np.array([[1.0, 0.0], [0.0, 1.0]])
    y = np.array([[1.0, 1.0], [-1.0, -1.0]])
    value, stderr = kid(x, y, subsets=1)
    assert value == pytest.approx(-2.5, abs=1e-12) and np.isnan(stderr)


def test_kid_matches_direct_formula():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(5, 3)) * 1.5 + 0.3
    direct = _direct_mmd2(x.tolist(), y.tolist())
    assert kid(x, y, subsets=1)[0] == pytest.approx(direct, rel=1e-10)
    assert mmd2_unbiased(torch.as_tensor(x), torch.as_tensor(y)) == pytest.approx(direct, rel=1e-10)
    # Tensors and arrays give the same value; so does float32 input up to its rounding.
    assert kid(torch.as_tensor(x, dtype=torch.float32), y, subsets=1)[0] == pytest.approx(direct, rel=1e-5)


def test_kid_is_all_rows_and_its_standard_error_the_disjoint_subsets():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 4)), rng.normal(size=(60, 4)) + 0.5
    value, stderr = kid(x, y, subsets=4)
    assert value == pytest.approx(_direct_mmd2(x.tolist(), y.tolist()), rel=1e-10)
    # Reproduce the split: one seeded permutation per set, 4 disjoint slices (10 rows of x, 15 of y each).
    g = torch.Generator().manual_seed(0)
    pa, pb = torch.randperm(40, generator=g).numpy(), torch.randperm(60, generator=g).numpy()
    vals = [_direct_mmd2(x[pa[10 * i : 10 * i + 10]].tolist(), y[pb[15 * i : 15 * i + 15]].tolist()) for i in range(4)]
    assert stderr == pytest.approx(np.std(vals, ddof=1) / 2, rel=1e-10)
    # The subset count grows to keep subsets under max_subset_size, and shrinks to keep 2 rows per subset.
    assert kid(x, y, subsets=2, max_subset_size=10)[1] == pytest.approx(kid(x, y, subsets=6)[1], rel=1e-12)
    assert kid(x[:6], y, subsets=10)[1] == pytest.approx(kid(x[:6], y, subsets=3)[1], rel=1e-12)
    # chunks of the kernel matrix (its memory is bounded) sum to the whole
    from fastdiff.metrics import _kernel_sum, polynomial_kernel

    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    assert _kernel_sum(xt, yt, chunk=7) == pytest.approx(float(polynomial_kernel(xt, yt).sum()), rel=1e-12)


def test_kid_over_all_rows_is_less_noisy_than_the_mean_of_disjoint_subsets():
    """The mean of the 10 subsets' estimates, fastdiff's KID until 2026-12-07, uses a tenth of the kernel pairs; the
    all-rows estimate is their average over every split, so its spread over repeated draws is smaller."""
    rng = np.random.default_rng(3)
    full, subset_mean = [], []
    for seed in range(20):
        a, b = rng.normal(size=(400, 8)), rng.normal(size=(150, 8))  # one distribution: MMD^2 = 0
        full.append(kid(a, b, seed=seed)[0])
        g = torch.Generator().manual_seed(seed)
        pa, pb = torch.randperm(400, generator=g), torch.randperm(150, generator=g)
        subset_mean.append(np.mean([mmd2_unbiased(torch.as_tensor(a)[pa[40 * i : 40 * i + 40]],
                                                  torch.as_tensor(b)[pb[15 * i : 15 * i + 15]]) for i in range(10)]))
    assert np.std(full) < 0.7 * np.std(subset_mean), (np.std(full), np.std(subset_mean))
    assert abs(np.mean(full)) < 3 * np.std(full) / np.sqrt(20)  # unbiased all the same: only the spread differs


def test_kid_same_distribution_is_unbiased_and_shift_is_detected():
    rng = np.random.default_rng(2)
    z = []
    for _ in range(20):
        a, b = rng.normal(size=(500, 16)), rng.normal(size=(500, 16))
        value, stderr = kid(a, b)
        assert abs(value) < 4 * stderr
        z.append(value / stderr)
    # Unbiased: the z-scores of independent draws centre on 0 (mean of 20 has standard deviation ~0.22).
    assert abs(np.mean(z)) < 1.0
    a, b = rng.normal(size=(500, 16)), rng.normal(size=(500, 16)) + 0.5
    value, stderr = kid(a, b)
    assert value > 10 * stderr > 0


def test_kid_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2 rows"):
        kid(np.zeros((1, 3)), np.zeros((5, 3)))
    # non-finite features: NaN failed inside LAPACK (FD) or gave NaN (KID); an inf row gave recall 1.0
    for bad in (np.nan, np.inf):
        fake = np.random.default_rng(0).normal(size=(20, 3))
        fake[4, 1] = bad
        real = np.random.default_rng(1).normal(size=(20, 3))
        for metric in (frechet_distance, kid, precision_recall):
            with pytest.raises(ValueError, match="features hold NaN or inf in 1 of 20 rows"):
                metric(real, fake)
    with pytest.raises(ValueError, match="the Frechet distance needs at least 2 rows in each set, got 1 and 5"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="feature sizes differ"):
        kid(np.zeros((5, 3)), np.zeros((5, 4)))


def _direct_precision_recall(real, fake, k):
    def radii(s):
        return [sorted(np.linalg.norm(p - q) for q in s)[k] for p in s]

    def inside(points, ref):
        r = radii(ref)
        return np.mean([any(np.linalg.norm(p - q) <= rq for q, rq in zip(ref, r)) for p in points])

    return inside(fake, real), inside(real, fake)


def test_precision_recall_by_hand():
    # 1-D, k=1. real 0,1,2,3,10: radii 1,1,1,1,7. fake 0.5,5,-1.5,-3: radii 2,4.5,1.5,1.5.
    # In the real manifold: 0.5 (near 0) and 5 (within 7 of 10); -1.5 and -3 are not -> precision 2/4.
    # In the fake manifold: 0, 1, 2 (within 2 of 0.5) and 3 (within 4.5 of 5); 10 is not -> recall 4/5.
    real = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
    fake = np.array([[0.5], [5.0], [-1.5], [-3.0]])
    assert precision_recall(real, fake, k=1) == pytest.approx((0.5, 0.8))
    assert knn_radii(torch.as_tensor(real), 1).tolist() == [1, 1, 1, 1, 7]


def test_precision_recall_matches_direct_loops():
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(30, 5)), rng.normal(size=(25, 5)) * 1.3 + 0.4
    for k in (1, 3, 5):
        direct = _direct_precision_recall(real, fake, k)
        assert precision_recall(real, fake, k=k) == pytest.approx(direct)
        radii = knn_radii(torch.as_tensor(real), k)
        assert precision_recall(real, fake, k=k, real_radii=radii) == pytest.approx(direct)


def test_precision_recall_identical_disjoint_and_dropped_modes():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(400, 8))
    assert precision_recall(a, a) == (1.0, 1.0)
    assert precision_recall(np.zeros((5, 3)), np.zeros((5, 3))) == (1.0, 1.0)  # duplicates: radius 0, still inside
    assert precision_recall(a, a + 100) == (0.0, 0.0)
    # Two real modes (2-D, where k-NN balls cover a density well), the generator covers one: every fake is
    # realistic (precision ~1) but half the real data is missed (recall ~0.5). A generator that adds a spurious
    # mode instead keeps recall and loses precision.
    mode = np.zeros(2)
    mode[0] = 50
    real = np.concatenate([rng.normal(size=(400, 2)), rng.normal(size=(400, 2)) + mode])
    p, r = precision_recall(real, rng.normal(size=(800, 2)))
    assert p > 0.9 and r == pytest.approx(0.5, abs=0.05)
    p, r = precision_recall(real[:400], real)
    assert p == pytest.approx(0.5, abs=0.05) and r == 1.0


def test_precision_recall_rejects_bad_input():
    with pytest.raises(ValueError, match="more than 3 rows"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))
    with pytest.raises(ValueError, match=r"real_radii must be \[10\]"):
        precision_recall(np.zeros((10, 2)), np.zeros((10, 2)), real_radii=np.zeros(9))
    with pytest.raises(ValueError, match=r"must be \[N, D\]"):
        precision_recall(np.zeros(10), np.zeros((10, 2)))
