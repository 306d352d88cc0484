"""Likelihood maths for the variational bound (improved-diffusion losses.py, Ho et al. 2020 §3.3)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .enums import ModelMeanType


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all non-batch dimensions: [N x ...] -> [N]."""
    return x.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats; arguments broadcast.

    :return: tensor of the broadcast shape.
    """
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Fast tanh approximation of the standard normal CDF (used by improved-diffusion; max error ~1e-4)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(
    x: Tensor, *, means: Tensor, log_scales: Tensor, bin_width: float = 2.0 / 255.0
) -> Tensor:
    """Log-likelihood of data quantised into bins under a Gaussian (Ho et al. 2020 eq. 13, the L_0 term).

    Data in [-1, 1] sits on bin centres spaced ``bin_width`` apart (2/255 for 8-bit images); the outermost bins
    extend to ±∞ so the probabilities sum to one.

    :param x: [N x ...] quantised targets in [-1, 1].
    :param means: [N x ...] Gaussian means.
    :param log_scales: [N x ...] log standard deviations.
    :param bin_width: distance between adjacent data values.
    :return: [N x ...] log-probabilities in nats.
    """
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + bin_width / 2))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - bin_width / 2))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(
        x < -1.0 + bin_width / 2,
        log_cdf_plus,
        torch.where(x > 1.0 - bin_width / 2, log_one_minus_cdf_min, torch.log((cdf_plus - cdf_min).clamp(min=1e-12))),
    )
    return log_probs


def min_snr_weight(snr: Tensor, gamma: float, mean_type: ModelMeanType) -> Tensor:
    """Min-SNR-γ loss weight (Hang et al. 2023 eq. 10) for the MSE on the predicted quantity.

    Every choice equals min(SNR, γ)·‖x₀ − x̂₀‖² for the same x̂₀, since ‖ε − ε̂‖² = SNR·‖x₀ − x̂₀‖² and
    ‖v − v̂‖² = (SNR + 1)·‖x₀ − x̂₀‖².

    :param snr: [N] signal-to-noise ratios ᾱ/(1 − ᾱ) of the examples' steps.
    :param gamma: γ (5 in the paper).
    :param mean_type: what the network predicts.
    :return: [N] weights: min(SNR, γ)/SNR for ε, min(SNR, γ) for x₀, min(SNR, γ)/(SNR + 1) for v.
    """
    clipped = snr.clamp(max=gamma)
    if mean_type == ModelMeanType.EPSILON:
        return clipped / snr
    if mean_type == ModelMeanType.START_X:
        return clipped
    return clipped / (snr + 1)
