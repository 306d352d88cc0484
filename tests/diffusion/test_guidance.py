"""Classifier-free guidance wrapper: one batched forward, the right combination, exact at scale 1."""

import math

import pytest
import torch
from closed_form import GaussianData, exact_model, gaussian_data_marginal

from unclip.diffusion import ModelMeanType, classifier_free_guidance, create_diffusion, sample_ddim


class Recorder:
    """Toy conditional network: output depends on x, t and the conditioning; records every call."""

    def __init__(self, out_channels_factor: int = 1):
        self.calls: list[dict] = []
        self.k = out_channels_factor

    def __call__(self, x, t, cond=None, drop=None):
        self.calls.append({"batch": x.shape[0], "cond": cond, "drop": drop})
        c = cond.view(-1, *([1] * (x.ndim - 1))) if cond is not None else 0.0
        if drop is not None:
            c = c * (~drop).view(-1, *([1] * (x.ndim - 1)))
        out = x * 0.5 + c + t.view(-1, *([1] * (x.ndim - 1))) * 1e-3
        return torch.cat([out, out * 10 + 7], 1) if self.k == 2 else out


def test_scale_one_is_the_conditional_prediction_exactly():
    net = Recorder()
    x, t, cond = torch.randn(4, 3, 5, 5), torch.tensor([1, 2, 3, 999]), torch.randn(4)
    guided = classifier_free_guidance(net, 1.0, null_args={"cond": torch.zeros(1)})
    assert torch.equal(guided(x, t, cond=cond), net(x, t, cond=cond))
    assert [c["batch"] for c in net.calls] == [4, 4]  # no unconditional pass at s = 1


@pytest.mark.parametrize("scale", [0.0, 3.0])
def test_combination_in_one_batched_forward(scale):
    net = Recorder()
    x, t, cond = torch.randn(4, 3), torch.tensor([5, 6, 7, 8]), torch.randn(4)
    null = torch.tensor([-2.0])  # a learned null embedding, broadcast to the batch
    out = classifier_free_guidance(net, scale, null_args={"cond": null})(x, t, cond=cond)
    assert len(net.calls) == 1 and net.calls[0]["batch"] == 8
    assert torch.equal(net.calls[0]["cond"], torch.cat([cond, null.expand(4)]))
    c, u = net(x, t, cond=cond), net(x, t, cond=null.expand(4))
    torch.testing.assert_close(out, u + scale * (c - u))


def test_drop_key_and_callable_null_args():
    net = Recorder()
    x, t, cond = torch.randn(2, 3), torch.tensor([1, 2]), torch.randn(2)
    out = classifier_free_guidance(net, 2.0, drop_key="drop")(x, t, cond=cond)
    assert net.calls[0]["drop"].tolist() == [False, False, True, True]
    c, u = net(x, t, cond=cond), net(x, t, cond=torch.zeros(2))
    torch.testing.assert_close(out, u + 2.0 * (c - u))
    out2 = classifier_free_guidance(net, 2.0, null_args=lambda kw: {"cond": torch.zeros_like(kw["cond"])})
    torch.testing.assert_close(out2(x, t, cond=cond), out)
    assert classifier_free_guidance(net, 1.0, drop_key="drop")(x, t, cond=cond).shape == (2, 3)


def test_misuse_raises():
    net = Recorder()
    with pytest.raises(ValueError, match="exactly one"):
        classifier_free_guidance(net, 2.0)
    with pytest.raises(ValueError, match="exactly one"):
        classifier_free_guidance(net, 2.0, null_args={}, drop_key="drop")
    with pytest.raises(KeyError, match="cond"):
        classifier_free_guidance(net, 2.0, null_args={"cond": torch.zeros(1)})(torch.zeros(2, 3), torch.tensor([0, 1]))


def test_learned_variance_channels_come_from_the_conditional_pass():
    net = Recorder(out_channels_factor=2)
    x, t, cond = torch.randn(2, 3, 4, 4), torch.tensor([10, 20]), torch.randn(2)
    out = classifier_free_guidance(net, 4.0, null_args={"cond": torch.zeros(2)}, learned_variance=True)(x, t, cond=cond)
    c, u = net(x, t, cond=cond), net(x, t, cond=torch.zeros(2))
    assert out.shape == (2, 6, 4, 4)
    torch.testing.assert_close(out[:, :3], u[:, :3] + 4.0 * (c[:, :3] - u[:, :3]))
    torch.testing.assert_close(out[:, 3:], c[:, 3:])


def test_guidance_is_the_same_for_every_parameterisation():
    # ε, x₀ and v are affine in each other at fixed x_t, so guiding any of them yields the same x̂₀.
    train = create_diffusion()
    cond_data, uncond_data = GaussianData([1.0, -1.0], 0.4), GaussianData([-0.5, 0.0], 0.4)
    x, t = torch.randn(16, 2, dtype=torch.float64), torch.randint(0, 1000, (16,))
    x0s = []
    for mt in ModelMeanType:
        c, u = exact_model(cond_data, train, mt), exact_model(uncond_data, train, mt)
        def net(x, t, y, c=c, u=u):  # this iteration's models, bound now
            return torch.where(y[:, None], c(x, t), u(x, t))

        guided = classifier_free_guidance(net, 3.0, null_args={"y": torch.zeros(1, dtype=torch.bool)})
        proc = create_diffusion(mean_type=mt.value)
        x0s.append(proc.model_predictions(guided, x, t, {"y": torch.ones(16, dtype=torch.bool)})["pred_x0"])
    torch.testing.assert_close(x0s[1], x0s[0])
    torch.testing.assert_close(x0s[2], x0s[0])


def test_guided_sampling_closed_form():
    """For Gaussians with a shared σ, guiding the exact denoisers gives exactly N(μ_u + s(μ_c − μ_u), σ²)."""
    train = create_diffusion()
    sigma, s = 0.4, 2.5
    cond_data, uncond_data = GaussianData([1.0, -1.0], sigma), GaussianData([-0.5, 0.0], sigma)
    c, u = exact_model(cond_data, train, ModelMeanType.EPSILON), exact_model(uncond_data, train, ModelMeanType.EPSILON)
    net = lambda x, t, y: torch.where(y[:, None], c(x, t), u(x, t))  # noqa: E731
    guided = classifier_free_guidance(net, s, null_args={"y": torch.zeros(1, dtype=torch.bool)})
    chain = train.respace(100)
    target = GaussianData((uncond_data.mu + s * (cond_data.mu - uncond_data.mu)).tolist(), sigma)
    g = torch.Generator().manual_seed(0)
    x_t = gaussian_data_marginal(target, chain, 20000, g)
    x = sample_ddim(guided, x_t, chain, {"y": torch.ones(20000, dtype=torch.bool)})
    assert (x.mean(0) - target.mu).abs().max() < 0.03 * sigma
    assert abs(x.std(0).mean().item() / sigma - 1) < 0.03
    assert math.isclose(target.mu[0].item(), 3.25)  # well outside both conditionals: guidance extrapolates


@pytest.mark.parametrize("drop", [False, True])
def test_batch_one_conditioning_is_broadcast_on_both_halves(drop):
    # A caption embedding [1 x D] shared by N samples must reach the network with 2N rows, not 1 + N.
    seen = {}

    def net(x, t, cond=None, drop=None):
        seen["cond"], seen["x"] = cond, x
        return x + cond.sum(-1, keepdim=True)

    x, t, cond = torch.randn(3, 2), torch.tensor([5, 6, 7]), torch.randn(1, 4)
    wrap = (classifier_free_guidance(net, 2.0, drop_key="drop") if drop
            else classifier_free_guidance(net, 2.0, null_args={"cond": torch.zeros(1, 4)}))
    out = wrap(x, t, cond=cond)
    assert seen["cond"].shape == (6, 4) and seen["x"].shape == (6, 2) and out.shape == (3, 2)
    torch.testing.assert_close(seen["cond"][:3], cond.expand(3, 4))
    with pytest.raises(ValueError, match="'cond' .*conditional half.* batch size 3"):
        wrap(x, t, cond=torch.randn(2, 4))


def test_guidance_combines_bf16_halves_in_float32():
    # Under autocast the network returns bf16; s·(cond − uncond) of two close bf16 values must not round in bf16.
    cond = torch.tensor([[1.0078125, 3.0]], dtype=torch.bfloat16)  # exactly representable
    uncond = torch.tensor([[1.0, 2.984375]], dtype=torch.bfloat16)

    def net(x, t, y):
        return torch.where(y[:, None], cond.expand(x.shape[0], 2), uncond.expand(x.shape[0], 2))

    out = classifier_free_guidance(net, 7.5, null_args={"y": torch.zeros(1, dtype=torch.bool)})(
        torch.zeros(1, 2), torch.tensor([3]), y=torch.ones(1, dtype=torch.bool))
    assert out.dtype == torch.float32
    want = uncond.float() + 7.5 * (cond.float() - uncond.float())
    torch.testing.assert_close(out, want, rtol=0, atol=0)
