"""Our FID, KID and precision/recall against torch-fidelity's own functions on the same features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import calculate_precision_recall_full

from unclip.evaluation.metrics import (
    frechet_distance,
    frechet_distance_from_features,
    kernel_inception_distance,
    precision_recall,
)


def _features(seed: int, n: int = 600, d: int = 48, shift: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5  # correlated, like real features
    real = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix
    fake = (torch.randn(n - 50, d, generator=g, dtype=torch.float64) * 1.1 + shift) @ mix
    return real, fake


@pytest.mark.parametrize("seed", range(3))
def test_fid_matches_torch_fidelity(seed):
    real, fake = _features(seed)
    theirs = fid_statistics_to_metric(fid_features_to_statistics(fake), fid_features_to_statistics(real),
                                      verbose=False)["frechet_inception_distance"]
    ours = frechet_distance_from_features(real, fake)
    assert theirs > 0.1 and ours == pytest.approx(theirs, rel=1e-9)
    stats = fid_features_to_statistics(real)  # the mu/sigma that reference .npz files hold
    assert frechet_distance(stats["mu"], stats["sigma"], fake.mean(0).numpy(),
                            np.cov(fake.numpy(), rowvar=False)) == pytest.approx(theirs, rel=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_kid_matches_torch_fidelity_on_the_same_subset(seed):
    # Whole sets as the one subset: no sampling, so the two unbiased MMD² estimates must agree exactly.
    real, fake = _features(seed, n=300)
    fake = fake[:250]
    m = 250
    theirs = kid_features_to_metric(fake, real[:m], kid_subsets=1, kid_subset_size=m, kid_kernel="poly",
                                    kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1,
                                    rng_seed=0, verbose=False)["kernel_inception_distance_mean"]
    ours, std = kernel_inception_distance(real[:m], fake, subsets=1, subset_size=m)
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12) and std == 0.0


@pytest.mark.parametrize("k", [3, 5])
def test_precision_recall_matches_torch_fidelity(k):
    real, fake = _features(7, n=500, shift=0.4)
    # torch-fidelity's convention: features_1 generated, features_2 real
    p_ref, r_ref = calculate_precision_recall_full(fake, real, neighborhood=k, batch_size=10000)
    p, r = precision_recall(real, fake, k)
    assert 0.05 < p_ref < 0.95 and 0.05 < r_ref < 0.95, "a case where both can be wrong"
    assert (p, r) == pytest.approx((p_ref, r_ref), abs=1e-6)  # theirs averages in float32; one sample is 2e-3
    # tiny blocks (3 rows at a time) give the same answer as one block
    assert precision_recall(real, fake, k, block_bytes=3 * 8 * 500) == (p, r)
