"""Named beta schedules: closed forms, caps and error messages."""

import math

import numpy as np
import pytest

from unclip.diffusion import get_named_beta_schedule, list_beta_schedules
from unclip.diffusion.schedule import betas_for_alpha_bar


def test_linear_matches_ho_et_al_and_rescales_with_T():
    betas = get_named_beta_schedule("linear", 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4, rel=1e-12) and betas[-1] == pytest.approx(0.02, rel=1e-12)
    assert np.allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-9)
    short = get_named_beta_schedule("linear", 250)  # same curve on a 4x shorter chain
    assert short[0] == pytest.approx(4e-4) and short[-1] == pytest.approx(0.08)


def test_cosine_alpha_bar_closed_form_and_cap():
    T = 1000
    betas = get_named_beta_schedule("cosine", T)
    abar = np.cumprod(1 - betas)
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    expected = np.array([f(t + 1) / f(0) for t in range(T)])
    capped = betas >= 0.999
    assert capped.sum() == 1 and capped[-1]  # only the singular last step hits the 0.999 cap
    np.testing.assert_allclose(abar[:-1], expected[:-1], rtol=1e-9)
    assert betas.max() == 0.999 and (betas > 0).all()
    assert (np.diff(abar) < 0).all()


def test_betas_for_alpha_bar_generic():
    betas = betas_for_alpha_bar(4, lambda t: 1 - t, max_beta=0.9)
    # 1 - (1 - t2)/(1 - t1) for t = 0, .25, .5, .75 -> 0.25, 1/3, 0.5, 1 (capped)
    np.testing.assert_allclose(betas, [0.25, 1 / 3, 0.5, 0.9])


def test_unknown_schedule_lists_valid_names():
    assert list_beta_schedules() == ["cosine", "linear"]
    with pytest.raises(ValueError, match=r"unknown beta schedule 'cosin'.*\['cosine', 'linear'\]"):
        get_named_beta_schedule("cosin")
    with pytest.raises(ValueError):
        get_named_beta_schedule("linear", 0)
