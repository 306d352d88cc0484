"""Data distributions whose exact posterior-mean denoiser E[x₀ | x_t] is known in closed form.

Tests plug these "models" into the samplers: with the exact denoiser every sampler must reproduce the data.
All maths is float64. Models are called like real networks, ``model(x_t, t_original)``, and look up ᾱ on the
ORIGINAL (training) chain, so they also check that respaced chains feed the right timesteps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from unclip.diffusion import GaussianDiffusion, ModelMeanType


class GaussianData:
    """x₀ ~ N(μ, σ² I) in D dims."""

    def __init__(self, mu: list[float], sigma: float) -> None:
        self.mu = torch.tensor(mu, dtype=torch.float64)
        self.sigma = sigma

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        return self.mu + self.sigma * torch.randn(n, len(self.mu), generator=generator, dtype=torch.float64)

    def posterior_mean(self, x_t: Tensor, abar: Tensor) -> Tensor:
        # E[x₀|x_t] = μ + √ᾱ σ²/(ᾱσ² + 1 − ᾱ) (x_t − √ᾱ μ)
        a = abar.sqrt()
        return self.mu + a * self.sigma**2 / (abar * self.sigma**2 + 1 - abar) * (x_t - a * self.mu)

    def posterior_var(self, abar: Tensor) -> Tensor:
        # Var[x₀|x_t] = σ²(1 − ᾱ)/(ᾱσ² + 1 − ᾱ)
        return self.sigma**2 * (1 - abar) / (abar * self.sigma**2 + 1 - abar)


class MixtureData:
    """x₀ ~ Σ_k π_k N(μ_k, σ_k² I)."""

    def __init__(self, weights: list[float], mus: list[list[float]], sigmas: list[float]) -> None:
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.mus = torch.tensor(mus, dtype=torch.float64)  # [K, D]
        self.sigmas = torch.tensor(sigmas, dtype=torch.float64)  # [K]

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.mus.shape[1], generator=generator, dtype=torch.float64)
        return self.mus[k] + self.sigmas[k, None] * noise

    def posterior_mean(self, x_t: Tensor, abar: Tensor) -> Tensor:
        # Responsibilities r_k ∝ π_k N(x_t; √ᾱ μ_k, (ᾱσ_k² + 1 − ᾱ) I), times per-component posterior means.
        a = abar.sqrt()[:, None]  # [N, 1, 1]
        var = abar[:, None] * self.sigmas[None, :, None] ** 2 + 1 - abar[:, None]  # [N, K, 1]
        diff = x_t[:, None, :] - a * self.mus[None]  # [N, K, D]
        d = x_t.shape[1]
        logp = self.weights.log() - 0.5 * d * var[..., 0].log() - 0.5 * (diff**2).sum(-1) / var[..., 0]
        # Softmax by hand, with negligible responsibilities set to exactly 0: subnormal floats are ~100x slower.
        logp = logp - logp.max(dim=1, keepdim=True).values
        r = torch.where(logp > -600, logp.exp(), torch.zeros_like(logp))
        r = (r / r.sum(dim=1, keepdim=True))[..., None]  # [N, K, 1]
        means = self.mus[None] + a * self.sigmas[None, :, None] ** 2 / var * diff
        return (r * means).sum(1)


def exact_model(data, train: GaussianDiffusion, mean_type: ModelMeanType, t_shift: int = 0):
    """Raw-output model (eps, x0 or v) built on E[x₀|x_t]; ``t_shift`` deliberately misreads t (power checks)."""
    abar_all = torch.as_tensor(train.alphas_cumprod, dtype=torch.float64)

    def model(x: Tensor, t: Tensor) -> Tensor:
        tt = (t + t_shift).clamp(0, train.num_timesteps - 1)
        abar = abar_all[tt][:, None]
        x0 = data.posterior_mean(x, abar)
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        if mean_type == ModelMeanType.EPSILON:
            return eps
        if mean_type == ModelMeanType.START_X:
            return x0
        return abar.sqrt() * eps - (1 - abar).sqrt() * x0

    return model


def exact_learned_range_model(data: GaussianData, train: GaussianDiffusion, chain: GaussianDiffusion):
    """eps + variance-logit model for Gaussian data on ``chain``: the exact reverse variance of the chain's step,
    β̃_i + c1_i² Var[x₀|x_t], written as the learned-range interpolation v ∈ [-1, 1] between β̃ and β."""
    eps_model = exact_model(data, train, ModelMeanType.EPSILON)
    position = torch.full((train.num_timesteps,), -1, dtype=torch.long)
    position[torch.as_tensor(chain.timestep_map)] = torch.arange(chain.num_timesteps)
    abar_all = torch.as_tensor(train.alphas_cumprod, dtype=torch.float64)

    def model(x: Tensor, t: Tensor) -> Tensor:
        i = position[t]
        assert (i >= 0).all(), "model called at a step that is not on the chain"
        c1 = torch.as_tensor(chain.posterior_mean_coef1)[i]
        true_var = torch.as_tensor(chain.posterior_variance)[i] + c1**2 * data.posterior_var(abar_all[t])
        lo = torch.as_tensor(chain.posterior_log_variance_clipped)[i]
        hi = torch.as_tensor(chain.log_betas)[i]
        frac = torch.where(i > 0, (true_var.log() - lo) / (hi - lo), torch.zeros_like(lo))
        v = (2 * frac - 1)[:, None].expand_as(x)
        return torch.cat([eps_model(x, t), v], dim=1)

    return model


def gaussian_data_marginal(data, chain: GaussianDiffusion, n: int, generator: torch.Generator) -> Tensor:
    """x at the chain's first (noisiest) position drawn exactly: q_sample of fresh data."""
    x0 = data.sample(n, generator)
    t = torch.full((n,), chain.num_timesteps - 1, dtype=torch.long)
    return chain.q_sample(x0, t, generator=generator)


