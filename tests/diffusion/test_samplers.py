"""Every sampler, fed the exact posterior-mean denoiser of a known distribution, must reproduce that distribution.

Data: x₀ ~ N(μ, σ²I) in 3-D and a 2-component mixture in 2-D, 20k float64 samples, cosine schedule, 1000 steps.
Unless a test is about the N(0, I) start, x_T is drawn from the exact marginal q(x_T) at the chain's first
position so that only the sampler is under test (a "ddim50" chain starts at step 980, where √ᾱ ≈ 0.03).
Tolerances: means within 0.03σ (≈4 standard errors); stds within 2 % unless the sampler's own discretisation
error is larger, in which case that error is also predicted in closed form and checked tightly.
"""

import math

import numpy as np
import pytest
import torch
from closed_form import GaussianData, MixtureData, exact_learned_range_model, exact_model, gaussian_data_marginal

from unclip.diffusion import (
    GaussianDiffusion,
    ModelMeanType,
    ModelVarType,
    create_diffusion,
    ddim_invert,
    get_sampler,
    karras_timesteps,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_heun,
)
from unclip.diffusion.samplers import sampler_eta

N = 20000
EPS = ModelMeanType.EPSILON
GAUSS = GaussianData([0.5, -1.0, 0.0], 0.5)
MIX = MixtureData([0.3, 0.7], [[-1.0, -1.0], [1.0, 0.5]], [0.3, 0.5])


@pytest.fixture(scope="module")
def train():
    return create_diffusion(noise_schedule="cosine")


def _start(data, chain, seed=1):
    g = torch.Generator().manual_seed(seed)
    return gaussian_data_marginal(data, chain, N, g), g


def _with_var(chain: GaussianDiffusion, var_type: ModelVarType) -> GaussianDiffusion:
    return GaussianDiffusion(betas=chain.betas, mean_type=chain.mean_type, var_type=var_type,
                             loss_type=chain.loss_type, timestep_map=chain.timestep_map)  # fmt: skip


def gaussian_errors(x):
    """(max |mean − μ| / σ over dims, pooled std / σ − 1)."""
    mean_err = ((x.mean(0) - GAUSS.mu).abs().max() / GAUSS.sigma).item()
    return mean_err, (x.std(0).mean() / GAUSS.sigma - 1).item()


def assert_gaussian(x, std_tol=0.02, mean_tol=0.03):
    mean_err, std_err = gaussian_errors(x)
    assert mean_err < mean_tol, f"mean off by {mean_err:.4f}σ"
    assert abs(std_err) < std_tol, f"std off by {std_err:+.2%}"


def mixture_stats(x):
    """Fraction in component 0 (Bayes classifier of the data), per-component mean and std."""
    d2 = ((x[:, None, :] - MIX.mus[None]) ** 2).sum(-1) / MIX.sigmas**2
    logp = MIX.weights.log() - 2 * MIX.sigmas.log() - 0.5 * d2
    k = logp.argmax(1)
    parts = [x[k == c] for c in range(2)]
    return (k == 0).double().mean().item(), [p.mean(0) for p in parts], [p.std(0).mean().item() for p in parts]


@pytest.fixture(scope="module")
def mixture_reference():
    return mixture_stats(MIX.sample(N, torch.Generator().manual_seed(123)))


def assert_mixture(x, reference, std_tol=0.05):
    frac, means, stds = mixture_stats(x)
    ref_frac, ref_means, ref_stds = reference
    assert abs(frac - ref_frac) < 0.015, f"component weight {frac:.3f} vs {ref_frac:.3f}"
    for c in range(2):
        assert (means[c] - ref_means[c]).abs().max() < 0.03, f"component {c} mean {means[c]} vs {ref_means[c]}"
        assert abs(stds[c] / ref_stds[c] - 1) < std_tol, f"component {c} std {stds[c]:.4f} vs {ref_stds[c]:.4f}"


# ------------------------------------------------------------------------------------------ ancestral


def test_ddpm_1000_from_standard_normal(train, mixture_reference):
    g = torch.Generator().manual_seed(0)
    assert_gaussian(sample_ddpm(exact_model(GAUSS, train, EPS), torch.randn(N, 3, generator=g, dtype=torch.float64),
                                train, generator=g))  # fmt: skip
    x_T = torch.randn(N, 2, generator=g, dtype=torch.float64)
    x = sample_ddpm(exact_model(MIX, train, EPS), x_T, train, generator=g)
    assert_mixture(x, mixture_reference, std_tol=0.03)


def test_ddpm_respaced_100_learned_variance_is_exact(train):
    lr = create_diffusion(var_type="learned_range", loss_type="hybrid")
    chain = lr.respace(100)
    model = exact_learned_range_model(GAUSS, lr, chain)
    x_t, g = _start(GAUSS, chain)
    out = model(x_t[:4], torch.as_tensor(chain.timestep_map[[99, 50, 1, 0]]))
    assert out[:, 3:].abs().max() <= 1  # the true reverse variance lies between β̃ and β
    x = sample_ddpm(model, x_t, chain, generator=g)
    assert_gaussian(x, std_tol=0.01)


def test_ddpm_respaced_100_fixed_variances(train, mixture_reference):
    chain = train.respace(100)
    x_t, g = _start(GAUSS, chain)
    assert_gaussian(sample_ddpm(exact_model(GAUSS, train, EPS), x_t, _with_var(chain, ModelVarType.FIXED_LARGE),
                                generator=g))  # fmt: skip
    # Power check: β̃ alone ignores Var[x₀|x_t] and under-disperses by ~3.5 % on this 100-step chain.
    _, std_err = gaussian_errors(sample_ddpm(exact_model(GAUSS, train, EPS), x_t, chain, generator=g))
    assert -0.05 < std_err < -0.025
    x_t, g = _start(MIX, chain)
    x = sample_ddpm(exact_model(MIX, train, EPS), x_t, _with_var(chain, ModelVarType.FIXED_LARGE), generator=g)
    assert_mixture(x, mixture_reference)


def test_ddim_eta1_is_ddpm_with_posterior_variance(train):
    chain = train.respace(50)
    x_t, _ = _start(GAUSS, chain)
    model = exact_model(GAUSS, train, EPS)
    a = sample_ddim(model, x_t, chain, eta=1.0, generator=torch.Generator().manual_seed(5))
    b = sample_ddpm(model, x_t, chain, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------- ODEs


def ddim_gain(chain, sigma):
    """Closed-form DDIM (η=0) gain for Gaussian data: x_out − μ = G (x_T − √ᾱ_T μ), independent of the code.

    Each step t → s maps z ↦ z (√ᾱ_s √ᾱ_t σ² + √(1−ᾱ_s) √(1−ᾱ_t)) / (ᾱ_t σ² + 1 − ᾱ_t).
    """
    abar = list(chain.alphas_cumprod[::-1]) + [1.0]
    gain = 1.0
    for t, s in zip(abar[:-1], abar[1:], strict=True):
        gain *= (math.sqrt(s * t) * sigma**2 + math.sqrt((1 - s) * (1 - t))) / (t * sigma**2 + 1 - t)
    return gain


@pytest.mark.parametrize("mean_type", list(ModelMeanType))
def test_ddim_50_gaussian_matches_closed_form(train, mean_type):
    chain = create_diffusion(mean_type=mean_type.value, timestep_respacing="ddim50")
    x_t, _ = _start(GAUSS, chain)
    x = sample_ddim(exact_model(GAUSS, train, mean_type), x_t, chain)
    a_T = math.sqrt(chain.alphas_cumprod[-1])
    torch.testing.assert_close(x, GAUSS.mu + ddim_gain(chain, GAUSS.sigma) * (x_t - a_T * GAUSS.mu), rtol=0, atol=1e-9)
    assert_gaussian(x, std_tol=0.05)  # DDIM's first-order error here is -3 %


def test_ddim_50_mixture(train, mixture_reference):
    chain = train.respace("ddim50")
    x_t, _ = _start(MIX, chain)
    assert_mixture(sample_ddim(exact_model(MIX, train, EPS), x_t, chain), mixture_reference)


def test_dpmpp_2m_20(train, mixture_reference):
    chain = train.respace(20)
    x_t, _ = _start(GAUSS, chain)
    assert_gaussian(sample_dpmpp_2m(exact_model(GAUSS, train, EPS), x_t, chain))
    # without lower_order_final, the large last λ-gap of the cosine chain overshoots the spread (+10 %)
    _, std_err = gaussian_errors(sample_dpmpp_2m(exact_model(GAUSS, train, EPS), x_t, chain, lower_order_final=False))
    assert std_err > 0.05
    x_t, _ = _start(MIX, chain)
    assert_mixture(sample_dpmpp_2m(exact_model(MIX, train, EPS), x_t, chain), mixture_reference)


def heun_gain(chain, sigma_data):
    """Closed-form gain of Heun (Karras Alg. 1) for Gaussian data, where dy/dσ = σ y/(σ_d² + σ²), y = x̃ − μ."""
    ac = chain.alphas_cumprod[::-1]
    sig = list(np.sqrt((1 - ac) / ac)) + [0.0]
    f = lambda s: s / (sigma_data**2 + s**2)  # noqa: E731
    gain = 1.0
    for a, b in zip(sig[:-1], sig[1:], strict=True):
        euler = 1 + (b - a) * f(a)
        gain *= euler if b == 0 else 1 + (b - a) * (f(a) + f(b) * euler) / 2
    return gain / math.sqrt(ac[0])  # x̃_T − μ = (x_T − √ᾱ_T μ) / √ᾱ_T


def test_heun_karras_30(train, mixture_reference):
    chain = train.respace(karras_timesteps(train.alphas_cumprod, 30))
    x_t, _ = _start(GAUSS, chain)
    x = sample_heun(exact_model(GAUSS, train, EPS), x_t, chain)
    a_T = math.sqrt(chain.alphas_cumprod[-1])
    torch.testing.assert_close(x, GAUSS.mu + heun_gain(chain, GAUSS.sigma) * (x_t - a_T * GAUSS.mu), rtol=0, atol=1e-9)
    assert_gaussian(x, std_tol=0.03)  # Heun's own error on this grid is +1.6 %
    x_t, _ = _start(MIX, chain)
    assert_mixture(sample_heun(exact_model(MIX, train, EPS), x_t, chain), mixture_reference)


def test_wrong_timesteps_fail_the_checks(train):
    """The checks above have power: misreading t by one chain position, or not mapping respaced indices back to
    the training chain, moves the samples well outside the tolerances."""
    chain = train.respace("ddim50")
    x_t, _ = _start(GAUSS, chain)
    mean_err, _ = gaussian_errors(sample_ddim(exact_model(GAUSS, train, EPS, t_shift=20), x_t, chain))
    assert mean_err > 0.1
    unmapped = GaussianDiffusion(betas=chain.betas, mean_type=EPS, var_type=chain.var_type, loss_type=chain.loss_type)
    mean_err, std_err = gaussian_errors(sample_ddim(exact_model(GAUSS, train, EPS), x_t, unmapped))
    assert mean_err > 1 or abs(std_err) > 1


# ------------------------------------------------------------------------------------------ inversion


@pytest.mark.parametrize("data", [GAUSS, MIX], ids=["gaussian", "mixture"])
def test_ddim_inversion_round_trip(train, data):
    chain = train.respace(50)
    model = exact_model(data, train, EPS)
    x0 = data.sample(2000, torch.Generator().manual_seed(7))
    x_T = ddim_invert(model, x0, chain, fixed_point_iters=5)
    assert (sample_ddim(model, x_T, chain) - x0).abs().max() < 1e-3
    assert abs(x_T.std().item() - 1) < 0.1  # latents look like noise
    # the plain (0-iteration) inversion has the usual O(step) mismatch; iterations remove it
    errs = [(sample_ddim(model, ddim_invert(model, x0, chain, fixed_point_iters=k), chain) - x0).abs().max()
            for k in (0, 1, 2)]  # fmt: skip
    assert errs[0] > errs[1] > errs[2]


# ------------------------------------------------------------------------------ determinism & plumbing


def test_deterministic_under_generator(train):
    chain = train.respace(25)
    model = exact_model(GAUSS, train, EPS)
    runs = [sample(model, (64, 3), chain, "ddpm", generator=torch.Generator().manual_seed(s), dtype=torch.float64)
            for s in (3, 3, 4)]  # fmt: skip
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    for name, kw in (("ddim", {"eta": 0.5}), ("dpmpp_2m", {}), ("heun", {})):
        a, b = (sample(model, (8, 3), chain, name, generator=torch.Generator().manual_seed(0), dtype=torch.float64,
                       **kw) for _ in range(2))  # fmt: skip
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="dpmpp_2m"):
        sample(model, (8, 3), chain, "plms")


@pytest.mark.parametrize("fn", [sample_ddpm, sample_ddim, sample_dpmpp_2m, sample_heun, ddim_invert])
def test_callback_and_progress(train, fn):
    chain = train.respace("ddim10")
    model = exact_model(GAUSS, train, EPS)
    seen = []
    out = fn(model, torch.zeros(4, 3, dtype=torch.float64), chain, None, seen.append, True)
    assert [d["i"] for d in seen] == list(range(10))
    order = list(range(10)) if fn is ddim_invert else list(range(9, -1, -1))
    assert [d["t"] for d in seen] == order and [d["timestep"] for d in seen] == [100 * i for i in order]
    assert torch.equal(seen[-1]["x"], out) and seen[-1]["pred_x0"].shape == (4, 3)


def test_image_shaped_batches_and_thresholding(train):
    chain = create_diffusion(var_type="learned_range", loss_type="hybrid", timestep_respacing=10)
    model = lambda x, t: torch.cat([3 * torch.ones_like(x), torch.zeros_like(x)], 1)  # noqa: E731
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x0_model = lambda x, t: 3 * torch.ones_like(x)  # noqa: E731  (x̂₀ far out of range: only clipping saves it)
    proc = create_diffusion(mean_type="x0", timestep_respacing=10)
    for fn in (sample_ddpm, sample_ddim, sample_dpmpp_2m, sample_heun):
        assert torch.allclose(fn(x0_model, x, proc, clip_denoised=True), torch.ones_like(x))
        assert torch.allclose(fn(x0_model, x, proc, dynamic_threshold=0.99), torch.ones_like(x))
    out = sample_ddpm(model, x, chain, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp_2m", "heun"])
def test_bf16_x0_network_does_not_leak_bf16_into_the_state(name):
    # The prior predicts x₀; under bf16 autocast its raw output is bf16 and must not become the sampler state.
    proc = create_diffusion(mean_type="x0").respace(5)
    seen = []
    net = lambda x, t: (0.5 * x).to(torch.bfloat16)  # noqa: E731
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    out = get_sampler(name)(net, x, proc, callback=lambda d: seen.append((d["x"].dtype, d["pred_x0"].dtype)),
                            generator=torch.Generator().manual_seed(1))
    assert out.dtype == torch.float32 and set(seen) == {(torch.float32, torch.float32)}


@pytest.mark.parametrize("name", ["ddpm", "dpmpp_2m", "heun"])
def test_samplers_without_eta_refuse_one(name):
    # One keyword signature for all samplers; an η they cannot honour is an error, not silently dropped.
    proc = create_diffusion().respace(3)
    with pytest.raises(ValueError, match=f"sampler '{name}' takes no eta"):
        get_sampler(name)(lambda x, t: x, torch.randn(2, 3), proc, eta=0.5)
    assert sampler_eta(name, 0.0) is None and sampler_eta(name, None) is None and sampler_eta(name, 1.0) == 1.0
    assert sampler_eta("ddim", 0.0) == 0.0
