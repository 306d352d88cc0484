"""The forward process, posteriors, parameterisations and p_mean_variance."""

import math

import numpy as np
import pytest
import torch
from closed_form import GaussianData, exact_model

from unclip.diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    create_diffusion,
    get_sampler,
    parse_enum,
    threshold_x0,
)


@pytest.fixture(scope="module")
def train():
    return create_diffusion()


def _t(values):
    return torch.as_tensor(values, dtype=torch.long)


@pytest.mark.parametrize("step", [0, 100, 500, 900, 999])
def test_q_sample_marginals_match_schedule(train, step):
    n, x0 = 20000, torch.tensor([0.7, -0.3], dtype=torch.float64)
    g = torch.Generator().manual_seed(step)
    xt = train.q_sample(x0.expand(n, 2), _t([step] * n), generator=g)
    a, s = math.sqrt(train.alphas_cumprod[step]), math.sqrt(1 - train.alphas_cumprod[step])
    se = s / math.sqrt(n)  # standard error of the sample mean
    assert torch.allclose(xt.mean(0), a * x0, atol=4 * se)
    assert torch.allclose(xt.std(0), torch.full((2,), s, dtype=torch.float64), rtol=0.02)
    mean, var, log_var = train.q_mean_variance(x0.expand(3, 2), _t([step] * 3))
    assert torch.allclose(mean, a * x0) and torch.allclose(var, torch.tensor(s**2, dtype=torch.float64))
    assert torch.allclose(log_var.exp(), var)


def test_q_sample_is_deterministic_under_generator(train):
    x0, t = torch.zeros(4, 3, 8, 8), _t([0, 10, 500, 999])
    a = train.q_sample(x0, t, generator=torch.Generator().manual_seed(3))
    b = train.q_sample(x0, t, generator=torch.Generator().manual_seed(3))
    assert a.shape == (4, 3, 8, 8) and a.dtype == torch.float32 and torch.equal(a, b)


@pytest.mark.parametrize("shape", [(1000, 4), (1000, 2, 3, 3)])
def test_parameterisation_conversions_are_mutual_inverses(train, shape):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.arange(1000)  # every step, including the nearly singular ends
    xt = train.q_sample(x0, t, eps)
    v = train.get_v(x0, eps, t)
    tol = dict(rtol=0, atol=1e-9)
    torch.testing.assert_close(train.predict_x0_from_eps(xt, t, eps), x0, **tol)
    torch.testing.assert_close(train.predict_eps_from_x0(xt, t, x0), eps, **tol)
    torch.testing.assert_close(train.predict_x0_from_v(xt, t, v), x0, **tol)
    torch.testing.assert_close(train.predict_eps_from_v(xt, t, v), eps, **tol)
    # v is a rotation of (ε, x₀): ‖v‖² + ‖x_t‖² = ‖ε‖² + ‖x₀‖² elementwise.
    torch.testing.assert_close(v**2 + xt**2, eps**2 + x0**2, **tol)


def test_posterior_matches_bayes_rule(train):
    # q(x_{t-1}|x_t,x_0) ∝ N(x_t; √α_t x_{t-1}, β_t) N(x_{t-1}; √ᾱ_{t-1} x_0, 1-ᾱ_{t-1}), computed independently.
    t = np.array([1, 10, 500, 998])
    ab, abp, beta = train.alphas_cumprod[t], train.alphas_cumprod[t - 1], train.betas[t]
    prec = 1 / (1 - abp) + (1 - beta) / beta
    x0, xt = torch.tensor([[0.3]] * 4, dtype=torch.float64), torch.tensor([[-1.2]] * 4, dtype=torch.float64)
    want_mean = (np.sqrt(abp) * 0.3 / (1 - abp) + np.sqrt(1 - beta) * -1.2 / beta) / prec
    mean, var, _ = train.q_posterior_mean_variance(x0, xt, _t(t))
    np.testing.assert_allclose(mean[:, 0].numpy(), want_mean, rtol=1e-8)
    np.testing.assert_allclose(var[:, 0].numpy(), 1 / prec, rtol=1e-8)
    assert ab[0] < abp[0]


def test_all_parameterisations_give_the_same_reverse_step(train):
    data = GaussianData([0.5, -1.0, 0.0], 0.5)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(64, 3, generator=g, dtype=torch.float64), torch.randint(0, 1000, (64,), generator=g)
    outs = []
    for mt in ModelMeanType:
        proc = create_diffusion(mean_type=mt.value)
        outs.append(proc.p_mean_variance(exact_model(data, train, mt), x, t))
    for other in outs[1:]:
        for key in ("mean", "variance", "pred_x0", "pred_eps"):
            torch.testing.assert_close(other[key], outs[0][key], rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("respacing", [None, 50])
def test_learned_range_endpoints(respacing):
    proc = create_diffusion(var_type="learned_range", loss_type="hybrid", timestep_respacing=respacing)
    T = proc.num_timesteps
    t, x = torch.arange(T), torch.zeros(T, 2, 4, 4, dtype=torch.float64)
    beta_tilde_clipped = np.append(proc.posterior_variance[1], proc.posterior_variance[1:])
    for v, want in ((-1.0, beta_tilde_clipped), (1.0, proc.betas), (0.0, np.sqrt(beta_tilde_clipped * proc.betas))):
        var, log_var = proc.p_variance(t, x, torch.full_like(x, v))
        np.testing.assert_allclose(var[:, 0, 0, 0].numpy(), want, rtol=1e-10)
        torch.testing.assert_close(log_var.exp(), var)
    assert (beta_tilde_clipped[1:] < proc.betas[1:]).all()


def test_fixed_variances(train):
    t, x = torch.arange(1000), torch.zeros(1000, 1, dtype=torch.float64)
    small, _ = train.p_variance(t, x, None)
    np.testing.assert_allclose(small[:, 0].numpy(), train.posterior_variance)
    large_proc = create_diffusion(var_type="fixed_large")
    large, log_large = large_proc.p_variance(t, x, None)
    np.testing.assert_allclose(large[1:, 0].numpy(), train.betas[1:])
    assert large[0, 0] == pytest.approx(train.posterior_variance[1]) and torch.isfinite(log_large).all()


def test_model_sees_original_timesteps_on_respaced_chain(train):
    seen = []
    short = train.respace("ddim50")

    def model(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    short.p_mean_variance(model, torch.zeros(3, 2), torch.tensor([0, 1, 49]))
    assert seen[0].tolist() == [0, 20, 980] and seen[0].dtype == torch.long


def test_clipping_and_dynamic_thresholding():
    x0 = torch.tensor([[3.0, -0.5, 0.2]])
    assert torch.equal(threshold_x0(x0, clip_denoised=True), torch.tensor([[1.0, -0.5, 0.2]]))
    assert torch.equal(threshold_x0(x0), x0)
    inside = torch.linspace(-0.9, 0.9, 50)[None]
    torch.testing.assert_close(threshold_x0(inside, dynamic_threshold=0.995), inside)  # s = max(1, q) = 1
    u = torch.linspace(-1, 1, 101)[None]
    torch.testing.assert_close(threshold_x0(2 * u, dynamic_threshold=1.0), u)  # s = 2: rescale, nothing clipped
    out = threshold_x0(torch.cat([2 * u, u]), dynamic_threshold=0.9)  # per example: only the first is rescaled
    assert out[0].abs().max() == 1 and torch.equal(out[1], u[0])
    # clipping in p_mean_variance keeps (x̂₀, ε̂) consistent with x_t
    proc = create_diffusion(mean_type="x0")
    x, t = torch.randn(2, 3, dtype=torch.float64), torch.tensor([10, 400])
    p = proc.p_mean_variance(lambda x, t: 5 * torch.ones_like(x), x, t, clip_denoised=True)
    assert torch.equal(p["pred_x0"], torch.ones_like(x))
    torch.testing.assert_close(proc.predict_x0_from_eps(x, t, p["pred_eps"]), p["pred_x0"])


def test_enum_parsing_and_incompatible_choices():
    assert parse_enum(ModelMeanType, "v") is ModelMeanType.VELOCITY
    with pytest.raises(ValueError, match=r"unknown ModelMeanType 'epsilon'; valid: \['eps', 'x0', 'v'\]"):
        create_diffusion(mean_type="epsilon")
    with pytest.raises(ValueError, match="fixed_small"):
        create_diffusion(var_type="small")
    with pytest.raises(ValueError, match="needs loss_type 'hybrid'"):
        create_diffusion(var_type="learned_range", loss_type="mse")
    with pytest.raises(ValueError, match="needs var_type 'learned_range'"):
        create_diffusion(var_type="fixed_large", loss_type="hybrid")
    with pytest.raises(TypeError, match="create_diffusion"):
        GaussianDiffusion(betas=np.full(10, 0.1), mean_type="eps", var_type=ModelVarType.FIXED_SMALL,
                          loss_type=LossType.MSE)  # fmt: skip
    create_diffusion(var_type="learned_range", loss_type="kl")  # the pure VLB trains both halves


@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large", "learned_range"])
def test_int_steps_match_tensor_steps(var_type):
    # Samplers pass one int per step (python-float coefficients); it must equal the per-example tensor path.
    loss = "hybrid" if var_type == "learned_range" else "mse"
    proc = create_diffusion(mean_type="v", var_type=var_type, loss_type=loss, timestep_respacing=50)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 2, 4, 4, generator=g, dtype=torch.float64)
    out = torch.randn(5, 4 if var_type == "learned_range" else 2, 4, 4, generator=g, dtype=torch.float64).tanh()
    model = lambda x, t: out  # noqa: E731
    for i in (0, 1, 25, 49):
        a = proc.p_mean_variance(model, x, i, clip_denoised=True)
        b = proc.p_mean_variance(model, x, torch.full((5,), i), clip_denoised=True)
        for key in ("mean", "pred_x0", "pred_eps", "variance", "log_variance"):
            torch.testing.assert_close(torch.as_tensor(a[key], dtype=torch.float64).expand_as(x), b[key])
        assert torch.equal(proc.model_timesteps(i, x), proc.model_timesteps(torch.full((5,), i), x))


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_offset_model_samples_the_offset_plus_what_the_model_samples_in_its_own_frame(mean_type, sampler):
    base = create_diffusion(mean_type=mean_type)
    chain = base.respace([6])
    g = torch.Generator().manual_seed(0)
    offset, noise = (torch.randn(2, 3, generator=g, dtype=torch.float64) for _ in range(2))

    def model(x_t, t, scale):  # any function of x_t and t, in the residual's frame
        return torch.tanh(scale * x_t) + 1e-3 * t[:, None]

    fn = get_sampler(sampler)
    own = fn(model, noise, chain, {"scale": 0.7}, generator=torch.Generator().manual_seed(1))
    start = noise + math.sqrt(chain.alphas_cumprod[-1]) * offset  # the residual frame's x_T, moved to the data's
    data = fn(base.offset_model(model, offset), start, chain, {"scale": 0.7},
              generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(data, own + offset)
    with pytest.raises(ValueError, match="training chain"):
        chain.offset_model(model, offset)
