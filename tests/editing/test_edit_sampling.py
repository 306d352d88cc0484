"""The inpainting decoder network (zero-initialised extra channels), the edit API of decoder_sampling
(edit_decoder, edit_upsampler, edit_cascade) and the checks of unclip.diffusion.inpaint.validate_mask."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from tests.models.test_unet import conditioning, decoder_config, perturb, upsampler_config
from unclip.decoder_sampling import edit_cascade, edit_decoder, edit_upsampler, sample_decoder
from unclip.diffusion import outside_mask_error, resize_mask, validate_mask
from unclip.models.unet import DecoderUNet, SuperResUNet, build_unet
from unclip.stages import DecoderInfo, UpsamplerInfo

DIFFUSION = {"steps": 1000, "noise_schedule": "cosine", "mean_type": "eps", "var_type": "learned_range",
             "loss_type": "hybrid"}
DECODER_META = DecoderInfo(model=decoder_config(), diffusion=DIFFUSION,
                           sampling={"sampler": "dpmpp_2m", "steps": 4, "spacing": "logsnr", "guidance_scale": 2.0,
                                     "eta": 0.0, "clip_denoised": True})
UPSAMPLER_META = UpsamplerInfo(model=upsampler_config(), input_size=16,
                               diffusion={**DIFFUSION, "var_type": "fixed_small", "loss_type": "mse"},
                               sampling={"sampler": "ddim", "steps": 3, "spacing": "strided", "eta": 0.0,
                                         "clip_denoised": True, "noise_aug_level": 0.0})


def base_decoder(seed: int = 0) -> DecoderUNet:
    torch.manual_seed(seed)
    return perturb(build_unet(DecoderUNet, decoder_config(), out_channels=6), seed)


def inpainting_from(base: DecoderUNet) -> DecoderUNet:
    """An inpainting decoder loaded from the base's weights, as InpaintDecoderModule loads init_from."""
    net = build_unet(DecoderUNet, decoder_config(inpaint=True), out_channels=6)
    missing, unexpected = net.load_state_dict(base.state_dict(), strict=False)
    assert missing == ["inpaint_in.weight"] and unexpected == []
    return net.eval()


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def box_mask(n: int, size: int) -> torch.Tensor:
    mask = torch.zeros(n, 1, size, size)
    mask[..., size // 4: 3 * size // 4, size // 4: size // 2] = 1
    return mask


# ---- the network ------------------------------------------------------------------------------------------------

def test_inpainting_decoder_loaded_from_a_base_is_exactly_the_base_for_any_mask():
    base = base_decoder()
    net = inpainting_from(base)
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 400, 999])
    ref = base(x, t, **conditioning())
    known = images(3, 16)
    masks = [torch.ones(3, 1, 16, 16), box_mask(3, 16), (torch.rand(3, 1, 16, 16) > 0.5).float()]
    for mask in masks:
        assert torch.equal(net(x, t, **conditioning(), inpaint_image=known, inpaint_mask=mask), ref)


def test_trained_inpainting_channels_see_the_kept_pixels_only():
    net = perturb(inpainting_from(base_decoder()), seed=1)  # as after fine-tuning: inpaint_in no longer zero
    x, t, mask = torch.randn(2, 3, 16, 16), torch.tensor([10, 500]), box_mask(2, 16)
    known = images(2, 16)
    out = net(x, t, **conditioning(2), inpaint_image=known, inpaint_mask=mask)
    changed_inside = torch.where(mask.bool(), images(2, 16, seed=5), known)
    assert torch.equal(net(x, t, **conditioning(2), inpaint_image=changed_inside, inpaint_mask=mask), out)
    changed_outside = torch.where(mask.bool(), known, images(2, 16, seed=5))
    assert not torch.allclose(net(x, t, **conditioning(2), inpaint_image=changed_outside, inpaint_mask=mask), out)
    # A mask covering everything feeds the extra channels exact zeros: the image is ignored.
    full = torch.ones(2, 1, 16, 16)
    a = net(x, t, **conditioning(2), inpaint_image=known, inpaint_mask=full)
    assert torch.equal(a, net(x, t, **conditioning(2), inpaint_image=images(2, 16, 9), inpaint_mask=full))


def test_network_refuses_missing_or_unexpected_inpainting_inputs():
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([3])
    with pytest.raises(ValueError, match="not an inpainting decoder"):
        base_decoder()(x, t, **conditioning(1), inpaint_image=x, inpaint_mask=x[:, :1])
    net = inpainting_from(base_decoder())
    with pytest.raises(ValueError, match="needs inpaint_image"):
        net(x, t, **conditioning(1))
    with pytest.raises(ValueError, match="must be"):
        net(x, t, **conditioning(1), inpaint_image=x, inpaint_mask=torch.ones(1, 1, 8, 8))


# ---- validate_mask --------------------------------------------------------------------------------------------

def test_bad_masks_get_a_clear_message(caplog):
    image = images(2, 16)
    with pytest.raises(ValueError, match="mask is 8x8 but the image is 16x16; resize the mask"):
        validate_mask(image, torch.ones(2, 1, 8, 8))
    soft = box_mask(2, 16) * 0.7
    with pytest.raises(ValueError, match=r"mask must be binary .* values such as 0.7.*mask > 0.5"):
        validate_mask(image, soft)
    empty = box_mask(2, 16)
    empty[1] = 0
    with pytest.raises(ValueError, match=r"example\(s\) \[1\] is empty .* nothing to edit"):
        validate_mask(image, empty)
    with pytest.raises(ValueError, match=r"in \[-1, 1\]"):
        validate_mask((image + 1) * 127.5, box_mask(2, 16))
    with pytest.raises(ValueError, match="mask must be"):
        validate_mask(image, torch.ones(3, 1, 16, 16))
    with caplog.at_level(logging.INFO, logger="unclip.diffusion.inpaint"):
        full = validate_mask(image, torch.ones(16, 16, dtype=torch.bool))  # documented: allowed, logged
    assert full.shape == (2, 1, 16, 16) and bool((full == 1).all()) and "covers the whole image" in caplog.text


def test_resize_mask_never_lets_generated_pixels_into_the_kept_region():
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 5, 9] = 1  # one pixel
    small = resize_mask(mask, 8)
    assert small.sum() == 1 and small[0, 0, 1, 2] == 1
    assert torch.equal(resize_mask(small, 32).sum(), torch.tensor(16.0))


# ---- edit API -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("inpaint, method", [(False, "repaint"), (True, "inpaint"), (True, "repaint")])
def test_edit_decoder_keeps_the_outside_exactly_after_compositing(inpaint, method):
    base = base_decoder()
    net = perturb(inpainting_from(base), seed=2) if inpaint else base
    known, mask = images(2, 16), box_mask(2, 16)
    z = conditioning(2)
    out = edit_decoder(net, DECODER_META, known, mask, z["image_embed"], z["text_tokens"], z["text_mask"],
                       method=method, steps=3, jump_length=2, jump_n_sample=2,
                       generator=torch.Generator().manual_seed(0))
    assert out.image.shape == known.shape and out.raw.shape == known.shape
    assert torch.equal(out.image[~mask.bool().expand_as(known)], known[~mask.bool().expand_as(known)])
    assert torch.equal(out.image[mask.bool().expand_as(known)], out.raw[mask.bool().expand_as(known)])
    assert (outside_mask_error(out.image, known, mask) == 0).all()
    assert (outside_mask_error(out.raw, known, mask) > 0).all(), "the raw sample is not a copy"


def test_edit_method_choice_and_refusals():
    base = base_decoder()
    known, mask, z = images(1, 16), box_mask(1, 16), conditioning(1)["image_embed"]
    with pytest.raises(ValueError, match="method='inpaint' needs an inpainting decoder"):
        edit_decoder(base, DECODER_META, known, mask, z, method="inpaint")
    with pytest.raises(ValueError, match="unknown edit method 'blend'"):
        edit_decoder(base, DECODER_META, known, mask, z, method="blend")
    with pytest.raises(ValueError, match="the decoder edits 16x16 images, got 32x32"):
        edit_decoder(base, DECODER_META, images(1, 32), box_mask(1, 32), z)
    with pytest.raises(ValueError, match="'ddpm' or 'ddim'"):
        edit_decoder(base, DECODER_META, known, mask, z, sampler="heun")
    # An inpainting decoder also samples plainly (everything generated).
    out = sample_decoder(inpainting_from(base), DECODER_META, z, steps=2, generator=torch.Generator().manual_seed(0))
    ref = sample_decoder(base, DECODER_META, z, steps=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, ref)


def test_edit_upsampler_keeps_known_pixels_at_full_resolution():
    torch.manual_seed(0)
    up = perturb(build_unet(SuperResUNet, upsampler_config(), out_channels=3))
    known, mask = images(2, 32), box_mask(2, 32)
    low = torch.nn.functional.interpolate(known, size=16, mode="area")
    out = edit_upsampler(up, UPSAMPLER_META, low, known, mask, generator=torch.Generator().manual_seed(0))
    assert out.image.shape == (2, 3, 32, 32) and (outside_mask_error(out.image, known, mask) == 0).all()
    with pytest.raises(ValueError, match="turns 16x16 into 32x32 images, but the known image is 16x16"):
        edit_upsampler(up, UPSAMPLER_META, low, low, mask[..., :16, :16])


@pytest.mark.parametrize("size", [32, 24])
def test_edit_through_decoder_and_upsampler_returns_the_input_size_and_pixels(size):
    torch.manual_seed(0)
    up = perturb(build_unet(SuperResUNet, upsampler_config(), out_channels=3))
    image, mask = images(2, size), box_mask(2, size)
    z = conditioning(2)
    out = edit_cascade((base_decoder(), DECODER_META), [(up, UPSAMPLER_META)], image, mask, z["image_embed"],
                       z["text_tokens"], z["text_mask"], decoder_options={"steps": 3},
                       upsampler_options=[{"steps": 2}], generator=torch.Generator().manual_seed(0))
    assert out.image.shape == image.shape and out.raw.shape == image.shape and out.mask.shape == mask.shape
    assert (outside_mask_error(out.image, image, mask) == 0).all()
    assert (outside_mask_error(out.raw, image, mask) > 0).all()
    with pytest.raises(ValueError, match="upsampler 0: input_size=8 must be equal to the output size=16 of the stage "
                                         "before it"):
        edit_cascade((base_decoder(), DECODER_META), [(up, dataclasses.replace(UPSAMPLER_META, input_size=8))],
                     image, mask, z["image_embed"])
