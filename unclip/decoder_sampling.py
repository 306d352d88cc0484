"""Loading and sampling the decoder cascade: the base decoder (z_i → 64px) and the upsamplers (Ramesh et al. §2.1).

* :func:`load_decoder`, :func:`load_upsampler`: a stage checkpoint → (network with the EMA weights, in eval mode,
  its :class:`~unclip.stages.DecoderInfo` / :class:`~unclip.stages.UpsamplerInfo`). Another stage's checkpoint
  is refused; loading never unpickles code.
* :func:`sample_decoder`, :func:`sample_upsampler`: sample through the diffusion core with the stage's sampler,
  step count and guidance scale from its sampling defaults (``info.sampling``), each overridable per call.
* :func:`edit_decoder`, :func:`edit_upsampler`, :func:`edit_cascade`: inpainting (mask 1 = generate, 0 = keep):
  with an inpainting decoder (``model.inpaint``) or training-free by RePaint with any decoder; the upsamplers keep
  the known pixels at their own resolution. Each returns the composited edit and the raw sample.

``info`` arguments take the stage description (:mod:`unclip.stages`) or its ``checkpoint["unclip"]`` dict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from unclip.diffusion import GaussianDiffusion, ModelVarType, classifier_free_guidance, create_diffusion, get_sampler
from unclip.diffusion.inpaint import REPAINT_SAMPLERS, composite, resize_mask, sample_repaint, validate_mask
from unclip.diffusion.respace import spaced_timesteps
from unclip.diffusion.samplers import sampler_eta
from unclip.models.degradations import noise_augment, resize, upsample
from unclip.models.unet import DecoderUNet, SuperResUNet
from unclip.stages import (
    DecoderInfo,
    StageInfo,
    UpsamplerInfo,
    input_size_mismatch,
    network_weights,
    out_channels_for,
    stage_info,
)

__all__ = ["EditOutput", "edit_cascade", "edit_decoder", "edit_upsampler", "load_decoder", "load_upsampler",
           "network_weights", "out_channels_for", "output_size", "run_sampler", "sample_decoder", "sample_upsampler",
           "sampling_process"]


def sampling_process(diffusion: dict, steps: int | str, spacing: str) -> GaussianDiffusion:
    """The respaced chain a sampler walks: the training chain of ``diffusion`` (``create_diffusion`` arguments)
    at the steps the ``spacing`` policy picks (:func:`unclip.diffusion.respace.spaced_timesteps`)."""
    base = create_diffusion(**diffusion)
    return base.respace(spaced_timesteps(base.alphas_cumprod, steps, spacing))


def run_sampler(model: Any, x: Tensor, process: GaussianDiffusion, sampler: str, extra_args: dict[str, Any], *,
                eta: float | None, generator: torch.Generator | None, clip_denoised: bool, progress: bool) -> Tensor:
    """Run a named sampler from the starting noise x [N, C, H, W] (a non-zero η refused by non-DDIM samplers)."""
    return get_sampler(sampler)(model, x, process, extra_args, eta=sampler_eta(sampler, eta), generator=generator,
                                clip_denoised=clip_denoised, progress=progress)


def _options(info: StageInfo, overrides: dict[str, Any]) -> dict[str, Any]:
    return {**info.sampling, **{k: v for k, v in overrides.items() if v is not None}}


def _noise(shape: tuple[int, ...], noise: Tensor | None, generator: torch.Generator | None,
           device: torch.device) -> Tensor:
    if noise is not None:
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
        return noise.to(device)
    return torch.randn(shape, generator=generator, device=device)


@torch.no_grad()
def sample_decoder(net: DecoderUNet, info: DecoderInfo | dict, image_embed: Tensor, text_tokens: Tensor | None = None,
                   text_mask: Tensor | None = None, *, sampler: str | None = None, steps: int | str | None = None,
                   spacing: str | None = None, guidance_scale: float | None = None, eta: float | None = None,
                   generator: torch.Generator | None = None, noise: Tensor | None = None,
                   progress: bool = False) -> Tensor:
    """Decode CLIP image embeddings (and optionally captions) into images with classifier-free guidance.

    :param net: the base decoder (:func:`load_decoder`).
    :param info: its description (``sampling``: sampler, steps, spacing, guidance_scale, eta, clip_denoised).
    :param image_embed: [N, D] unit-norm CLIP image embeddings z_i.
    :param text_tokens: [N, L, W] CLIP caption token encodings (None: the learned null caption).
    :param text_mask: [N, L] bool padding mask of ``text_tokens``.
    :param sampler, steps, spacing, guidance_scale, eta: override ``info.sampling`` (None keeps it); guidance
        uncond = both the image embedding and the caption replaced by their learned nulls (GLIDE/unCLIP).
    :param generator: source of the starting noise (and of the stochastic samplers' noise).
    :param noise: [N, 3, S, S] starting noise x_T instead of drawing it (e.g. from DDIM inversion).
    :return: [N, 3, S, S] images in [-1, 1], S = ``info.image_size``. An inpainting decoder samples with a mask
        of all ones (nothing kept); edit images with :func:`edit_decoder`.
    """
    info = stage_info(info, "decoder")
    opt, process, model, extra = _decoder_setup(net, info, image_embed, text_tokens, text_mask,
                                                {"sampler": sampler, "steps": steps, "spacing": spacing,
                                                 "guidance_scale": guidance_scale, "eta": eta})
    size = info.image_size
    x = _noise((image_embed.shape[0], net.in_channels, size, size), noise, generator, image_embed.device)
    if net.inpaint:  # an inpainting decoder generates everything under a mask of all ones
        extra.update(inpaint_image=torch.zeros_like(x), inpaint_mask=torch.ones_like(x[:, :1]))
    out = run_sampler(model, x, process, opt["sampler"], extra, eta=opt["eta"], generator=generator,
                      clip_denoised=bool(opt["clip_denoised"]), progress=progress)
    return out.clamp(-1, 1)


def _decoder_setup(net: DecoderUNet, info: StageInfo, image_embed: Tensor, text_tokens: Tensor | None,
                   text_mask: Tensor | None, overrides: dict[str, Any]) -> tuple[dict, GaussianDiffusion, Any, dict]:
    """(options, respaced chain, guided model, conditioning kwargs) of a decoder sampling call."""
    opt = _options(info, overrides)
    process = sampling_process(info.diffusion, opt["steps"], opt["spacing"])
    learned = process.var_type == ModelVarType.LEARNED_RANGE
    model = classifier_free_guidance(net, float(opt["guidance_scale"]), drop_key="cond_drop",
                                     learned_variance=learned)
    extra: dict[str, Any] = {"image_embed": image_embed}
    if text_tokens is not None:
        extra["text_tokens"] = text_tokens
        if text_mask is not None:
            extra["text_mask"] = text_mask
    return opt, process, model, extra


def output_size(info: UpsamplerInfo | dict, height: int, width: int) -> tuple[int, int]:
    """An upsampler's output size for a low-res input of height×width: its trained scale factor applied."""
    return stage_info(info, "upsampler").output_size(height, width)


@torch.no_grad()
def sample_upsampler(net: SuperResUNet, info: UpsamplerInfo | dict, low_res: Tensor, *, sampler: str | None = None,
                     steps: int | str | None = None, spacing: str | None = None, eta: float | None = None,
                     noise_aug_level: float | None = None,
                     generator: torch.Generator | None = None, noise: Tensor | None = None,
                     progress: bool = False) -> Tensor:
    """Upsample images by the upsampler's trained factor (any input size; fully convolutional, no guidance).

    :param net: an upsampler (:func:`load_upsampler`).
    :param info: its description (``sampling``: sampler, steps, spacing, eta, clip_denoised, noise_aug_level).
    :param low_res: [N, 3, h, w] images in [-1, 1] (the previous stage's output, uncorrupted).
    :param sampler, steps, spacing, eta, noise_aug_level: override ``info.sampling`` (None keeps it).
    :param generator: source of the starting noise, the augmentation noise and any sampler noise.
    :param noise: [N, 3, H, W] starting noise instead of drawing it (a residual upsampler's: the residual's).
    :return: [N, 3, H, W] images in [-1, 1], (H, W) = :func:`output_size`; a residual upsampler's
        (``info.residual``) are the upsampled input plus the sampled residual.
    """
    opt, process, model, extra, x = _upsampler_setup(
        net, stage_info(info, "upsampler"), low_res,
        {"sampler": sampler, "steps": steps, "spacing": spacing, "eta": eta, "noise_aug_level": noise_aug_level},
        generator, noise)
    out = run_sampler(model, x, process, opt["sampler"], extra, eta=opt["eta"], generator=generator,
                      clip_denoised=bool(opt["clip_denoised"]), progress=progress)
    return out.clamp(-1, 1)


def _upsampler_setup(net: SuperResUNet, info: UpsamplerInfo, low_res: Tensor, overrides: dict[str, Any],
                     generator: torch.Generator | None,
                     noise: Tensor | None) -> tuple[dict, GaussianDiffusion, Any, dict, Tensor]:
    """(options, respaced chain, model, conditioning kwargs, starting noise) of an upsampler sampling call.

    A residual upsampler (``info.residual``) is sampled in the image's frame (``offset_model``): samplers and
    ``clip_denoised`` see cond + residual, and the starting noise is the residual's N(0, I) moved by √ᾱ_T·cond.
    """
    opt = _options(info, overrides)
    process = sampling_process(info.diffusion, opt["steps"], opt["spacing"])
    n = low_res.shape[0]
    height, width = output_size(info, low_res.shape[-2], low_res.shape[-1])
    net.check_size(height, width)
    extra: dict[str, Any] = {}
    if net.noise_aug:
        level = torch.full((n,), float(opt["noise_aug_level"]), device=low_res.device)
        low_res = noise_augment(low_res, level, generator)
        extra["aug_level"] = level
    extra["low_res"] = cond = upsample(low_res, (height, width))  # once, not in every network call
    x = _noise((n, net.in_channels, height, width), noise, generator, low_res.device)
    if not info.residual:
        return opt, process, net, extra, x
    model = create_diffusion(**info.diffusion).offset_model(net, cond)
    return opt, process, model, extra, x.add(cond, alpha=math.sqrt(process.alphas_cumprod[-1]))


# ---- editing: inpainting at each stage of the cascade (mask 1 = generate, 0 = keep) -----------------------------

class EditOutput(NamedTuple):
    """An edit: ``image`` is ``raw`` composited with the original, so it equals the original exactly outside the
    mask; ``raw`` is the sampler's output before compositing (report :func:`outside_mask_error` on both)."""

    image: Tensor  # [N, 3, H, W] in [-1, 1]
    raw: Tensor  # [N, 3, H, W] in [-1, 1]
    mask: Tensor  # [N, 1, H, W] float, 1 = generated


EDIT_METHODS = ("auto", "inpaint", "repaint")


def _repaint_sampler(sampler: str | None, configured: str, fallback: str) -> str:
    if sampler is not None:
        return sampler
    return configured if configured in REPAINT_SAMPLERS else fallback


@torch.no_grad()
def edit_decoder(net: DecoderUNet, info: DecoderInfo | dict, known: Tensor, mask: Tensor, image_embed: Tensor,
                 text_tokens: Tensor | None = None, text_mask: Tensor | None = None, *, method: str = "auto",
                 sampler: str | None = None, steps: int | str | None = None, spacing: str | None = None,
                 guidance_scale: float | None = None, eta: float | None = None, jump_length: int = 1,
                 jump_n_sample: int = 1, generator: torch.Generator | None = None, noise: Tensor | None = None,
                 progress: bool = False) -> EditOutput:
    """Inpaint images at the decoder's resolution, guided by z_i (and a caption) as :func:`sample_decoder` is.

    :param net, info: a decoder and its description (:func:`load_decoder`).
    :param known: [N, 3, S, S] the images to edit, in [-1, 1], S = ``info.image_size``.
    :param mask: [N, 1, S, S] (or any form :func:`~unclip.diffusion.inpaint.validate_mask` takes): 1 = generate.
    :param image_embed, text_tokens, text_mask: the conditioning, as for :func:`sample_decoder`: the CLIP embedding
        of the target caption (through the prior) or of a reference image.
    :param method: "inpaint" (an inpainting decoder, ``model.inpaint``: the masked image and mask are network
        inputs; any sampler), "repaint" (any decoder, training-free: :func:`~unclip.diffusion.inpaint.
        sample_repaint`), or "auto" (inpaint for an inpainting decoder, else repaint).
    :param sampler, steps, spacing, guidance_scale, eta: override ``info.sampling``. RePaint steps with "ddpm"
        or "ddim"; when ``sampler`` is None it uses the configured one if it is either, else "ddpm" (the paper's).
    :param jump_length, jump_n_sample: RePaint's resampling (1, 1: replacement only; the paper uses 10, 10).
    :param generator, noise: as for :func:`sample_decoder`.
    :raises ValueError: for a bad mask (:func:`validate_mask`), images of the wrong size, an unknown method, or
        "inpaint" with a decoder that has no inpainting channels.
    """
    if method not in EDIT_METHODS:
        raise ValueError(f"unknown edit method {method!r}; valid: {', '.join(EDIT_METHODS)}")
    method = ("inpaint" if net.inpaint else "repaint") if method == "auto" else method
    if method == "inpaint" and not net.inpaint:
        raise ValueError("method='inpaint' needs an inpainting decoder (model.inpaint=true, e.g. experiment="
                         "demo_inpaint_decoder_tiny); this one is a base decoder: use method='repaint'")
    info = stage_info(info, "decoder")
    size = info.image_size
    if tuple(known.shape[-2:]) != (size, size):
        raise ValueError(f"the decoder edits {size}x{size} images, got {known.shape[-2]}x{known.shape[-1]}; "
                         f"resize them (or use edit_cascade, which does)")
    mask = validate_mask(known, mask)
    opt, process, model, extra = _decoder_setup(net, info, image_embed, text_tokens, text_mask,
                                                {"sampler": sampler, "steps": steps, "spacing": spacing,
                                                 "guidance_scale": guidance_scale, "eta": eta})
    x = _noise(tuple(known.shape), noise, generator, known.device)
    if net.inpaint:
        extra.update(inpaint_image=known, inpaint_mask=mask)
    clip = bool(opt["clip_denoised"])
    if method == "inpaint":
        raw = run_sampler(model, x, process, opt["sampler"], extra, eta=opt["eta"], generator=generator,
                          clip_denoised=clip, progress=progress)
    else:
        raw = sample_repaint(model, x, process, extra, known=known, mask=mask, progress=progress,
                             sampler=(rs := _repaint_sampler(sampler, opt["sampler"], "ddpm")),
                             eta=sampler_eta(rs, opt["eta"]),
                             jump_length=jump_length, jump_n_sample=jump_n_sample, generator=generator,
                             clip_denoised=clip)
    raw = raw.clamp(-1, 1)
    return EditOutput(composite(raw, known, mask), raw, mask)


@torch.no_grad()
def edit_upsampler(net: SuperResUNet, info: UpsamplerInfo | dict, low_res: Tensor, known: Tensor, mask: Tensor, *,
                   sampler: str | None = None, steps: int | str | None = None, spacing: str | None = None,
                   eta: float | None = None, noise_aug_level: float | None = None, jump_length: int = 1,
                   jump_n_sample: int = 1, generator: torch.Generator | None = None, noise: Tensor | None = None,
                   progress: bool = False) -> EditOutput:
    """Upsample an edit while keeping the known pixels at full resolution: the same replacement as RePaint at the
    upsampler's resolution (no jumps by default), so the untouched region follows the original, not the
    low-res edit blown up.

    :param low_res: [N, 3, h, w] the previous stage's edit (composited).
    :param known: [N, 3, H, W] the original at the output size (:func:`output_size`).
    :param mask: [N, 1, H, W]: 1 = generate.
    :param sampler: "ddpm" or "ddim"; None uses the configured one if it is either, else "ddim" (the paper's).
    :param others: as for :func:`sample_upsampler` and :func:`edit_decoder`.
    """
    info = stage_info(info, "upsampler")
    height, width = output_size(info, low_res.shape[-2], low_res.shape[-1])
    if tuple(known.shape[-2:]) != (height, width):
        raise ValueError(f"this upsampler turns {low_res.shape[-2]}x{low_res.shape[-1]} into {height}x{width} "
                         f"images, but the known image is {known.shape[-2]}x{known.shape[-1]}")
    mask = validate_mask(known, mask)
    opt, process, model, extra, x = _upsampler_setup(
        net, info, low_res, {"sampler": sampler, "steps": steps, "spacing": spacing, "eta": eta,
                             "noise_aug_level": noise_aug_level}, generator, noise)
    raw = sample_repaint(model, x, process, extra, known=known, mask=mask, progress=progress,
                         sampler=(rs := _repaint_sampler(sampler, opt["sampler"], "ddim")),
                         eta=sampler_eta(rs, opt["eta"]),
                         jump_length=jump_length, jump_n_sample=jump_n_sample, generator=generator,
                         clip_denoised=bool(opt["clip_denoised"])).clamp(-1, 1)
    return EditOutput(composite(raw, known, mask), raw, mask)


@torch.no_grad()
def edit_cascade(decoder: tuple[DecoderUNet, DecoderInfo | dict],
                 upsamplers: Sequence[tuple[SuperResUNet, UpsamplerInfo | dict]], image: Tensor,
                 mask: Tensor, image_embed: Tensor, text_tokens: Tensor | None = None,
                 text_mask: Tensor | None = None, *, method: str = "auto", decoder_options: dict | None = None,
                 upsampler_options: Sequence[dict] | None = None, generator: torch.Generator | None = None,
                 progress: bool = False) -> EditOutput:
    """Edit images through the decoder and the upsamplers; the result has the input's size and equals the input
    exactly outside the mask.

    The image and mask are resized to the cascade's output size F (bicubic; the mask conservatively), then to each
    stage's size: the decoder edits at its size (:func:`edit_decoder`), each upsampler upsamples the previous edit
    keeping the known pixels at its size (:func:`edit_upsampler`), and the result is resized back and composited
    with the input at the input's resolution.

    :param decoder, upsamplers: (network, description) pairs in cascade order (:func:`load_decoder`,
        :func:`load_upsampler`).
    :param image: [N, 3, H, W] in [-1, 1], any size (square sizes avoid a change of aspect ratio).
    :param mask: [N, 1, H, W] (or any form :func:`validate_mask` takes): 1 = generate, 0 = keep.
    :param image_embed, text_tokens, text_mask: the decoder's conditioning.
    :param method: the decoder's edit method (:func:`edit_decoder`).
    :param decoder_options: keyword overrides for :func:`edit_decoder` (sampler, steps, jump_length, ...).
    :param upsampler_options: one dict of :func:`edit_upsampler` overrides per upsampler.
    :return: :class:`EditOutput` at [N, 3, H, W].
    """
    mask = validate_mask(image, mask)
    net, info = decoder[0], stage_info(decoder[1], "decoder")
    up_infos = [stage_info(up_info, "upsampler") for _, up_info in upsamplers]
    sizes = [(info.image_size, info.image_size)]
    for k, up_info in enumerate(up_infos):
        mismatch = input_size_mismatch(up_info.input_size, sizes[-1][0], key="input_size")
        if mismatch is not None:
            raise ValueError(mismatch.message(f"upsampler {k}", "the stage before it"))
        sizes.append(up_info.output_size(*sizes[-1]))
    final = resize(image, sizes[-1])
    final_mask = resize_mask(mask, sizes[-1])
    options = list(upsampler_options or [{}] * len(upsamplers))
    if len(options) != len(upsamplers):
        raise ValueError(f"upsampler_options has {len(options)} entries for {len(upsamplers)} upsamplers")
    out = edit_decoder(net, info, resize(final, sizes[0]), resize_mask(final_mask, sizes[0]), image_embed,
                       text_tokens, text_mask, method=method, generator=generator, progress=progress,
                       **(decoder_options or {}))
    for (up, _), up_info, size, opts in zip(upsamplers, up_infos, sizes[1:], options, strict=True):
        out = edit_upsampler(up, up_info, out.image, resize(final, size), resize_mask(final_mask, size),
                             generator=generator, progress=progress, **opts)
    input_size = (image.shape[-2], image.shape[-1])
    raw = resize(out.raw, input_size)
    edited = resize(out.image, input_size)
    return EditOutput(composite(edited, image, mask), raw, mask)


def load_decoder(path: str | Path, device: torch.device | str = "cpu") -> tuple[DecoderUNet, DecoderInfo]:
    """The base decoder of a decoder-stage checkpoint, with its EMA weights (the training weights when the
    checkpoint has no EMA), in eval mode, and its description; refuses other stages' checkpoints naming both."""
    return DecoderInfo.load(path, device)  # type: ignore[return-value]


def load_upsampler(path: str | Path, device: torch.device | str = "cpu") -> tuple[SuperResUNet, UpsamplerInfo]:
    """An upsampler of an upsampler-stage checkpoint, with its EMA weights, in eval mode, and its description."""
    return UpsamplerInfo.load(path, device)  # type: ignore[return-value]
