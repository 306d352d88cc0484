"""Respacing: which steps are kept, and that the short chain keeps ᾱ (so learned variances stay valid)."""

import numpy as np
import pytest

from unclip.diffusion import create_diffusion, karras_timesteps, respace_betas, space_timesteps


@pytest.fixture(scope="module")
def train():
    return create_diffusion(noise_schedule="cosine", var_type="learned_range", loss_type="hybrid")


def test_integer_count_is_evenly_strided_with_both_ends():
    steps = space_timesteps(1000, 100)
    assert len(steps) == 100 and steps[0] == 0 and steps[-1] == 999
    assert set(np.diff(steps)) <= {10, 11}
    assert space_timesteps(1000, "100") == steps
    assert space_timesteps(1000, 250)[:4] == [0, 4, 8, 12]  # improved-diffusion's rounding
    assert space_timesteps(1000, 1000) == list(range(1000))


def test_ddim_strides():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim1000") == list(range(1000))
    with pytest.raises(ValueError, match="exactly 6 steps"):
        space_timesteps(10, "ddim6")


def test_section_counts():
    steps = space_timesteps(300, "10,15,20")  # improved-diffusion's docstring example
    assert len(steps) == 45
    assert sum(s < 100 for s in steps) == 10 and sum(100 <= s < 200 for s in steps) == 15
    assert steps[0] == 0 and 99 in steps and 100 in steps and steps[-1] == 299
    with pytest.raises(ValueError, match="cannot take 200 steps"):
        space_timesteps(300, "200,1")


def test_explicit_list_and_errors():
    assert space_timesteps(1000, [999, 0, 500, 500]) == [0, 500, 999]
    with pytest.raises(ValueError, match="in \\[0, 1000\\)"):
        space_timesteps(1000, [0, 1000])
    with pytest.raises(ValueError, match="empty"):
        space_timesteps(1000, [])
    with pytest.raises(ValueError, match="bad respacing 'fast'"):
        space_timesteps(1000, "fast")
    with pytest.raises(ValueError):
        space_timesteps(1000, 1001)


@pytest.mark.parametrize("spec", [100, "ddim50", "10,10,20", [0, 1, 500, 999], [250, 600], 1000])
def test_respaced_chain_keeps_alpha_bar(train, spec):
    kept = space_timesteps(1000, spec)
    short = train.respace(spec)
    assert short.num_timesteps == len(kept)
    np.testing.assert_array_equal(short.timestep_map, kept)
    # atol: ᾱ ≈ 2e-9 at the last step is rebuilt from a β within 1e-7 of 1, losing relative (not absolute) digits.
    np.testing.assert_allclose(short.alphas_cumprod, train.alphas_cumprod[kept], rtol=1e-12, atol=1e-15)
    # Recomputed betas keep the learned-range endpoints ordered: 0 < β̃_i < β_i <= 1 for i >= 1.
    assert (short.betas > 0).all() and (short.betas <= 1).all()
    assert (short.posterior_variance[1:] > 0).all() and (short.posterior_variance[1:] < short.betas[1:]).all()
    assert short.var_type == train.var_type and short.mean_type == train.mean_type


def test_respacing_composes_and_factory_matches(train):
    twice = train.respace(100).respace(10)
    np.testing.assert_array_equal(twice.timestep_map, np.asarray(space_timesteps(1000, 100))[space_timesteps(100, 10)])
    np.testing.assert_allclose(twice.alphas_cumprod, train.alphas_cumprod[twice.timestep_map], rtol=1e-12, atol=1e-15)
    direct = create_diffusion(var_type="learned_range", loss_type="hybrid", timestep_respacing="ddim50")
    np.testing.assert_array_equal(direct.betas, train.respace("ddim50").betas)
    np.testing.assert_allclose(train.respace(1000).betas, train.betas, rtol=1e-9)


def test_respace_betas_direct():
    abar = np.cumprod(1 - np.full(10, 0.1))
    betas, kept = respace_betas(abar, [3, 0, 9])
    np.testing.assert_array_equal(kept, [0, 3, 9])
    np.testing.assert_allclose(np.cumprod(1 - betas), abar[[0, 3, 9]], rtol=1e-14)
    np.testing.assert_allclose(betas, [0.1, 1 - 0.9**3, 1 - 0.9**6])


def test_karras_timesteps(train):
    steps = karras_timesteps(train.alphas_cumprod, 30)
    sigmas = np.sqrt((1 - train.alphas_cumprod) / train.alphas_cumprod)
    assert steps == sorted(set(steps)) and steps[0] == 0 and len(steps) == 30
    assert sigmas[steps[-1]] == pytest.approx(80, rel=0.05)
    assert len(karras_timesteps(train.alphas_cumprod, 300)) < 300  # duplicates at the σ_min end are merged


def _improved_diffusion_space_timesteps(num_timesteps: int, section_counts: list[int]) -> set[int]:
    # improved-diffusion respace.py's loop, restated: the fractional stride is accumulated, then rounded.
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, out = 0, set()
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        frac_stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            out.add(start + round(cur))
            cur += frac_stride
        start += size
    return out


def test_strided_steps_match_improved_diffusion_for_every_count():
    # i·stride rounds differently from the accumulated stride for 278 counts on T = 1000 (e.g. 39).
    for count in range(1, 1001):
        assert space_timesteps(1000, count) == sorted(_improved_diffusion_space_timesteps(1000, [count])), count
    for spec in ([10, 15, 20], [39, 39, 21], [7, 250]):
        want = sorted(_improved_diffusion_space_timesteps(4000, spec))
        assert space_timesteps(4000, ",".join(map(str, spec))) == want, spec


def test_spacing_policies_live_with_respacing(train):
    from unclip.diffusion.respace import spaced_timesteps

    ac = train.alphas_cumprod
    assert spaced_timesteps(ac, "ddim25", "strided") == "ddim25"
    assert spaced_timesteps(ac, 10, "karras") == karras_timesteps(ac, 10)
    assert len(spaced_timesteps(ac, 20, "logsnr")) == 20
    with pytest.raises(ValueError, match="unknown sampling spacing 'even'; valid: strided, logsnr, karras"):
        spaced_timesteps(ac, 10, "even")
