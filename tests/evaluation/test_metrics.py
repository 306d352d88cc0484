"""Metrics against closed forms and scipy references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from unclip.evaluation.metrics import (
    clip_score,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    kernel_inception_distance,
    precision_recall,
)


def scipy_fid(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@pytest.mark.parametrize("seed", range(4))
def test_frechet_distance_matches_scipy_sqrtm(seed):
    rng = np.random.default_rng(seed)
    d = 16
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    ours, ref = frechet_distance(mu1, s1, mu2, s2), scipy_fid(mu1, s1, mu2, s2)
    assert abs(ours - ref) <= 1e-6 * abs(ref)


def test_frechet_distance_closed_form_and_identity():
    d = 8
    # N(0, I) vs N(m, 4I): ‖m‖² + d(1 + 4 − 2·2) = ‖m‖² + d
    m = np.arange(d, dtype=np.float64)
    assert frechet_distance(np.zeros(d), np.eye(d), m, 4 * np.eye(d)) == pytest.approx(m @ m + d, rel=1e-12)
    feats = torch.randn(500, 32, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance_from_features(feats, feats.clone())) < 1e-9
    # rank-deficient covariances (fewer samples than dimensions) stay real and non-negative
    few = torch.randn(10, 64, generator=torch.Generator().manual_seed(1))
    assert frechet_distance_from_features(few, few + 0.5) >= 0


def test_feature_statistics_are_float64_and_unbiased():
    x = torch.randn(1000, 4, dtype=torch.float32)
    mu, sigma = feature_statistics(x)
    assert mu.dtype == np.float64 and sigma.shape == (4, 4)
    assert np.allclose(sigma, np.cov(x.double().numpy(), rowvar=False))


def test_kid_is_near_zero_for_one_distribution_and_grows_with_shift():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(400, 16, generator=g), torch.randn(400, 16, generator=g)
    same, same_std = kernel_inception_distance(x, y, subsets=20, subset_size=200, generator=g)
    small, _ = kernel_inception_distance(x, y + 0.3, subsets=20, subset_size=200, generator=g)
    large, std = kernel_inception_distance(x, y + 1.0, subsets=20, subset_size=200, generator=g)
    assert abs(same) < 3 * same_std + 0.01, "unbiased: zero within its own noise"
    assert 10 * abs(same) < small < large and std > 0
    # closed form for point masses: MMD² between δ_a and δ_b = k(a,a) + k(b,b) − 2k(a,b)
    a, b = torch.ones(5, 2), torch.zeros(5, 2)
    mean, _ = kernel_inception_distance(a, b, subsets=1, subset_size=5)
    assert mean == pytest.approx((1 + 1) ** 3 + 1 - 2 * 1, rel=1e-12)


def test_precision_recall_on_constructed_sets():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 8, generator=g)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
    # fakes collapsed onto a few real points: every fake is realistic, most reals are not covered
    collapsed = real[:5].repeat(20, 1)
    precision, recall = precision_recall(real, collapsed)
    assert precision == 1.0 and recall < 0.2


def test_clip_score_clamps_negative_cosines():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert clip_score(img, txt) == pytest.approx(100 / 3)
