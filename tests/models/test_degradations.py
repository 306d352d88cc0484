"""Conditioning-image corruptions of the upsamplers: blur, BSR degradation, noise augmentation, paired crops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unclip.models.degradations import (
    BSRDegradation,
    GaussianBlur,
    downsample,
    gaussian_blur,
    jpeg,
    noise_augment,
    paired_random_crop,
    resize,
    upsample,
)


def images(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.rand(n, 3, size // 4, size // 4, generator=g), size=size, mode="bilinear")
    return (smooth * 2 - 1).clamp(-1, 1)


def bsr(**overrides) -> BSRDegradation:
    config = dict(blur_prob=0.5, blur_kernel=7, blur_sigma=[0.2, 2.0], anisotropic_prob=0.5, resize_prob=0.5,
                  resize_scale=[0.5, 1.0], noise_prob=0.5, noise_sigma=[1, 25], jpeg_prob=0.5, jpeg_quality=[30, 95],
                  shuffle=True)
    return BSRDegradation(**{**config, **overrides})


def test_gaussian_blur_matches_the_analytic_kernel_and_keeps_constants():
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 4] = 1.0
    out = GaussianBlur(3, 0.6)(x)
    taps = torch.exp(-torch.tensor([1.0, 0.0, 1.0]) / (2 * 0.6**2))
    taps = taps / taps.sum()
    torch.testing.assert_close(out[0, 0, 3:6, 3:6], taps[:, None] * taps[None, :])
    assert math.isclose(float(out.sum()), 1.0, rel_tol=1e-6)
    flat = torch.full((2, 3, 8, 8), 0.3)
    torch.testing.assert_close(GaussianBlur(3, 0.6)(flat), flat)
    with pytest.raises(ValueError, match="odd"):
        gaussian_blur(flat, 4, torch.ones(2))


def test_anisotropic_blur_blurs_each_axis_by_its_own_sigma():
    x = torch.zeros(1, 1, 15, 15)
    x[0, 0, 7, 7] = 1.0
    out = gaussian_blur(x, 9, torch.tensor([2.0]), torch.tensor([0.3]))[0, 0]
    assert out[7].abs().sum() > 5 * out[:, 7].abs().sum() - 5 * out[7, 7]  # wide along x, narrow along y
    assert out[7, 9] > out[9, 7]


def test_bsr_degradation_is_seeded_in_range_and_changes_the_image():
    x = images()
    a = bsr()(x, torch.Generator().manual_seed(1))
    b = bsr()(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    always = bsr(blur_prob=1.0, resize_prob=1.0, noise_prob=1.0, jpeg_prob=1.0)(x, torch.Generator().manual_seed(2))
    assert (always - x).abs().mean() > 0.01
    never = bsr(blur_prob=0.0, resize_prob=0.0, noise_prob=0.0, jpeg_prob=0.0)(x, torch.Generator().manual_seed(2))
    torch.testing.assert_close(never, x)
    with pytest.raises(ValueError, match="resize_scale"):
        bsr(resize_scale=[0.0, 1.0])


def test_jpeg_round_trip_is_close_at_high_quality_and_lossy_at_low():
    x = images(2, 32)
    high, low = jpeg(x, [95, 95]), jpeg(x, [5, 5])
    err_high, err_low = float((high - x).abs().mean()), float((low - x).abs().mean())
    assert err_high < 0.05 and err_high < err_low / 3, (err_high, err_low)


def test_noise_augmentation_levels():
    x = images(2, 16)
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(noise_augment(x, torch.zeros(2), g), x)
    pure = noise_augment(torch.ones(4, 3, 64, 64), torch.ones(4), g)
    assert abs(float(pure.mean())) < 0.02 and abs(float(pure.std()) - 1) < 0.02
    half = noise_augment(torch.zeros(4, 3, 64, 64), torch.full((4,), 0.5), g)
    assert abs(float(half.var()) - 0.5) < 0.02  # 1 - cos^2(pi/4)


def test_paired_random_crop_keeps_the_pair_aligned():
    a = torch.arange(2 * 16 * 16, dtype=torch.float32).view(2, 1, 16, 16)
    ca, cb = paired_random_crop(a, a.repeat(1, 3, 1, 1) * 2, 8, torch.Generator().manual_seed(0))
    assert ca.shape == (2, 1, 8, 8) and cb.shape == (2, 3, 8, 8)
    torch.testing.assert_close(cb, ca.repeat(1, 3, 1, 1) * 2)
    with pytest.raises(ValueError, match="exceeds"):
        paired_random_crop(a, a, 17)


def test_downsample_then_upsample_round_trip_sizes_and_range():
    x = images(2, 32)
    low = downsample(x, 8)
    assert low.shape == (2, 3, 8, 8) and low.abs().max() <= 1
    assert upsample(low, 32).shape == (2, 3, 32, 32) and upsample(low, (16, 24)).shape == (2, 3, 16, 24)


def test_resize_is_the_one_antialiased_bicubic_resize_and_upsample_differs():
    from unclip.evaluation.edit_run import crop_resize

    x = images(2, 32)[..., :24]  # [2, 3, 32, 24]: non-square
    reference = F.interpolate(x, size=(16, 12), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
    assert torch.equal(resize(x, (16, 12)), reference)
    assert resize(x, (32, 24)) is x, "an image already at the size is not resampled"
    assert torch.equal(downsample(x[..., :24, :], 8), resize(x[..., :24, :], 8))
    assert torch.equal(crop_resize(x, (4, 2, 20, 20), 10), resize(x[:, :, 4:24, 2:22], 10))
    # The upsamplers' conditioning keeps plain bicubic: torch's antialiased kernel differs even when enlarging.
    assert not torch.allclose(upsample(x.clone(), (64, 48)), resize(x, (64, 48)), atol=1e-3)
