"""VLB maths, training terms and min-SNR weighting."""

import math

import numpy as np
import pytest
import torch

from unclip.diffusion import create_diffusion
from unclip.diffusion.losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl


def test_normal_kl_closed_form():
    m1, lv1, m2, lv2 = (torch.tensor(v, dtype=torch.float64) for v in (0.3, math.log(0.5), -0.2, math.log(2.0)))
    want = math.log(math.sqrt(2.0) / math.sqrt(0.5)) + (0.5 + 0.5**2) / (2 * 2.0) - 0.5
    assert normal_kl(m1, lv1, m2, lv2).item() == pytest.approx(want, rel=1e-12)
    assert normal_kl(m1, lv1, m1, lv1).item() == 0.0
    g = torch.Generator().manual_seed(0)
    assert (normal_kl(*(torch.randn(4, 100, generator=g) for _ in range(4))) >= -1e-6).all()


def test_discretized_likelihood_is_a_distribution_over_bins():
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)  # the 8-bit pixel values in [-1, 1]
    for mean, log_scale in ((0.1, math.log(0.3)), (-0.97, math.log(0.05)), (0.0, math.log(1e-4))):
        lp = discretized_gaussian_log_likelihood(
            bins, means=torch.full_like(bins, mean), log_scales=torch.full_like(bins, log_scale)
        )
        assert lp.exp().sum().item() == pytest.approx(1.0, abs=2e-4)  # tanh CDF approximation error
    # a sharp Gaussian on a bin centre puts all its mass there
    lp = discretized_gaussian_log_likelihood(bins[100:101], means=bins[100:101], log_scales=torch.tensor([-10.0]))
    assert lp.item() == pytest.approx(0.0, abs=1e-6)
    assert mean_flat(torch.ones(3, 2, 4)).tolist() == [1.0, 1.0, 1.0]


def _oracle(process, x0, noise):
    """A model that knows (x₀, ε) and returns the exact training target: the MSE must be 0."""

    def model(xt, t_orig):
        t = torch.as_tensor(np.searchsorted(process.timestep_map, t_orig.numpy()))
        target = {"eps": noise, "x0": x0, "v": process.get_v(x0, noise, t)}[process.mean_type.value]
        if process.var_type.value == "learned_range":
            return torch.cat([target, -torch.ones_like(target)], dim=1)  # v = -1: the true posterior β̃
        return target

    return model


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
@pytest.mark.parametrize("loss_type", ["mse", "hybrid", "kl"])
def test_training_terms_and_oracle(mean_type, loss_type):
    var = "fixed_small" if loss_type == "mse" else "learned_range"
    proc = create_diffusion(mean_type=mean_type, var_type=var, loss_type=loss_type)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64).clamp(-1, 1)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 2, 100, 500, 900, 999])
    terms = proc.training_losses(_oracle(proc, x0, noise), x0, t, noise=noise)
    expected_keys = {"mse": {"loss", "mse"}, "hybrid": {"loss", "mse", "vlb"}, "kl": {"loss", "vlb"}}[loss_type]
    assert set(terms) == expected_keys and all(v.shape == (6,) for v in terms.values())
    if "mse" in terms:
        assert terms["mse"].abs().max() < 1e-18
    if "vlb" in terms:  # exact posterior mean and variance: KL(q || p) = 0 for t > 0
        assert terms["vlb"].abs().max() < 1e-9
    if loss_type == "hybrid":
        torch.testing.assert_close(terms["loss"], terms["mse"] + 0.001 * 1000 * terms["vlb"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hybrid_loss_is_finite_at_both_ends(dtype):
    proc = create_diffusion(var_type="learned_range", loss_type="hybrid")
    g = torch.Generator().manual_seed(1)
    x0 = (torch.randint(0, 256, (4, 3, 8, 8), generator=g) / 127.5 - 1).to(dtype)  # quantised images
    net = torch.nn.Conv2d(3, 6, 3, padding=1).to(dtype)
    model = lambda x, t: net(x)  # noqa: E731
    for step in (0, proc.num_timesteps - 1):
        t = torch.full((4,), step)
        terms = proc.training_losses(model, x0, t, generator=g)
        assert all(torch.isfinite(v).all() for v in terms.values()), (step, terms)
        assert terms["vlb"].dtype == dtype and (terms["vlb"] > 0).all()
        terms["loss"].mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in net.parameters())
        net.zero_grad()


def test_vlb_is_computed_in_float32_for_half_outputs():
    proc = create_diffusion(var_type="learned_range", loss_type="hybrid")
    x0 = torch.zeros(2, 3, 4, 4)
    model = lambda x, t: torch.zeros(2, 6, 4, 4, dtype=torch.bfloat16)  # noqa: E731
    terms = proc.training_losses(model, x0, torch.tensor([0, 999]))
    assert terms["vlb"].dtype == torch.float32 and torch.isfinite(terms["loss"]).all()


def test_hybrid_vlb_trains_only_the_variance():
    proc = create_diffusion(var_type="learned_range", loss_type="hybrid")
    x0 = torch.rand(3, 2, 4, 4) * 2 - 1
    out = torch.randn(3, 4, 4, 4, requires_grad=True)
    terms = proc.training_losses(lambda x, t: out, x0, torch.tensor([0, 300, 800]))
    (grad_vlb,) = torch.autograd.grad(terms["vlb"].sum(), out, retain_graph=True)
    (grad_mse,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert grad_vlb[:, :2].abs().max() == 0 and grad_vlb[:, 2:].abs().max() > 0  # stop-gradient on the mean
    assert grad_mse[:, 2:].abs().max() == 0 and grad_mse[:, :2].abs().max() > 0


def test_min_snr_weights_per_parameterisation():
    gamma, t = 5.0, torch.arange(0, 1000, 37)
    snr = torch.as_tensor(create_diffusion().snr[t.numpy()])
    want = {"eps": snr.clamp(max=gamma) / snr, "x0": snr.clamp(max=gamma), "v": snr.clamp(max=gamma) / (snr + 1)}
    for mean_type, w in want.items():
        proc = create_diffusion(mean_type=mean_type, snr_gamma=gamma)
        torch.testing.assert_close(proc.loss_weight(t, snr), w)
    assert (create_diffusion().loss_weight(t, snr) == 1).all()


def test_min_snr_losses_agree_across_parameterisations():
    # The same x̂₀ error must cost min(SNR, γ)·‖x₀ − x̂₀‖² whichever quantity the network predicts.
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 3, dtype=torch.float64)
    noise = torch.randn(8, 3, generator=g, dtype=torch.float64)
    err = 0.1 * torch.randn(8, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 5, 50, 200, 400, 600, 800, 990])
    losses = {}
    for mean_type in ("eps", "x0", "v"):
        proc = create_diffusion(mean_type=mean_type, snr_gamma=5.0)
        xt = proc.q_sample(x0, t, noise)
        x0_hat = x0 + err
        pred = {"eps": proc.predict_eps_from_x0(xt, t, x0_hat), "x0": x0_hat,
                "v": proc.get_v(x0_hat, proc.predict_eps_from_x0(xt, t, x0_hat), t)}[mean_type]  # fmt: skip
        losses[mean_type] = proc.training_losses(lambda x, tt, pred=pred: pred, x0, t, noise=noise)["loss"]
    snr = torch.as_tensor(create_diffusion().snr[t.numpy()])
    torch.testing.assert_close(losses["x0"], snr.clamp(max=5.0) * (err**2).mean(1))
    torch.testing.assert_close(losses["eps"], losses["x0"])
    torch.testing.assert_close(losses["v"], losses["x0"])


def _phi(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))


@pytest.mark.parametrize("respacing", [None, 250])
def test_hybrid_loss_weights_a_nonzero_vlb_by_lambda_times_T(respacing):
    """mse and the KL term both clearly non-zero and computed here from the schedule alone, so a wrong λ·T
    factor (or a vlb that is not the posterior KL) fails: improved-diffusion's RESCALED_MSE is mse + vb·T/1000."""
    proc = create_diffusion(var_type="learned_range", loss_type="hybrid", timestep_respacing=respacing)
    T = proc.num_timesteps
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64).clamp(-1, 1)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    delta = 0.2 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    v = 0.3
    t = torch.tensor([1, T // 4, T // 2, 3 * T // 4, T - 1])
    model = lambda x, tt: torch.cat([noise + delta, torch.full_like(x, v)], 1)  # noqa: E731
    terms = proc.training_losses(model, x0, t, noise=noise)

    ac = proc.alphas_cumprod[t.numpy()].reshape(-1, 1, 1, 1)
    acp = proc.alphas_cumprod_prev[t.numpy()].reshape(-1, 1, 1, 1)
    beta = proc.betas[t.numpy()].reshape(-1, 1, 1, 1)
    x0n, en, dn = x0.numpy(), noise.numpy(), delta.numpy()
    xt = np.sqrt(ac) * x0n + np.sqrt(1 - ac) * en
    x0_hat = (xt - np.sqrt(1 - ac) * (en + dn)) / np.sqrt(ac)
    c1, c2 = beta * np.sqrt(acp) / (1 - ac), (1 - acp) * np.sqrt(1 - beta) / (1 - ac)
    true_mean, model_mean = c1 * x0n + c2 * xt, c1 * x0_hat + c2 * xt
    post_var = beta * (1 - acp) / (1 - ac)
    frac = (v + 1) / 2  # Nichol & Dhariwal eq. 15
    log_var = frac * np.log(beta) + (1 - frac) * np.log(post_var)
    kl = 0.5 * (log_var - np.log(post_var) + post_var / np.exp(log_var)
                + (true_mean - model_mean) ** 2 / np.exp(log_var) - 1)
    vlb = kl.mean(axis=(1, 2, 3)) / math.log(2)
    mse = (dn**2).mean(axis=(1, 2, 3))
    assert mse.min() > 0.01 and vlb.min() > 1e-4  # a wrong factor moves the loss far beyond rtol
    np.testing.assert_allclose(terms["mse"].numpy(), mse, rtol=1e-10)
    np.testing.assert_allclose(terms["vlb"].numpy(), vlb, rtol=1e-8)
    np.testing.assert_allclose(terms["loss"].numpy(), mse + vlb * T / 1000.0, rtol=1e-10)


def test_vlb_at_t0_is_the_discretised_gaussian_nll():
    """L_0 = −log p(x₀ | x₁) with 8-bit bins (edge bins open), against an exact-CDF computation here."""
    proc = create_diffusion(var_type="learned_range", loss_type="hybrid")
    g = torch.Generator().manual_seed(4)
    x0 = (torch.randint(0, 256, (4, 3, 4, 4), generator=g) / 127.5 - 1).double()
    x0[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])  # both edge bins
    v = -0.2
    # At t = 0 the posterior mean is x̂₀ (coef1 = 1, coef2 = 0); log σ² interpolates log β̃_1 and log β_0.
    frac = (v + 1) / 2
    sigma = math.exp(0.5 * (frac * math.log(proc.betas[0]) + (1 - frac) * math.log(proc.posterior_variance[1])))
    # x̂₀ within ~1σ of the data: the tanh CDF approximation is poor in the far tails (|z| > 3).
    x0_hat = (x0 + sigma * torch.tanh(torch.randn(x0.shape, generator=g, dtype=torch.float64))).clamp(-1, 1)
    x_t = proc.q_sample(x0, torch.zeros(4, dtype=torch.long), generator=g)
    eps_hat = proc.predict_eps_from_x0(x_t, torch.zeros(4, dtype=torch.long), x0_hat)
    out = torch.cat([eps_hat, torch.full_like(x0, v)], 1)
    nll = proc.vb_terms_bpd(out, x0, x_t, torch.zeros(4, dtype=torch.long))

    x, mu, half = x0.numpy(), x0_hat.numpy(), 1 / 255
    upper = np.where(x > 1 - half, 1.0, _phi((x + half - mu) / sigma))
    lower = np.where(x < -1 + half, 0.0, _phi((x - half - mu) / sigma))
    want = -np.log(upper - lower).mean(axis=(1, 2, 3)) / math.log(2)
    assert want.min() > 0.05
    np.testing.assert_allclose(nll.numpy(), want, rtol=2e-3)  # the tanh CDF approximation (~1e-4 absolute)
