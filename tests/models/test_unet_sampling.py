"""Sampling the decoder cascade: step spacings, and the recommended few-step solver against DDIM-50 on an ODE whose
denoiser is exact (a Gaussian with an image-like power-law spectrum)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unclip.decoder_sampling import output_size, run_sampler, sampling_process
from unclip.diffusion import create_diffusion, logsnr_timesteps, sample_ddim
from unclip.stages import UpsamplerInfo

DIFFUSION = dict(steps=1000, noise_schedule="cosine", mean_type="eps", var_type="fixed_small", loss_type="mse",
                 snr_gamma=None, vlb_weight=0.001)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("n", [5, 15, 20, 27, 50])
def test_logsnr_spacing_gives_n_distinct_steps_from_first_to_last(schedule, n):
    ac = create_diffusion(noise_schedule=schedule).alphas_cumprod
    steps = logsnr_timesteps(ac, n)
    assert len(steps) == n and steps[0] == 0 and steps[-1] == 999 and steps == sorted(set(steps))
    lam = 0.5 * np.log(ac[steps] / (1 - ac[steps]))
    gaps = -np.diff(lam)
    uniform = (lam[0] - lam[-1]) / (n - 1)
    assert gaps.min() > 0 and 0.5 < np.median(gaps) / uniform < 1.5  # even in log-SNR, but for the discrete ends


def test_sampling_process_spacings_and_errors():
    assert sampling_process(DIFFUSION, 27, "strided").num_timesteps == 27
    assert sampling_process(DIFFUSION, "ddim25", "strided").timestep_map.tolist()[:2] == [0, 40]
    assert sampling_process(DIFFUSION, 20, "logsnr").num_timesteps == 20
    assert sampling_process(DIFFUSION, 10, "karras").num_timesteps <= 10
    with pytest.raises(ValueError, match="unknown sampling spacing 'even'; valid: strided, logsnr, karras"):
        sampling_process(DIFFUSION, 10, "even")
    upsampler = UpsamplerInfo(model={"image_size": 256}, diffusion=DIFFUSION, sampling={}, input_size=64)
    assert output_size(upsampler, 80, 48) == (320, 192)


def gaussian_denoiser(dim: int, alphas_cumprod: np.ndarray, seed: int = 0):
    """Exact ε-prediction for x₀ ~ N(0, Q diag(λ) Qᵀ) with λ_k ∝ k^-2 (natural images' spectrum) plus a floor."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    lam = 0.5 * torch.arange(1, dim + 1, dtype=torch.float64) ** -2.0 + 1e-4
    abar_all = torch.as_tensor(alphas_cumprod)

    def model(x: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
        abar = abar_all[t].view(-1, 1)
        coef = abar.sqrt() * lam / (abar * lam + 1 - abar)  # posterior mean per eigen-direction
        x0 = ((x.flatten(1) @ q) * coef) @ q.T
        return ((x.flatten(1) - abar.sqrt() * x0) / (1 - abar).sqrt()).view_as(x)

    return model


def test_dpmpp_20_logsnr_solves_the_ode_better_than_ddim_50_strided():
    base = create_diffusion(**DIFFUSION)
    model = gaussian_denoiser(192, base.alphas_cumprod)
    x_t = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference = sample_ddim(model, x_t, base.respace(1000))

    def error(sampler: str, steps: int, spacing: str) -> float:
        out = run_sampler(model, x_t, sampling_process(DIFFUSION, steps, spacing), sampler, {}, eta=0.0,
                          generator=None, clip_denoised=False, progress=False)
        return math.sqrt(float((out - reference).square().mean()))

    ours, ddim50 = error("dpmpp_2m", 20, "logsnr"), error("ddim", 50, "strided")
    assert ours < ddim50, (ours, ddim50)
    assert error("dpmpp_2m", 20, "logsnr") < error("dpmpp_2m", 20, "strided")


@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp_2m", "heun"])
def test_run_sampler_refuses_an_eta_the_sampler_cannot_honour(sampler):
    # A stage config's eta = 0 (no DDIM noise) passes; a non-zero eta with a non-DDIM sampler was silently dropped.
    process = sampling_process(DIFFUSION, 3, "strided")
    x = torch.randn(1, 3, 4, 4)
    kwargs = dict(generator=None, clip_denoised=False, progress=False)
    assert run_sampler(lambda x, t: x * 0, x, process, sampler, {}, eta=0.0, **kwargs).shape == x.shape
    with pytest.raises(ValueError, match=f"sampler '{sampler}' takes no eta"):
        run_sampler(lambda x, t: x * 0, x, process, sampler, {}, eta=0.5, **kwargs)
