"""Using a trained prior: load it from a checkpoint (EMA weights) and sample CLIP image embeddings z_i from captions.

    model, info = load_prior("runs/prior/.../checkpoints/last.ckpt")
    info.check(ClipInfo.of(clip))                                      # the pipeline's CLIP must be the prior's
    process = create_diffusion(**info.diffusion)
    z_i = sample_prior(model, clip.embed_text(tokens), process, **info.sampling)   # [B, D] unit norm

Sampling follows §2.2: 64 strided steps by default (``unclip.stages.PRIOR_SAMPLING``), classifier-free guidance
through the network's ``cond_drop_mask``, and N candidates per caption of which the one with the larger dot
product with z_t is kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from unclip.diffusion import GaussianDiffusion, classifier_free_guidance, sample
from unclip.diffusion.samplers import sampler_eta
from unclip.models.prior import PriorTransformer
from unclip.stages import PRIOR_SAMPLING, PriorInfo

TEXT_KEYS = ("text_embed", "text_tokens", "text_mask")  # what the prior conditions on


def rerank(candidates: Tensor, text_embed: Tensor) -> Tensor:
    """Keep, per caption, the candidate with the largest dot product with z_t (§2.2).

    :param candidates: [B, N, D] candidate image embeddings.
    :param text_embed: [B, D] text embeddings z_t.
    :return: [B, D] the chosen candidates.
    """
    scores = torch.einsum("bnd,bd->bn", candidates.float(), text_embed.float())  # [B, N]
    best = scores.argmax(dim=1)  # [B]
    return candidates[torch.arange(candidates.shape[0], device=candidates.device), best]


@torch.no_grad()
def sample_prior(model: Any, cond: Mapping[str, Tensor], process: GaussianDiffusion,
                 sampler: str = PRIOR_SAMPLING["sampler"], steps: int | str | None = PRIOR_SAMPLING["steps"],
                 guidance_scale: float = PRIOR_SAMPLING["guidance_scale"],
                 candidates: int = PRIOR_SAMPLING["candidates"], generator: torch.Generator | None = None,
                 **sampler_kwargs: Any) -> Tensor:
    """Sample unit-norm CLIP image embeddings for captions.

    :param model: a :class:`PriorTransformer` (or anything with its call signature, ``embed_dim`` and ``unscale``).
    :param cond: ``{"text_embed": [B, D], "text_tokens": [B, ctx, W_t], "text_mask": [B, ctx] bool}`` (other
        keys, e.g. ``image_embed``, are ignored).
    :param process: the prior's training process (1000-step cosine chain, mean_type x0).
    :param sampler: a name of ``unclip.diffusion.SAMPLERS`` (ddpm, ddim, dpmpp_2m, heun).
    :param steps: respacing of ``process`` (64 strided steps in §2.2); None samples on ``process`` as given.
    :param guidance_scale: classifier-free guidance scale (1: conditional model only, one forward per step).
    :param candidates: samples drawn per caption; the one closest to z_t is kept (2 in §2.2).
    :param generator: source of x_T and of any sampler noise (on the conditioning's device).
    :param sampler_kwargs: passed to the sampler (e.g. ``eta`` for ddim, ``progress``); a zero ``eta`` is
        dropped for the other samplers (so a prior's ``info.sampling`` can be passed whole), a non-zero one refused.
    :return: [B, D] float32 unit-norm image embeddings (embed scale undone).
    """
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    if "eta" in sampler_kwargs:
        sampler_kwargs["eta"] = sampler_eta(sampler, sampler_kwargs["eta"])
    missing = [k for k in TEXT_KEYS if k not in cond]
    if missing:
        raise KeyError(f"prior conditioning lacks {missing}; it needs {list(TEXT_KEYS)}")
    text_embed = cond["text_embed"]
    b = text_embed.shape[0]
    extra = {k: cond[k].repeat_interleave(candidates, dim=0) for k in TEXT_KEYS}  # [B·N, ...]
    chain = process if steps is None else process.respace(steps)
    # The caption prefix is encoded once per run (it does not depend on x_t or t); guidance batches cond + null.
    net = model.with_cached_prefix() if hasattr(model, "with_cached_prefix") else model
    guided = classifier_free_guidance(net, guidance_scale, drop_key="cond_drop_mask")
    x = sample(guided, (b * candidates, model.embed_dim), chain, sampler, extra, generator=generator,
               device=text_embed.device, dtype=torch.float32, **sampler_kwargs)  # [B·N, D] diffusion space
    z = F.normalize(model.unscale(x).float(), dim=-1).view(b, candidates, -1)  # [B, N, D]
    return rerank(z, text_embed)


def load_prior(path: str | Path, device: str | torch.device = "cpu") -> tuple[PriorTransformer, PriorInfo]:
    """The EMA network of a prior-stage checkpoint, in eval mode, and its :class:`~unclip.stages.PriorInfo`.

    Loads with ``torch.load(weights_only=True)`` and refuses other stages' checkpoints.

    :param path: a prior-stage Lightning checkpoint (``run_dir/checkpoints/last.ckpt``).
    """
    return PriorInfo.load(path, device)  # type: ignore[return-value]
