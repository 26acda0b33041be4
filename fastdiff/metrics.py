"""Sample-quality metrics over feature vectors (one row per image): Frechet distance, KID, precision and recall.

Pure functions of two feature sets, independent of where the features come from; `fastdiff.evaluate` feeds
them the evaluation classifier's features and reports each figure beside its real-vs-real value.

- Frechet distance (Heusel et al. 2017): the distance between Gaussians fitted to the two sets.
- KID (Binkowski et al. 2018): the unbiased estimate of MMD^2 with the cubic polynomial kernel
  k(x, y) = (x.y / d + 1)^3. Unlike FD it has no bias that depends on the sample size, so two samples of the
  same distribution score ~0 (it can be slightly negative).
- Precision and recall (Kynkaanniemi et al. 2019): each set's manifold is the union of balls around its points
  with the radius to the point's k-th nearest neighbour in the same set; precision is the fraction of generated
  points inside the real manifold (fidelity), recall the fraction of real points inside the generated one
  (coverage).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _float64(x) -> torch.Tensor:
    """A [N, D] float64 CPU tensor from a tensor or an array, of finite values (an inf row's k-NN radius is inf,
    which put every real row in the generated manifold: recall 1; NaN failed inside LAPACK or gave NaN)."""
    t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(t.shape)}")
    t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"features hold NaN or inf in {int((~torch.isfinite(t)).any(1).sum())} of {len(t)} rows")
    return t


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between the Gaussians fitted to rows of a and b."""
    a, b = _float64(a).numpy(), _float64(b).numpy()
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} and {b.shape[1]}")
    if min(len(a), len(b)) < 2:
        raise ValueError(f"the Frechet distance needs at least 2 rows in each set, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    # [1, 1] for one feature, where np.cov gives a 0-d array
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    # Tr((S_a S_b)^(1/2)) = sum sqrt(eig(S_a^(1/2) S_b S_a^(1/2))), a symmetric PSD matrix: stable with eigh.
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    tr_cross = np.sqrt(np.clip(eig, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_cross)


def _cubic(dots: torch.Tensor, d: int) -> torch.Tensor:
    """The polynomial kernel of dot products of D-dimensional rows: (x.y / d + 1)^3."""
    return (dots / d + 1) ** 3


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x.y / d + 1)^3 for every pair of rows: [N, D] x [M, D] -> [N, M]."""
    return _cubic(x @ y.T, x.shape[1])


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """The unbiased MMD^2 estimate with the polynomial kernel (Gretton et al. 2012, eq. 3):
    mean of k(x_i, x_j) over i != j, plus the same for y, minus twice the mean of k(x_i, y_j) over all pairs."""
    m, n = len(x), len(y)
    within_x = (_kernel_sum(x, x) - _kernel_diagonal_sum(x)) / (m * (m - 1))
    within_y = (_kernel_sum(y, y) - _kernel_diagonal_sum(y)) / (n * (n - 1))
    return float(within_x + within_y - 2 * _kernel_sum(x, y) / (m * n))


def _kernel_sum(x: torch.Tensor, y: torch.Tensor, chunk: int = 2048) -> float:
    """The sum of `polynomial_kernel(x, y)`, chunk rows of x at a time (all rows of 50,000 images: a 20 GB matrix)."""
    return float(sum(polynomial_kernel(x[i : i + chunk], y).sum() for i in range(0, len(x), chunk)))


def _kernel_diagonal_sum(x: torch.Tensor) -> float:
    """The sum of k(x_i, x_i)."""
    return float(_cubic((x * x).sum(1), x.shape[1]).sum())


def kid(a, b, *, subsets: int = 10, max_subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance between feature sets a [N, D] and b [M, D]: (estimate, standard error).

    The estimate is the unbiased MMD^2 over all rows of both sets (`mmd2_unbiased`). The standard error comes from
    disjoint subsets: both sets are shuffled (seeded) and split into `subsets` subsets (more when a subset would
    exceed `max_subset_size` rows, fewer when a set has under 2 rows per subset), whose MMD^2 are independent
    unbiased estimates; std / sqrt(subsets) is the standard error of their mean (NaN with a single subset), which
    is no smaller than the all-rows estimate's (that one is their mean over every split: Rao-Blackwell). Until
    2026-12-07 the estimate was that mean, a noisier one (tests/test_metrics.py). This is a standard error, not the
    spread of subset values that torch-fidelity reports as "KID std".
    """
    a, b = _float64(a), _float64(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} and {b.shape[1]}")
    count = max(subsets, math.ceil(max(len(a), len(b)) / max_subset_size))
    count = min(count, len(a) // 2, len(b) // 2)
    if count < 1:
        raise ValueError(f"KID needs at least 2 rows in each set, got {len(a)} and {len(b)}")
    g = torch.Generator().manual_seed(seed)
    perm_a, perm_b = torch.randperm(len(a), generator=g), torch.randperm(len(b), generator=g)
    size_a, size_b = len(a) // count, len(b) // count
    values = np.array([
        mmd2_unbiased(a[perm_a[i * size_a : (i + 1) * size_a]], b[perm_b[i * size_b : (i + 1) * size_b]])
        for i in range(count)
    ])
    stderr = float(values.std(ddof=1) / math.sqrt(count)) if count > 1 else float("nan")
    return mmd2_unbiased(a, b), stderr


def _distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # From differences, not |x|^2 + |y|^2 - 2 x.y: a point's distance to itself is exactly 0, so a point always
    # lies in its own ball even when duplicates make the radius 0.
    return torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")


def knn_radii(x: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """The distance from each row of x to its k-th nearest other row of x."""
    # Sorted distances from a row start with its own 0, so the k-th neighbour is at index k.
    return torch.cat([_distances(x[i : i + chunk], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), chunk)])


def in_manifold(points: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Whether each point lies within radii[j] of some ref[j] (the k-NN manifold of ref): bool [N]."""
    return torch.cat([(_distances(points[i : i + chunk], ref) <= radii).any(dim=1)
                      for i in range(0, len(points), chunk)])


def precision_recall(real, fake, *, k: int = 3, real_radii=None) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of fake [M, D] against real [N, D], with k-NN
    manifolds (k=3 as in the paper): precision = fraction of fake rows in the real manifold, recall = fraction
    of real rows in the fake manifold. Both are 1 for identical sets and 0 for sets far apart.

    real_radii: `knn_radii(real, k)` computed once for a real set scored against several fake ones.
    """
    real, fake = _float64(real), _float64(fake)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: {real.shape[1]} and {fake.shape[1]}")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} rows in each set, "
                         f"got {len(real)} and {len(fake)}")
    real_radii = knn_radii(real, k) if real_radii is None else torch.as_tensor(real_radii, dtype=torch.float64)
    if real_radii.shape != (len(real),):
        raise ValueError(f"real_radii must be [{len(real)}], got shape {tuple(real_radii.shape)}")
    precision = in_manifold(fake, real, real_radii).double().mean()
    recall = in_manifold(real, fake, knn_radii(fake, k)).double().mean()
    return float(precision), float(recall)
