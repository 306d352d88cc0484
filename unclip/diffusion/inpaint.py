"""Inpainting with diffusion: mask checks, compositing, and the training-free RePaint sampler.

Mask convention, everywhere in unclip: ``mask`` [N, 1, H, W] is **1 where the image is to be generated** and
**0 where it is kept** (the "known" region). ``known`` is the image being edited, in [-1, 1]; its pixels under the
mask are never used.

* :func:`validate_mask`: refuses a mask of another size, a non-binary mask and an empty mask (nothing to edit) with
  a message saying what to do; a mask covering the whole image is allowed (the edit is then plain generation).
* :func:`resize_mask`: a mask at another stage's resolution (conservative when shrinking: a low-res pixel is
  generated when any pixel it covers is).
* :func:`composite`: the final edit, generated pixels inside the mask and the original ones outside, exactly.
* :func:`outside_mask_error`: how far an output strays from the original outside the mask (before compositing
  this measures the sampler's faithfulness; after it, it is 0 by construction).
* :func:`sample_repaint`: RePaint (Lugmayr et al. 2022, Alg. 1 with the resampling schedule of §4.2): any
  unconditional or conditional denoiser inpaints by replacing the known region with the forward-noised original
  before every reverse step, optionally jumping back ``jump_length`` steps ``jump_n_sample − 1`` times to let the
  generated region harmonise with it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .gaussian import GaussianDiffusion, Model
from .samplers import Callback, ddim_step, ddpm_step

log = logging.getLogger(__name__)
REPAINT_SAMPLERS = ("ddpm", "ddim")


def validate_mask(image: Tensor, mask: Tensor) -> Tensor:
    """Check an edit's image and mask and return the mask as float [N, 1, H, W] (1 = generate, 0 = keep).

    :param image: [N, C, H, W] images in [-1, 1].
    :param mask: [H, W], [N, H, W], [N, 1, H, W] or [1, 1, H, W] (broadcast to the batch); bool, or numbers that
        are all exactly 0 or 1.
    :raises ValueError: an image out of [-1, 1] (e.g. [0, 255] pixels), a mask whose size differs from the
        image's, a non-binary mask (threshold it first, e.g. ``mask > 0.5``), or a mask with no pixel to generate
        in some example (nothing to edit). A mask covering the whole image is accepted: the edit then ignores the
        image and samples from the conditioning alone (logged at INFO).
    """
    if image.ndim != 4:
        raise ValueError(f"image must be [N, C, H, W], got shape {tuple(image.shape)}")
    lo, hi = float(image.min()), float(image.max())
    if lo < -1.001 or hi > 1.001:
        raise ValueError(f"image values must be in [-1, 1] (x/127.5 − 1 for 8-bit pixels), got [{lo:.3g}, {hi:.3g}]")
    n, _, height, width = image.shape
    m = mask
    if m.ndim == 2:
        m = m[None, None]
    elif m.ndim == 3:
        m = m[:, None]
    if m.ndim != 4 or m.shape[1] != 1 or m.shape[0] not in (1, n):
        raise ValueError(f"mask must be [H, W], [N, H, W] or [N, 1, H, W] for {n} images, got {tuple(mask.shape)}")
    if tuple(m.shape[-2:]) != (height, width):
        raise ValueError(f"mask is {m.shape[-2]}x{m.shape[-1]} but the image is {height}x{width}; resize the "
                         f"mask to the image (unclip.diffusion.inpaint.resize_mask) before editing")
    if m.dtype != torch.bool:
        bad = (m != 0) & (m != 1)
        if bad.any():
            raise ValueError(f"mask must be binary (1 = generate, 0 = keep) but holds values such as "
                             f"{float(m[bad][0]):.4g}; threshold it first, e.g. mask > 0.5")
    m = m.to(device=image.device, dtype=image.dtype).expand(n, 1, height, width)
    area = m.flatten(1).mean(dim=1)  # [N] fraction to generate
    empty = (area == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"the mask of example(s) {empty} is empty (all 0 = keep): nothing to edit; mark the "
                         f"region to generate with 1")
    full = (area == 1).nonzero().flatten().tolist()
    if full:
        log.info("the mask of example(s) %s covers the whole image: those edits are plain samples", full)
    return m


def resize_mask(mask: Tensor, size: int | tuple[int, int]) -> Tensor:
    """A binary mask [N, 1, H, W] at ``size``: shrinking marks a pixel "generate" when any pixel it covers is (the
    known region at low resolution holds only known pixels); enlarging is nearest-neighbour."""
    height, width = (size, size) if isinstance(size, int) else size
    m = mask.float()
    dtype = mask.dtype if mask.dtype.is_floating_point else m.dtype
    if height <= m.shape[-2] and width <= m.shape[-1]:
        return (F.adaptive_max_pool2d(m, (height, width)) > 0).to(dtype)
    return F.interpolate(m, size=(height, width), mode="nearest").to(dtype)


def composite(generated: Tensor, known: Tensor, mask: Tensor) -> Tensor:
    """mask·generated + (1 − mask)·known: exactly ``known`` outside the mask. All [N, C, H, W] ([N, 1, H, W] mask)."""
    return torch.where(mask.bool(), generated, known.to(generated.dtype))


def outside_mask_error(x: Tensor, known: Tensor, mask: Tensor, metric: str = "mse") -> Tensor:
    """Per-example error of ``x`` against ``known`` over the kept pixels (mask = 0).

    :param x: [N, C, H, W] an edit before or after :func:`composite`.
    :param known: [N, C, H, W] the original image.
    :param mask: [N, 1, H, W] 1 = generated.
    :param metric: "mse" or "mae", per channel value, in [-1, 1] units.
    :return: [N] float32 errors; NaN for an example whose mask covers everything (no kept pixel).
    """
    if metric not in ("mse", "mae"):
        raise ValueError(f"unknown metric {metric!r}; valid: mae, mse")
    diff = (x.float() - known.float()).abs()
    diff = diff.square() if metric == "mse" else diff
    keep = (1 - mask.float()).expand_as(diff)
    return (diff * keep).flatten(1).sum(dim=1) / keep.flatten(1).sum(dim=1)  # 0/0 = NaN when nothing is kept


def repaint_schedule(num_steps: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """RePaint's time schedule (Lugmayr et al. 2022 §4.2, Fig. 10) over chain positions K−1 … 0, then −1 (clean).

    Walks down one position at a time; on reaching each multiple of ``jump_length`` (below K − jump_length) it
    climbs back ``jump_length`` positions, ``jump_n_sample − 1`` times. Consecutive entries differ by one: a
    decrease is a reverse step, an increase a forward (re-noising) step.

    :return: the positions visited, starting at K−1 and ending at −1.
    """
    if jump_length < 1 or jump_n_sample < 1:
        raise ValueError(f"jump_length and jump_n_sample must be >= 1, got {jump_length}, {jump_n_sample}")
    jumps = {j: jump_n_sample - 1 for j in range(0, num_steps - jump_length, jump_length)}
    t, times = num_steps - 1, [num_steps - 1]
    while t >= 0:
        t -= 1
        times.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                times.append(t)
    return times


@torch.no_grad()
def sample_repaint(
    model: Model,
    x: Tensor,
    process: GaussianDiffusion,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    *,
    known: Tensor,
    mask: Tensor,
    sampler: str = "ddpm",
    eta: float | None = None,
    jump_length: int = 1,
    jump_n_sample: int = 1,
    generator: torch.Generator | None = None,
    clip_denoised: bool = False,
    dynamic_threshold: float | None = None,
) -> Tensor:
    """RePaint (Lugmayr et al. 2022 Alg. 1): inpaint with a denoiser that never saw a mask.

    Before every reverse step from position i the kept region of x is replaced by q_sample(known, i); between
    reverse steps the schedule of :func:`repaint_schedule` may re-noise x one position up, x_{i+1} ~
    N(√(1−β_{i+1}) x_i, β_{i+1} I) (the chain's own β, so respaced chains work). The replacement noise is fresh at
    every step for stochastic steps (the paper's); for deterministic DDIM (η = 0, no jumps) one ε is reused, so the
    kept region follows the same straight path x_i = √ᾱ_i known + √(1−ᾱ_i) ε that the ODE gives an exact
    denoiser (fresh noise there would contradict the sampler's own trajectory at the mask's edge).

    :param model: denoiser, called as ``model(x_t, original_timesteps, **extra_args)`` (guidance wrappers work).
    :param x: [N, C, H, W] starting noise at the chain's last position.
    :param process: the (respaced) chain.
    :param known: [N, C, H, W] the image being edited.
    :param mask: [N, 1, H, W] 1 = generate, 0 = keep (see :func:`validate_mask`).
    :param sampler: "ddpm" (ancestral, the paper's) or "ddim" (with ``eta``).
    :param eta: DDIM's η (None: 1, the ancestral variance); with "ddpm" it must be None (raises otherwise).
    :param jump_length, jump_n_sample: RePaint's j and r (1, 1: replacement only, no resampling; paper: 10, 10).
    :param generator: source of all noise.
    :return: [N, C, H, W] the final x̂₀ BEFORE the last replacement: its kept region is the model's own estimate
        (close to ``known``, not equal); :func:`composite` it with ``known`` for the edit.
    """
    if sampler not in REPAINT_SAMPLERS:
        raise ValueError(f"RePaint steps with sampler 'ddpm' or 'ddim' (eta > 0 for resampling), got {sampler!r}")
    if tuple(known.shape) != tuple(x.shape) or tuple(mask.shape) != (x.shape[0], 1, *x.shape[2:]):
        raise ValueError(f"known {tuple(known.shape)} and mask {tuple(mask.shape)} must be {tuple(x.shape)} and "
                         f"{(x.shape[0], 1, *x.shape[2:])}")
    if sampler == "ddpm" and eta is not None:
        raise ValueError(f"RePaint with sampler 'ddpm' takes no eta (got eta={eta}): use sampler 'ddim' for an η")
    eta = 1.0 if eta is None else float(eta)
    times = repaint_schedule(process.num_timesteps, jump_length, jump_n_sample)
    deterministic = sampler == "ddim" and eta == 0 and jump_n_sample == 1
    fixed_eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if deterministic else None
    keep = ~mask.bool()
    known = known.to(x.dtype)
    step: Callable[..., tuple[Tensor, Tensor]]
    step, options = (ddpm_step, {}) if sampler == "ddpm" else (ddim_step, {"eta": eta})
    pairs = list(zip(times[:-1], times[1:], strict=True))
    if progress:
        from tqdm.auto import tqdm

        pairs = tqdm(pairs)
    n_reverse = 0
    for i, nxt in pairs:
        if nxt > i:  # forward jump i → i+1 through q(x_{i+1} | x_i)
            beta = float(process.betas[nxt])
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = (x * math.sqrt(1 - beta)).add_(noise, alpha=math.sqrt(beta))
            continue
        x = torch.where(keep, process.q_sample(known, i, noise=fixed_eps, generator=generator), x)
        x, x0 = step(model, x, i, process, extra_args, generator=generator, clip_denoised=clip_denoised,
                     dynamic_threshold=dynamic_threshold, **options)
        if callback is not None:
            callback({"i": n_reverse, "t": i, "timestep": int(process.timestep_map[i]), "x": x, "pred_x0": x0})
        n_reverse += 1
    return x
