"""The ADM UNet family: zero-initialised output, every conditioning combination, guidance in one batched forward,
learned nulls, size checks, gradient checkpointing, channels-last, and Table 3 parameter counts."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR
from unclip.diffusion import classifier_free_guidance
from unclip.models.unet import DecoderUNet, SuperResUNet, build_unet

D, W_CLIP, L = 16, 24, 6  # CLIP embedding size, CLIP token width, caption tokens


def decoder_config(text: bool = True, **overrides) -> dict:
    config = dict(image_size=16, in_channels=3, model_channels=16, channel_mult=[1, 2], num_res_blocks=1,
                  attention_resolutions=[8], num_head_channels=8, dropout=0.0, num_groups=8, resblock_updown=True,
                  clip_embed_dim=D, clip_tokens=4, context_width=32,
                  text=dict(input_width=W_CLIP, context_length=L, layers=1, heads=2) if text else None,
                  image_drop_prob=0.1, text_drop_prob=0.5, inpaint=False)
    return {**config, **overrides}


def upsampler_config(**overrides) -> dict:
    config = dict(image_size=32, in_channels=3, model_channels=16, channel_mult=[1, 2, 2], num_res_blocks=1,
                  attention_resolutions=[], num_head_channels=8, dropout=0.0, num_groups=8, resblock_updown=False,
                  noise_aug=True)
    return {**config, **overrides}


def perturb(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values, so zero-initialised layers no longer hide the conditioning."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return net.eval()


def conditioning(n: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(L)[None] < torch.tensor([[2], [L], [4]])[:n]
    return {"image_embed": torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=-1),
            "text_tokens": torch.randn(n, L, W_CLIP, generator=g), "text_mask": mask}


def test_zero_initialised_output_predicts_exactly_zero():
    torch.manual_seed(0)
    dec = build_unet(DecoderUNet, decoder_config(), out_channels=6)
    out = dec(torch.randn(3, 3, 16, 16), torch.tensor([0, 500, 999]), **conditioning())
    assert out.shape == (3, 6, 16, 16) and torch.equal(out, torch.zeros_like(out))
    up = build_unet(SuperResUNet, upsampler_config(), out_channels=3)
    out = up(torch.randn(2, 3, 32, 32), torch.tensor([3, 900]), torch.randn(2, 3, 16, 16), torch.rand(2))
    assert torch.equal(out, torch.zeros_like(out))
    # Only the output and residual-out layers are zero: the rest is initialised normally.
    assert dec.conv_in.weight.abs().sum() > 0 and dec.out_conv.weight.abs().sum() == 0
    assert all(b.out_conv.weight.abs().sum() == 0 for b in dec.modules() if type(b).__name__ == "ResBlock")


@pytest.mark.parametrize("text, tokens", [(True, "given"), (True, "no_mask"), (True, "none"), (False, "none")])
@pytest.mark.parametrize("drops", ["none", "cond_drop", "image_drop", "text_drop", "all"])
def test_decoder_shapes_for_every_conditioning_combination(text, tokens, drops):
    torch.manual_seed(0)
    net = perturb(build_unet(DecoderUNet, decoder_config(text=text), out_channels=6))
    cond = conditioning()
    kwargs: dict = {"image_embed": cond["image_embed"]}
    if tokens != "none":
        kwargs["text_tokens"] = cond["text_tokens"]
    if tokens == "given":
        kwargs["text_mask"] = cond["text_mask"]
    mask = torch.tensor([True, False, True])
    if drops in ("cond_drop", "all"):
        kwargs["cond_drop"] = mask
    if drops in ("image_drop", "all"):
        kwargs["image_drop"] = ~mask
    if drops in ("text_drop", "all"):
        kwargs["text_drop"] = mask
    out = net(torch.randn(3, 3, 16, 16), torch.tensor([1, 400, 999]), **kwargs)
    assert out.shape == (3, 6, 16, 16) and torch.isfinite(out).all()


def test_caption_tokens_to_a_decoder_without_captions_and_wrong_embedding_size_are_refused():
    net = build_unet(DecoderUNet, decoder_config(text=False), out_channels=3)
    cond = conditioning()
    with pytest.raises(ValueError, match="no caption conditioning"):
        net(torch.randn(3, 3, 16, 16), torch.zeros(3, dtype=torch.long), cond["image_embed"], cond["text_tokens"])
    with pytest.raises(ValueError, match=rf"image_embed has size 12 .* model.clip_embed_dim={D}"):
        net(torch.randn(3, 3, 16, 16), torch.zeros(3, dtype=torch.long), torch.randn(3, 12))


def test_learned_nulls_replace_the_conditioning():
    torch.manual_seed(0)
    net = perturb(build_unet(DecoderUNet, decoder_config(), out_channels=3))
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([10, 500, 900])
    a, b = conditioning(seed=0), conditioning(seed=1)
    with torch.no_grad():
        assert not torch.allclose(net(x, t, **a), net(x, t, **b))  # the conditioning matters...
        drop = torch.ones(3, dtype=torch.bool)
        torch.testing.assert_close(net(x, t, **a, cond_drop=drop), net(x, t, **b, cond_drop=drop))  # ...until dropped
        # A dropped caption equals no caption at all; a dropped image embedding ignores which one was given.
        torch.testing.assert_close(net(x, t, **a, text_drop=drop), net(x, t, a["image_embed"]))
        only_text = {**b, "image_embed": a["image_embed"]}
        assert not torch.allclose(net(x, t, **a, image_drop=drop), net(x, t, **only_text, image_drop=drop))
        torch.testing.assert_close(net(x, t, **a, image_drop=drop),
                                   net(x, t, **{**a, "image_embed": b["image_embed"]}, image_drop=drop))


def test_guidance_runs_cond_and_uncond_in_one_batched_forward():
    torch.manual_seed(0)
    net = perturb(build_unet(DecoderUNet, decoder_config(), out_channels=6))
    calls = []
    net.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    x, t, cond = torch.randn(3, 3, 16, 16), torch.tensor([10, 500, 900]), conditioning()
    guided = classifier_free_guidance(net, 3.0, drop_key="cond_drop", learned_variance=True)
    with torch.no_grad():
        out = guided(x, t, **cond)
        assert calls == [6]
        c = net(x, t, **cond)
        u = net(x, t, **cond, cond_drop=torch.ones(3, dtype=torch.bool))
    expected = torch.cat([u[:, :3] + 3.0 * (c[:, :3] - u[:, :3]), c[:, 3:]], dim=1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_drop_masks_follow_the_configured_rates():
    net = build_unet(DecoderUNet, decoder_config(image_drop_prob=0.1, text_drop_prob=0.5), out_channels=3)
    masks = net.drop_masks(200_000, "cpu", torch.Generator().manual_seed(0))
    image, text = masks["image_drop"].float(), masks["text_drop"].float()
    assert abs(image.mean() - 0.1) < 0.003 and abs(text.mean() - 0.5) < 0.005
    assert abs((image * text).mean() - 0.05) < 0.003, "the two drops are independent"


def test_upsampler_runs_larger_than_trained_and_checks_sizes():
    torch.manual_seed(0)
    net = perturb(build_unet(SuperResUNet, upsampler_config(), out_channels=3))
    with torch.no_grad():
        out = net(torch.randn(1, 3, 48, 80), torch.tensor([100]), torch.randn(1, 3, 24, 40), torch.tensor([0.2]))
    assert out.shape == (1, 3, 48, 80) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="not divisible by 4"):
        net(torch.randn(1, 3, 30, 32), torch.tensor([1]), torch.randn(1, 3, 15, 16), torch.tensor([0.0]))
    with pytest.raises(ValueError, match="aug_level"):
        net(torch.randn(1, 3, 32, 32), torch.tensor([1]), torch.randn(1, 3, 16, 16))
    plain = build_unet(SuperResUNet, upsampler_config(noise_aug=False), out_channels=3)
    assert plain(torch.randn(1, 3, 32, 32), torch.tensor([1]), torch.randn(1, 3, 32, 32)).shape == (1, 3, 32, 32)


def test_gradient_checkpointing_and_channels_last_change_nothing_numerically():
    torch.manual_seed(0)
    net = perturb(build_unet(DecoderUNet, decoder_config(), out_channels=6)).train()
    x, t, cond = torch.randn(3, 3, 16, 16), torch.tensor([10, 500, 900]), conditioning()

    def grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        net.zero_grad()
        out = net(x, t, **cond)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None]

    out_ref, g_ref = grads()
    net.set_grad_checkpointing(True)
    out_ckpt, g_ckpt = grads()
    net.set_grad_checkpointing(False)
    net.to(memory_format=torch.channels_last)
    out_cl, _ = grads()
    torch.testing.assert_close(out_ckpt, out_ref)
    assert len(g_ckpt) == len(g_ref) > 0
    for a, b in zip(g_ckpt, g_ref, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(out_cl, out_ref, atol=1e-5, rtol=1e-4)


def test_build_unet_names_unknown_and_missing_keys():
    with pytest.raises(ValueError, match=r"unknown keys \['chanel_mult'\], missing keys \['channel_mult'\]"):
        config = decoder_config()
        config["chanel_mult"] = config.pop("channel_mult")
        build_unet(DecoderUNet, config, out_channels=3)
    with pytest.raises(ValueError, match="attention resolutions"):
        build_unet(DecoderUNet, decoder_config(attention_resolutions=[5]), out_channels=3)


@pytest.mark.parametrize("group, name, cls, table3", [
    ("decoder", "paper", DecoderUNet, 3.5e9),
    ("upsampler", "paper_256", SuperResUNet, 700e6),
    ("upsampler", "paper_1024", SuperResUNet, 300e6),
])
def test_paper_presets_match_table3_parameter_counts(group, name, cls, table3):
    config = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / group / f"{name}.yaml"))
    with torch.device("meta"):
        net = build_unet(cls, config, out_channels=6 if group == "decoder" else 3)
    params = sum(p.numel() for p in net.parameters())
    assert abs(params / table3 - 1) < 0.10, f"{name}: {params / 1e6:.0f}M vs Table 3 {table3 / 1e6:.0f}M"
