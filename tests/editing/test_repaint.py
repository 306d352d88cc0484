"""RePaint (unclip.diffusion.inpaint.sample_repaint) against an exact denoiser for correlated Gaussian data, where
the true conditional p(unknown | known) is known in closed form; and its resampling schedule."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tests.diffusion.conftest import _single_thread  # noqa: F401  (autouse: one intra-op thread, as there)
from unclip.diffusion import composite, create_diffusion, outside_mask_error, repaint_schedule, sample_repaint

MU = torch.tensor([0.2, -0.1], dtype=torch.float64)
SD = torch.tensor([0.5, 0.4], dtype=torch.float64)
RHO = 0.9
SIGMA = torch.tensor([[SD[0] ** 2, RHO * SD[0] * SD[1]], [RHO * SD[0] * SD[1], SD[1] ** 2]], dtype=torch.float64)
KNOWN_VALUE = 1.0  # coordinate 0 is kept at this value, coordinate 1 is generated
TRUE_MEAN = float(MU[1] + RHO * SD[1] / SD[0] * (KNOWN_VALUE - MU[0]))  # 0.476
TRUE_VAR = float((1 - RHO**2) * SD[1] ** 2)  # 0.0304


def exact_eps_model(train):
    """ε from E[x₀|x_t] = μ + √ᾱ Σ (ᾱΣ + (1−ᾱ)I)⁻¹ (x_t − √ᾱ μ) for x₀ ~ N(μ, Σ); data laid out [N, 1, 1, 2]."""
    abar = torch.as_tensor(train.alphas_cumprod)

    def model(x, t):
        a = float(abar[t[0]])
        xt = x.view(-1, 2)
        x0 = MU + (math.sqrt(a) * (xt - math.sqrt(a) * MU)) @ torch.linalg.solve(a * SIGMA + (1 - a) * torch.eye(2,
                                                                                  dtype=torch.float64), SIGMA)
        return ((xt - math.sqrt(a) * x0) / math.sqrt(1 - a)).view_as(x)

    return model


def run(steps: int, sampler: str, eta: float | None, jump_length: int, jump_n_sample: int, n: int = 4000):
    train = create_diffusion(noise_schedule="cosine", mean_type="eps")
    known = torch.zeros(n, 1, 1, 2, dtype=torch.float64)
    known[..., 0] = KNOWN_VALUE
    mask = torch.zeros(n, 1, 1, 2, dtype=torch.float64)
    mask[..., 1] = 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 1, 2, generator=g, dtype=torch.float64)
    raw = sample_repaint(exact_eps_model(train), x, train.respace(steps), known=known, mask=mask, sampler=sampler,
                         eta=eta, jump_length=jump_length, jump_n_sample=jump_n_sample, generator=g)
    return raw, known, mask


def test_known_region_is_exact_after_compositing_and_close_before():
    raw, known, mask = run(50, "ddpm", None, 1, 1)
    edit = composite(raw, known, mask)
    assert torch.equal(edit[..., 0], known[..., 0])
    assert torch.equal(outside_mask_error(edit, known, mask), torch.zeros(len(raw), dtype=torch.float32))
    assert float((raw[..., 0] - KNOWN_VALUE).abs().max()) < 0.05  # the model's own final estimate, not a copy
    assert float(outside_mask_error(raw, known, mask).mean()) > 0


def test_resampling_jumps_move_the_unknown_region_to_the_true_conditional():
    plain, _, _ = run(50, "ddpm", None, 1, 1)
    resampled, _, _ = run(50, "ddpm", None, 5, 5)
    err_plain = abs(float(plain[..., 1].mean()) - TRUE_MEAN)
    err_resampled = abs(float(resampled[..., 1].mean()) - TRUE_MEAN)
    # Replacement alone under-uses the known coordinate (the bias RePaint's resampling addresses, §4.2): the
    # conditional mean is pulled to the prior; 4 extra passes per 5-step block recover most of the correlation.
    assert err_plain > 0.1 and err_resampled < 0.05 and err_resampled < err_plain / 3
    var = float(resampled[..., 1].var())
    assert 0.6 * TRUE_VAR < var < 1.4 * TRUE_VAR, "the generated coordinate keeps its conditional spread"


def test_ddim_with_eta_one_is_the_ancestral_sampler_and_eta_zero_stays_close():
    ddpm, _, _ = run(20, "ddpm", None, 3, 3, n=500)
    ddim, _, _ = run(20, "ddim", 1.0, 3, 3, n=500)
    torch.testing.assert_close(ddim, ddpm)  # η = 1 is the fixed-small ancestral step, same noise draws
    raw, known, mask = run(20, "ddim", 0.0, 1, 1, n=500)
    assert float((raw[..., 0] - KNOWN_VALUE).abs().max()) < 0.05
    assert 0.2 < float(raw[..., 1].mean()) < 0.6 and float(raw[..., 1].var()) > 0.3 * TRUE_VAR


def test_multistep_and_ode_solvers_are_refused_by_name():
    with pytest.raises(ValueError, match="'ddpm' or 'ddim'.*dpmpp_2m"):
        run(5, "dpmpp_2m", 0.0, 1, 1, n=2)


@pytest.mark.parametrize("steps, j, r", [(10, 1, 1), (10, 3, 2), (50, 10, 10), (7, 10, 3)])
def test_schedule_walks_unit_steps_from_the_top_to_clean_with_the_paper_resampling_count(steps, j, r):
    times = repaint_schedule(steps, j, r)
    assert times[0] == steps - 1 and times[-1] == -1
    assert all(abs(a - b) == 1 for a, b in itertools.pairwise(times))
    assert max(times) == steps - 1 and min(times) == -1
    reverse = sum(b < a for a, b in itertools.pairwise(times))
    jump_points = len(range(0, steps - j, j))
    assert reverse == steps + jump_points * (r - 1) * j  # each jump point re-walks j steps r − 1 more times
    with pytest.raises(ValueError, match="jump_length and jump_n_sample must be >= 1"):
        repaint_schedule(steps, 0, 1)


def test_ddpm_repaint_refuses_an_eta_instead_of_ignoring_it():
    with pytest.raises(ValueError, match="sampler 'ddpm' takes no eta"):
        run(5, "ddpm", 0.5, 1, 1, n=4)
