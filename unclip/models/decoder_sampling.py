"""Loading and sampling the decoder cascade: the base decoder (z_i → 64px) and the upsamplers (Ramesh et al. §2.1).

* :func:`load_decoder`, :func:`load_upsampler`: a stage checkpoint → (network with the EMA weights, in eval mode,
  metadata). Another stage's checkpoint is refused (``unclip.checkpoints.stage_metadata``); loading never
  unpickles code (``read_checkpoint``).
* :func:`sample_decoder`, :func:`sample_upsampler`: sample through the diffusion core with the stage's sampler,
  step count and guidance scale from its config (``meta["sampling"]``), each overridable per call.

The metadata (``checkpoint["unclip"]``, written by the stage modules) holds ``model_config``, ``diffusion`` (the
``create_diffusion`` arguments), ``sampling`` and the image sizes; the decoder's also ``embed_dim`` and
``clip_hash``, the upsampler's ``input_size``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from unclip.checkpoints import read_checkpoint, stage_metadata
from unclip.diffusion import (GaussianDiffusion, ModelVarType, classifier_free_guidance, create_diffusion,
                              get_sampler, karras_timesteps)
from unclip.models.degradations import noise_augment, upsample
from unclip.models.unet import DecoderUNet, SuperResUNet, UNet, build_unet


def out_channels_for(diffusion: dict, in_channels: int) -> int:
    """Network output channels: the prediction, plus variance logits when the process learns its variance."""
    learned = create_diffusion(**diffusion).var_type == ModelVarType.LEARNED_RANGE
    return in_channels * (2 if learned else 1)


def logsnr_timesteps(alphas_cumprod: np.ndarray, n: int) -> list[int]:
    """The chain's steps nearest to a grid uniform in log-SNR λ = log(ᾱ/(1−ᾱ))/2, first and last step included: the
    spacing DPM-Solver uses (Lu et al. 2022 §3.3). Near t = 0 λ moves fast and nearby grid points round to the same
    step, so the grid is refined until n distinct steps remain (n − 1 where no refinement gives exactly n).

    :param alphas_cumprod: float64 [T] ᾱ of the chain being respaced.
    :param n: number of steps.
    :return: sorted unique step indices for ``GaussianDiffusion.respace``.
    """
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    lam = 0.5 * np.log(ac / (1.0 - ac))  # [T], decreasing in t
    best: list[int] = []
    for size in range(n, 8 * n + 1):
        grid = np.linspace(lam[-1], lam[0], size)
        steps = sorted(set(np.abs(lam[:, None] - grid[None]).argmin(axis=0).tolist()))
        if len(steps) > n:
            break
        best = steps
        if len(steps) == n:
            break
    return best


SPACINGS = ("strided", "logsnr", "karras")


def sampling_process(diffusion: dict, steps: int | str, spacing: str) -> GaussianDiffusion:
    """The respaced chain a sampler walks.

    :param diffusion: ``create_diffusion`` arguments of the training chain.
    :param steps: the number of steps, or for "strided" any respacing string such as "ddim27" or "10,10,5".
    :param spacing: "strided" (evenly strided, first and last step kept: improved-diffusion; the paper's samplers),
        "logsnr" (uniform in log-SNR: DPM-Solver's spacing, far fewer steps for the same ODE error) or "karras"
        (Karras et al. 2022's σ grid, for Heun).
    """
    base = create_diffusion(**diffusion)
    if spacing == "strided":
        return base.respace(steps)
    if spacing == "logsnr":
        return base.respace(logsnr_timesteps(base.alphas_cumprod, int(steps)))
    if spacing == "karras":
        return base.respace(karras_timesteps(base.alphas_cumprod, int(steps)))
    raise ValueError(f"unknown sampling spacing {spacing!r}; valid: {', '.join(SPACINGS)}")


def run_sampler(model: Any, x: Tensor, process: GaussianDiffusion, sampler: str, extra_args: dict[str, Any], *,
                eta: float, generator: torch.Generator | None, clip_denoised: bool, progress: bool) -> Tensor:
    """Run a named sampler from the starting noise x [N, C, H, W]; only the options it takes are passed."""
    fn = get_sampler(sampler)
    kwargs: dict[str, Any] = {"clip_denoised": clip_denoised, "progress": progress}
    if sampler in ("ddpm", "ddim"):
        kwargs["generator"] = generator
    if sampler == "ddim":
        kwargs["eta"] = eta
    return fn(model, x, process, extra_args, **kwargs)


def _options(meta: dict, overrides: dict[str, Any]) -> dict[str, Any]:
    return {**meta["sampling"], **{k: v for k, v in overrides.items() if v is not None}}


def _noise(shape: tuple[int, ...], noise: Tensor | None, generator: torch.Generator | None,
           device: torch.device) -> Tensor:
    if noise is not None:
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
        return noise.to(device)
    return torch.randn(shape, generator=generator, device=device)


@torch.no_grad()
def sample_decoder(net: DecoderUNet, meta: dict, image_embed: Tensor, text_tokens: Tensor | None = None,
                   text_mask: Tensor | None = None, *, sampler: str | None = None, steps: int | str | None = None,
                   spacing: str | None = None, guidance_scale: float | None = None, eta: float | None = None,
                   generator: torch.Generator | None = None, noise: Tensor | None = None,
                   progress: bool = False) -> Tensor:
    """Decode CLIP image embeddings (and optionally captions) into images with classifier-free guidance.

    :param net: the base decoder (:func:`load_decoder`).
    :param meta: its checkpoint metadata (``sampling``: sampler, steps, spacing, guidance_scale, eta,
        clip_denoised).
    :param image_embed: [N, D] unit-norm CLIP image embeddings z_i.
    :param text_tokens: [N, L, W] CLIP caption token encodings (None: the learned null caption).
    :param text_mask: [N, L] bool padding mask of ``text_tokens``.
    :param sampler, steps, spacing, guidance_scale, eta: override ``meta["sampling"]`` (None keeps it); guidance
        uncond = both the image embedding and the caption replaced by their learned nulls (GLIDE/unCLIP).
    :param generator: source of the starting noise (and of the stochastic samplers' noise).
    :param noise: [N, 3, S, S] starting noise x_T instead of drawing it (e.g. from DDIM inversion).
    :return: [N, 3, S, S] images in [-1, 1], S = ``meta["image_size"]``.
    """
    opt = _options(meta, {"sampler": sampler, "steps": steps, "spacing": spacing, "guidance_scale": guidance_scale,
                          "eta": eta})
    process = sampling_process(meta["diffusion"], opt["steps"], opt["spacing"])
    learned = process.var_type == ModelVarType.LEARNED_RANGE
    model = classifier_free_guidance(net, float(opt["guidance_scale"]), drop_key="cond_drop",
                                     learned_variance=learned)
    size = int(meta["image_size"])
    x = _noise((image_embed.shape[0], net.in_channels, size, size), noise, generator, image_embed.device)
    extra: dict[str, Any] = {"image_embed": image_embed}
    if text_tokens is not None:
        extra["text_tokens"] = text_tokens
        if text_mask is not None:
            extra["text_mask"] = text_mask
    out = run_sampler(model, x, process, opt["sampler"], extra, eta=float(opt["eta"]), generator=generator,
                      clip_denoised=bool(opt["clip_denoised"]), progress=progress)
    return out.clamp(-1, 1)


def output_size(meta: dict, height: int, width: int) -> tuple[int, int]:
    """An upsampler's output size for a low-res input of height×width: its trained scale factor applied."""
    scale = int(meta["image_size"]) / int(meta["input_size"])
    return round(height * scale), round(width * scale)


@torch.no_grad()
def sample_upsampler(net: SuperResUNet, meta: dict, low_res: Tensor, *, sampler: str | None = None,
                     steps: int | str | None = None, spacing: str | None = None, eta: float | None = None,
                     noise_aug_level: float | None = None,
                     generator: torch.Generator | None = None, noise: Tensor | None = None,
                     progress: bool = False) -> Tensor:
    """Upsample images by the upsampler's trained factor (any input size; fully convolutional, no guidance).

    :param net: an upsampler (:func:`load_upsampler`).
    :param meta: its checkpoint metadata (``sampling``: sampler, steps, spacing, eta, clip_denoised,
        noise_aug_level).
    :param low_res: [N, 3, h, w] images in [-1, 1] (the previous stage's output, uncorrupted).
    :param sampler, steps, spacing, eta, noise_aug_level: override ``meta["sampling"]`` (None keeps it).
    :param generator: source of the starting noise, the augmentation noise and any sampler noise.
    :param noise: [N, 3, H, W] starting noise instead of drawing it.
    :return: [N, 3, H, W] images in [-1, 1], (H, W) = :func:`output_size`.
    """
    opt = _options(meta, {"sampler": sampler, "steps": steps, "spacing": spacing, "eta": eta,
                          "noise_aug_level": noise_aug_level})
    process = sampling_process(meta["diffusion"], opt["steps"], opt["spacing"])
    n = low_res.shape[0]
    height, width = output_size(meta, low_res.shape[-2], low_res.shape[-1])
    net.check_size(height, width)
    extra: dict[str, Any] = {}
    if net.noise_aug:
        level = torch.full((n,), float(opt["noise_aug_level"]), device=low_res.device)
        low_res = noise_augment(low_res, level, generator)
        extra["aug_level"] = level
    extra["low_res"] = upsample(low_res, (height, width))  # once, not in every network call
    x = _noise((n, net.in_channels, height, width), noise, generator, low_res.device)
    out = run_sampler(net, x, process, opt["sampler"], extra, eta=float(opt["eta"]), generator=generator,
                      clip_denoised=bool(opt["clip_denoised"]), progress=progress)
    return out.clamp(-1, 1)


def _load(path: str | Path, stage: str, cls: type[UNet], device: torch.device | str) -> tuple[UNet, dict]:
    checkpoint = read_checkpoint(path)
    meta = stage_metadata(checkpoint, path, stage)
    state = checkpoint["state_dict"]
    prefix = "ema.module." if any(k.startswith("ema.module.") for k in state) else "net."
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    model_config = meta["model_config"]
    with torch.device("meta"):  # no allocation or initialisation for weights that are about to be replaced
        net = build_unet(cls, model_config, out_channels_for(meta["diffusion"], model_config["in_channels"]))
    net.load_state_dict(weights, assign=True)
    return net.to(device).eval().requires_grad_(False), {**meta, "weights": prefix.rstrip(".")}


def load_decoder(path: str | Path, device: torch.device | str = "cpu") -> tuple[DecoderUNet, dict]:
    """The base decoder of a decoder-stage checkpoint, with its EMA weights (the training weights when the
    checkpoint has no EMA), in eval mode, and its metadata; refuses other stages' checkpoints naming both."""
    net, meta = _load(path, "decoder", DecoderUNet, device)
    return net, meta  # type: ignore[return-value]


def load_upsampler(path: str | Path, device: torch.device | str = "cpu") -> tuple[SuperResUNet, dict]:
    """An upsampler of an upsampler-stage checkpoint, with its EMA weights, in eval mode, and its metadata."""
    net, meta = _load(path, "upsampler", SuperResUNet, device)
    return net, meta  # type: ignore[return-value]
