"""UnCLIPPipeline on a random-weights chain: chain validation, text→image, variations, interpolation, text diffs."""

from __future__ import annotations

import contextlib
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.conftest import make_tiny_clip_export
from tests.tiny_chain import make_tiny_chain
from unclip.chain import ChainError, check_chain
from unclip.pipeline import UnCLIPPipeline, slerp, stage_options
from unclip.stages import ClipInfo, DecoderInfo, PriorInfo, UpsamplerInfo

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to", "ignore:.*LeafSpec")
EXACT = {"steps": 12, "spacing": "strided", "guidance_scale": 1.5}  # decoder options for the inversion round trips


@pytest.fixture(scope="module")
def pipe(tiny_chain):
    pipe = UnCLIPPipeline.from_checkpoints(clip=tiny_chain["clip"], prior=tiny_chain["prior"],
                                           decoder=tiny_chain["decoder"], upsamplers=[tiny_chain["upsampler"]],
                                           device="cpu")
    # Freshly built networks output zeros (zero-initialised last layers); give them a real dependence on their
    # inputs so sampling, inversion and decoding are exercised on non-trivial networks.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in (pipe.chain.prior.net.out, pipe.chain.decoder.net.out_conv, pipe.chain.upsamplers[0].net.out_conv):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.02)
    return pipe


def images(n: int, seed: int = 0, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g) * 1.6 - 0.8)


def test_text_to_image_sizes_types_and_seeds(pipe):
    out = pipe(["a red circle", "a blue square"], num_images_per_prompt=2, seed=0, output_type="pt")
    assert out.images.shape == (4, 3, 32, 32) and 0 <= out.images.min() and out.images.max() <= 1
    assert out.prompts == ["a red circle", "a red circle", "a blue square", "a blue square"]
    assert torch.allclose(out.image_embeds.norm(dim=-1), torch.ones(4), atol=1e-5)
    again = pipe(["a red circle", "a blue square"], num_images_per_prompt=2, seed=0, output_type="pt")
    torch.testing.assert_close(out.images, again.images)
    other = pipe(["a red circle", "a blue square"], num_images_per_prompt=2, seed=1, output_type="pt")
    assert not torch.equal(out.image_embeds, other.image_embeds)
    pil = pipe("a red circle", seed=0, batch_size=1, output_type="pil").images
    assert len(pil) == 1 and isinstance(pil[0], Image.Image) and pil[0].size == (32, 32)
    arr = pipe("a red circle", num_images_per_prompt=3, batch_size=2, seed=0, output_type="np").images
    assert arr.shape == (3, 32, 32, 3) and arr.dtype == np.float32
    # 8-bit quantised like a saved PNG
    assert np.allclose(arr * 255, np.round(arr * 255), atol=1e-4)


def test_stage_knobs_reach_the_samplers_and_unknown_knobs_are_refused(pipe):
    calls = []
    net = pipe.chain.upsamplers[0].net
    hook = net.register_forward_hook(lambda *a: calls.append(1))
    try:
        pipe("a red circle", seed=0, decoder={"steps": 3, "sampler": "ddim"}, upsamplers={"steps": 2},
             prior={"steps": 4, "candidates": 3, "guidance_scale": 2.0})
        assert len(calls) == 2  # two upsampler steps (no guidance: one call per step)
        calls.clear()
        pipe("a red circle", seed=0, upsamplers=[{"steps": 5}])
        assert len(calls) == 5
    finally:
        hook.remove()
    with pytest.raises(ValueError, match=r"unknown decoder option\(s\) \['stpes'\]"):
        pipe("a red circle", decoder={"stpes": 3})
    with pytest.raises(ValueError, match="options for 2 upsamplers, the chain has 1"):
        pipe("a red circle", upsamplers=[{}, {}])
    assert stage_options({"steps": None, "eta": 0.5}, ("steps", "eta"), "x") == {"eta": 0.5}


class GaussianImageDenoiser(torch.nn.Module):
    """The exact ε-predictor for images x₀ ~ N(μ(z), s² I), μ(z) the first 3 entries of z_i per channel, shaped as
    the decoder's output (ε, then variance logits): a network whose DDIM ODE is smooth, so inversion is exact."""

    def __init__(self, decoder: DecoderInfo, s: float = 0.5):
        super().__init__()
        from unclip.diffusion import create_diffusion

        self.in_channels, self.s = 3, s
        self.register_buffer("abar", torch.tensor(create_diffusion(**decoder.diffusion).alphas_cumprod))

    def forward(self, x, t, image_embed, **_):
        abar = self.abar[t].view(-1, 1, 1, 1).float()
        mu = image_embed[:, :3].view(-1, 3, 1, 1) * 3
        x0 = mu + abar.sqrt() * self.s**2 / (abar * self.s**2 + 1 - abar) * (x - abar.sqrt() * mu)
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)


@contextlib.contextmanager
def decoder_only(pipe):
    """The pipeline without its upsamplers, for comparing outputs with inputs at the decoder's size."""
    upsamplers, pipe.chain.upsamplers = pipe.chain.upsamplers, []
    try:
        yield pipe
    finally:
        pipe.chain.upsamplers = upsamplers


@pytest.fixture
def analytic(pipe, monkeypatch):
    monkeypatch.setattr(pipe.chain.decoder, "net", GaussianImageDenoiser(pipe.chain.decoder.info))
    return pipe


def test_variations_with_eta_zero_reconstruct_the_image_and_eta_one_varies(analytic):
    pipe = analytic
    x = images(1)
    z = pipe.encode_images(x)
    x_t = pipe.invert(x, z, EXACT, iters=4)
    rec = pipe._ddim_decode(x_t, z, 0.0, EXACT, torch.Generator().manual_seed(0), False)
    assert (rec - x).abs().max() < 1e-3, "DDIM η=0 decoding of the inverted latent is the image"
    plain = pipe._ddim_decode(pipe.invert(x, z, EXACT, iters=0), z, 0.0, EXACT, torch.Generator(), False)
    assert (plain - x).abs().max() > 10 * (rec - x).abs().max(), "refinement removes the inversion's step error"
    out = pipe.variations(x, num_variations=3, eta=1.0, seed=0, decoder=EXACT, output_type="pt")
    assert out.images.shape == (3, 3, 32, 32)
    assert (out.images[0] - out.images[1]).abs().max() > 1e-2, "η = 1 draws different variations"
    assert torch.allclose(out.image_embeds, z.expand(3, -1))
    with decoder_only(pipe):
        same = pipe.variations(x, num_variations=2, eta=0.0, decoder=EXACT, inversion_iters=4, output_type="pt")
    assert (same.images - (x + 1) / 2).abs().max() < 2 / 255, "η = 0 variations are the image itself"


def test_interpolation_follows_the_slerp_path_and_inverted_end_points_reconstruct(analytic):
    pipe = analytic
    a, b = images(1, 1), images(1, 2)
    out = pipe.interpolate(a, b, n=4, latents="inverted", decoder=EXACT, inversion_iters=4, upsamplers={"steps": 2},
                           output_type="pt")
    z = pipe.encode_images(torch.cat([a, b]))
    torch.testing.assert_close(out.image_embeds[0], z[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.image_embeds[-1], z[1], atol=1e-5, rtol=0)
    cos = (out.image_embeds[:-1] * out.image_embeds[1:]).sum(-1)
    assert torch.allclose(cos, cos[0].expand(3), atol=1e-4), "equal angular steps along the great circle"
    assert out.images.shape == (4, 3, 32, 32)
    with decoder_only(pipe):  # compare with the inputs at the decoder's size
        ends = pipe.interpolate(a, b, n=3, latents="inverted", decoder=EXACT, inversion_iters=4, output_type="pt")
        fixed = pipe.interpolate(a, b, n=3, latents="fixed", seed=0, output_type="pt")
    quantised = (torch.cat([a, b]) + 1) / 2
    assert (ends.images[[0, 2]] - quantised).abs().max() < 2 / 255, "the end points decode back to the inputs"
    assert fixed.images.shape == ends.images.shape
    with pytest.raises(ValueError, match="latents must be one of"):
        pipe.interpolate(a, b, latents="walk")


def test_text_diff_starts_at_the_image_and_refuses_identical_captions(analytic):
    pipe = analytic
    x = images(1, 3)
    out = pipe.text_diff(x, "a red circle", "a blue square", thetas=[0.0, 0.5], decoder=EXACT, inversion_iters=4,
                         output_type="pt")
    z = pipe.encode_images(x)
    torch.testing.assert_close(out.image_embeds[0], z[0], atol=1e-5, rtol=0)
    assert float(out.image_embeds[1] @ z[0]) < float(out.image_embeds[0] @ z[0])
    with decoder_only(pipe):
        start = pipe.text_diff(x, "a red circle", "a blue square", thetas=[0.0], decoder=EXACT, inversion_iters=4,
                               output_type="pt")
    assert (start.images[0] - (x[0] + 1) / 2).abs().max() < 2 / 255, "θ = 0 reconstructs the image"
    with pytest.raises(ValueError, match="embed identically"):
        pipe.text_diff(x, "a red circle", "a red circle")


def test_slerp_keeps_unit_norm_and_splits_the_angle():
    g = torch.Generator().manual_seed(0)
    a, b = F.normalize(torch.randn(2, 8, generator=g), dim=-1)
    mid = slerp(a, b, 0.5)
    assert math.isclose(float(mid.norm()), 1.0, rel_tol=1e-5)
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    angle = torch.acos((a * b).sum())
    torch.testing.assert_close(torch.acos((a * mid).sum()), angle / 2, atol=1e-5, rtol=0)
    torch.testing.assert_close(slerp(a, a, 0.3), a)  # parallel: no division by sin(0)


def test_a_chain_from_different_clips_is_refused_naming_both(tiny_chain, tmp_path):
    other_clip = make_tiny_clip_export(tmp_path / "other_clip", seed=1)
    with pytest.raises(ChainError, match=r"the decoder .*decoder.ckpt: clip_hash=\w+ must be equal to the "
                                         r"clip_hash=\w+ of the CLIP .*other_clip"):
        UnCLIPPipeline.from_checkpoints(clip=other_clip, decoder=tiny_chain["decoder"], device="cpu")
    with pytest.raises(ChainError, match=r"the prior .*prior.ckpt: clip_hash="):
        UnCLIPPipeline.from_checkpoints(clip=other_clip, prior=tiny_chain["prior"], decoder=tiny_chain["decoder"],
                                        device="cpu")
    with pytest.raises(ValueError, match="is a 'prior' stage checkpoint; a 'decoder' checkpoint"):
        UnCLIPPipeline.from_checkpoints(clip=tiny_chain["clip"], decoder=tiny_chain["prior"], device="cpu")


def test_check_chain_names_sizes_and_resolutions():
    clip = ClipInfo(embed_dim=128, clip_hash="a" * 64, text_width=128, context_length=32)
    trained = dataclasses.replace(clip)
    decoder = DecoderInfo(model={"image_size": 64, "clip_embed_dim": 128, "text": None}, diffusion={}, sampling={},
                          clip=trained)

    def up(size_in: int, size_out: int) -> UpsamplerInfo:
        return UpsamplerInfo(model={"image_size": size_out}, diffusion={}, sampling={}, input_size=size_in)

    check_chain(clip, "clip", decoder, "dec.ckpt", upsamplers=[(up(64, 256), "u0"), (up(256, 1024), "u1")])
    wide = dataclasses.replace(decoder, model={**decoder.model, "clip_embed_dim": 256})
    with pytest.raises(ChainError, match="the decoder dec.ckpt: model.clip_embed_dim=256 must be equal to the "
                                         "embed_dim=128 of the CLIP clip"):
        check_chain(clip, "clip", wide, "dec.ckpt")
    with pytest.raises(ChainError, match="upsampler 1 u1: input_size=128 must be equal to the output size=256 of "
                                         "upsampler 0 u0"):
        check_chain(clip, "clip", decoder, "dec.ckpt", upsamplers=[(up(64, 256), "u0"), (up(128, 512), "u1")])
    with pytest.raises(ChainError, match="upsampler 0 u0: input_size=32 must be equal to the output size=64 of the "
                                         "decoder dec.ckpt"):
        check_chain(clip, "clip", decoder, "dec.ckpt", upsamplers=[(up(32, 64), "u0")])
    prior = PriorInfo(model={"embed_dim": 128, "text_width": 256, "context_length": 32}, diffusion={}, sampling={},
                      clip=trained)
    with pytest.raises(ChainError, match="the prior p.ckpt: model.text_width=256 must be equal to the text_width=128 "
                                         "of the CLIP clip"):
        check_chain(clip, "clip", decoder, "dec.ckpt", prior, "p.ckpt")
    short = dataclasses.replace(prior, model={**prior.model, "text_width": 128, "context_length": 16})
    with pytest.raises(ChainError, match="model.context_length=16 must be at least the context_length=32"):
        check_chain(clip, "clip", decoder, "dec.ckpt", short, "p.ckpt")
    with pytest.raises(ChainError, match="does not record which CLIP"):
        check_chain(clip, "clip", dataclasses.replace(decoder, clip=None), "dec.ckpt")


def test_text_to_image_without_a_prior_is_refused_clearly(tiny_chain):
    pipe = UnCLIPPipeline.from_checkpoints(clip=tiny_chain["clip"], decoder=tiny_chain["decoder"], device="cpu")
    with pytest.raises(ValueError, match="text-to-image needs a prior"):
        pipe("a red circle")
    assert pipe.variations(images(1), num_variations=2, output_type="pt").images.shape == (2, 3, 16, 16)


def test_tiny_chain_helper_writes_distinct_checkpoints(tmp_path, tiny_clip_export):
    paths = make_tiny_chain(tmp_path, tiny_clip_export, seed=3)
    assert all(p.exists() for p in paths.values())


def test_edit_keeps_every_pixel_outside_the_mask_at_the_input_size(pipe):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    mask = np.zeros((24, 24), dtype=np.uint8)
    mask[6:18, 4:14] = 255
    out = pipe.edit(image, Image.fromarray(mask), "a red circle", num_images=2, seed=0, output_type="np",
                    decoder={"steps": 3}, upsamplers={"steps": 2})
    assert out.images.shape == (2, 24, 24, 3) and out.prompts == ["a red circle"] * 2
    keep = mask == 0
    assert np.array_equal(np.round(out.images[:, keep] * 255).astype(np.uint8),
                          np.broadcast_to(image[keep], (2, keep.sum(), 3)))
    assert out.raw.shape == out.images.shape
    ref = pipe.edit(image, Image.fromarray(mask), reference_image=image, method="repaint", jump_length=2,
                    jump_n_sample=2, decoder={"steps": 4}, output_type="pt")
    assert ref.images.shape == (1, 3, 24, 24) and ref.prompts is None
    with pytest.raises(ValueError, match="exactly one of prompt"):
        pipe.edit(image, Image.fromarray(mask), "a", reference_image=image)
    with pytest.raises(ValueError, match="mask"):
        pipe.edit(image, np.ones((16, 16), dtype=np.float32), "a red circle")
    with pytest.raises(ValueError, match="binary"):
        pipe.edit(image, np.full((24, 24), 0.5, dtype=np.float32), "a red circle")
