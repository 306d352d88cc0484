"""FID/FD, KID, precision/recall and CLIP score as pure functions of feature tensors.

Feature extraction lives elsewhere (as in k-diffusion's evaluation.py): these functions see only
[N, D] features, so they are exact, testable against closed forms and independent of the extractor.
Statistics are float64 throughout (docs/paper.md, evaluation conventions).
"""

from __future__ import annotations

import numpy as np
import torch


def feature_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] of [N, D] features, in float64."""
    x = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need [N >= 2, D] features, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a positive semi-definite matrix (negative round-off clipped)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ1−μ2‖² + tr(Σ1 + Σ2 − 2(Σ1Σ2)^½) (Heusel et al. 2017), robustly.

    tr((Σ1Σ2)^½) equals tr((Σ1^½ Σ2 Σ1^½)^½), whose argument is symmetric PSD, so it is computed from
    eigenvalues of symmetric matrices: no complex parts or failed ``sqrtm`` on near-singular covariances.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different sizes: {mu1.shape} vs {mu2.shape}")
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def frechet_distance_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between two [N, D] feature sets (float64 statistics)."""
    return frechet_distance(*feature_statistics(real), *feature_statistics(fake))


def kernel_inception_distance(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
                              generator: torch.Generator | None = None) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): unbiased MMD² with the cubic polynomial kernel (x·y/D + 1)³,
    averaged over random subsets.

    :param real, fake: [N, D] features.
    :param subset_size: samples per subset (capped at the smaller set's size).
    :return: (mean, std) over subsets.
    """
    x = real.detach().to(torch.float64).cpu()
    y = fake.detach().to(torch.float64).cpu()
    d = x.shape[1]
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError("KID needs at least 2 samples per set")
    values = []
    for _ in range(subsets):
        xs = x[torch.randperm(x.shape[0], generator=generator)[:m]]
        ys = y[torch.randperm(y.shape[0], generator=generator)[:m]]
        k_xx = (xs @ xs.T / d + 1) ** 3
        k_yy = (ys @ ys.T / d + 1) ** 3
        k_xy = (xs @ ys.T / d + 1) ** 3
        off = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
        values.append(float(off - 2 * k_xy.mean()))
    arr = np.asarray(values)
    return float(arr.mean()), float(arr.std())


# Rows of a distance block: BLOCK_BYTES / (8·N) rows against N columns in float64, so memory stays linear in N
# (256 MB per block; a full 30k × 30k float64 matrix would be 7.2 GB, and the three of them 21 GB).
BLOCK_BYTES = 256 * 2**20


def _rows_per_block(n_cols: int, block_bytes: int) -> int:
    return max(1, block_bytes // (8 * max(n_cols, 1)))


def knn_radii(features: torch.Tensor, k: int, block_bytes: int = BLOCK_BYTES) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row, computed a block of rows at a time.

    :param features: [N, D] float64 features (on any device).
    :param k: neighbourhood size (the row itself is excluded: it is its own nearest neighbour).
    :param block_bytes: memory for one [B, N] distance block.
    :return: [N] radii on the features' device.
    """
    step = _rows_per_block(features.shape[0], block_bytes)
    return torch.cat([torch.cdist(features[i:i + step], features).kthvalue(k + 1, dim=1).values
                      for i in range(0, features.shape[0], step)])


def inside_any_ball(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor,
                    block_bytes: int = BLOCK_BYTES) -> torch.Tensor:
    """Whether each point lies within some centre's radius (‖p − c_j‖ ≤ r_j), a block of points at a time.

    :param points: [M, D]. :param centres: [N, D]. :param radii: [N]. :return: [M] bool.
    """
    step = _rows_per_block(centres.shape[0], block_bytes)
    return torch.cat([(torch.cdist(points[i:i + step], centres) <= radii[None, :]).any(dim=1)
                      for i in range(0, points.shape[0], step)])


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, device: torch.device | str | None = None,
                     block_bytes: int = BLOCK_BYTES) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds.

    Precision: fraction of fake samples inside some real sample's k-NN ball; recall: fraction of real samples
    inside some fake sample's ball. Distances are float64 and computed in blocks (memory linear in N), on
    ``device`` (default: the features' own device; pass "cuda" to use a GPU).

    :param real, fake: [N_real, D] and [N_fake, D] features.
    :param k: neighbourhood size (3 in the paper and torch-fidelity).
    :return: (precision, recall).
    """
    device = torch.device(device) if device is not None else real.device
    x = real.detach().to(device=device, dtype=torch.float64)
    y = fake.detach().to(device=device, dtype=torch.float64)
    if min(x.shape[0], y.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
    real_radii, fake_radii = knn_radii(x, k, block_bytes), knn_radii(y, k, block_bytes)
    precision = inside_any_ball(y, x, real_radii, block_bytes).double().mean()
    recall = inside_any_ball(x, y, fake_radii, block_bytes).double().mean()
    return float(precision), float(recall)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of [N, C, H, W] images in [-1, 1] (peak-to-peak 2). :return: [N]."""
    mse = (a.float() - b.float()).square().flatten(1).mean(dim=1).clamp(min=1e-10)
    return 10 * torch.log10(4.0 / mse)


def clip_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> float:
    """CLIP score: mean of 100·max(cos(image, text), 0) over matching rows (Hessel et al. 2021)."""
    cos = torch.nn.functional.cosine_similarity(image_embeds.double(), text_embeds.double(), dim=-1)
    return float((100 * cos.clamp(min=0)).mean())
