"""Diffusion core shared by the unCLIP prior and decoder: schedules, respacing, the Gaussian process and its
losses, samplers and classifier-free guidance.

Typical use (the 64px decoder: cosine, ε prediction, learned variance, 250 strided sampling steps)::

    process = create_diffusion(noise_schedule="cosine", mean_type="eps", var_type="learned_range",
                               loss_type="hybrid")                  # training chain, 1000 steps
    terms = process.training_losses(model, x0, t, {"image_embed": z})  # dict of [N] tensors
    sampling = process.respace(250)                                 # = create_diffusion(..., timestep_respacing=250)
    guided = classifier_free_guidance(model, 3.0, null_args={"image_embed": null}, learned_variance=True)
    x = sample_ddpm(guided, torch.randn(shape, generator=g), sampling, {"image_embed": z}, generator=g)

Models are always called as ``model(x_t, t, **extra_args)`` with ``t`` an int64 tensor [N] in the ORIGINAL
(training) chain's index space, also when sampling on a respaced chain.
"""

from __future__ import annotations

from .enums import LossType, ModelMeanType, ModelVarType, parse_enum
from .gaussian import GaussianDiffusion, threshold_x0
from .guidance import classifier_free_guidance
from .inpaint import composite, outside_mask_error, repaint_schedule, resize_mask, sample_repaint, validate_mask
from .losses import min_snr_weight
from .respace import karras_timesteps, logsnr_timesteps, respace_betas, space_timesteps
from .samplers import (
    SAMPLERS,
    ddim_invert,
    ddim_step,
    ddpm_step,
    get_sampler,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_heun,
)
from .schedule import get_named_beta_schedule, list_beta_schedules

__all__ = [
    "GaussianDiffusion", "LossType", "ModelMeanType", "ModelVarType", "SAMPLERS",
    "classifier_free_guidance", "create_diffusion",
    "ddim_invert", "get_named_beta_schedule", "get_sampler", "list_beta_schedules", "min_snr_weight", "parse_enum",
    "karras_timesteps", "logsnr_timesteps", "respace_betas", "sample", "sample_ddim", "sample_ddpm", "sample_dpmpp_2m",
    "sample_heun",
    "space_timesteps", "threshold_x0", "composite", "ddim_step", "ddpm_step", "outside_mask_error",
    "repaint_schedule", "resize_mask", "sample_repaint", "validate_mask",
]  # fmt: skip


def create_diffusion(
    *,
    steps: int = 1000,
    noise_schedule: str = "cosine",
    mean_type: str = "eps",
    var_type: str = "fixed_small",
    loss_type: str = "mse",
    timestep_respacing: int | str | list[int] | None = None,
    snr_gamma: float | None = None,
    vlb_weight: float = 0.001,
    data_bin_width: float = 2.0 / 255.0,
) -> GaussianDiffusion:
    """Build a process from config strings (converted to Enums here, once).

    :param steps: training chain length T (1000 for every unCLIP stage).
    :param noise_schedule: a name from :func:`list_beta_schedules` ("cosine" or "linear").
    :param mean_type: "eps", "x0" or "v".
    :param var_type: "fixed_small", "fixed_large" or "learned_range".
    :param loss_type: "mse", "hybrid" (needs learned_range) or "kl".
    :param timestep_respacing: None for the full chain, else an int count, "ddimN", "a,b,c" or a step list.
    :param snr_gamma: γ for min-SNR-γ MSE weighting, None to disable.
    :param vlb_weight: λ of the hybrid loss.
    :param data_bin_width: quantisation step for the t = 0 discretised likelihood.
    :raises ValueError: for unknown names (listing the valid ones) or incompatible choices.
    """
    process = GaussianDiffusion(
        betas=get_named_beta_schedule(noise_schedule, steps),
        mean_type=parse_enum(ModelMeanType, mean_type),
        var_type=parse_enum(ModelVarType, var_type),
        loss_type=parse_enum(LossType, loss_type),
        snr_gamma=snr_gamma,
        vlb_weight=vlb_weight,
        data_bin_width=data_bin_width,
    )
    if timestep_respacing is None or timestep_respacing == "":
        return process
    return process.respace(timestep_respacing)
