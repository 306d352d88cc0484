"""Using a trained prior: load it from a checkpoint (EMA weights) and sample CLIP image embeddings z_i from captions.

    model, meta = load_prior("runs/prior/.../checkpoints/last.ckpt")
    check_prior_clip(meta, clip.clip_hash, clip.embed_dim)           # the pipeline's CLIP must be the prior's
    process = create_diffusion(**meta["diffusion"])
    z_i = sample_prior(model, clip.embed_text(tokens), process, steps=64, candidates=2)   # [B, D] unit norm

Sampling follows §2.2: 64 strided steps by default, classifier-free guidance through the network's
``cond_drop_mask``, and N candidates per caption of which the one with the larger dot product with z_t is kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from unclip.checkpoints import read_checkpoint, stage_metadata
from unclip.diffusion import GaussianDiffusion, classifier_free_guidance, sample
from unclip.models.prior import PriorTransformer

STAGE = "prior"
TEXT_KEYS = ("text_embed", "text_tokens", "text_mask")  # what the prior conditions on
EMA_PREFIX = "ema.module."  # the EMA network's keys in a prior-stage Lightning checkpoint


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
def sample_prior(model: Any, cond: Mapping[str, Tensor], process: GaussianDiffusion, sampler: str = "ddim",
                 steps: int | str | None = 64, guidance_scale: float = 1.0, candidates: int = 2,
                 generator: torch.Generator | None = None, **sampler_kwargs: Any) -> Tensor:
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
    :param sampler_kwargs: passed to the sampler (e.g. ``eta`` for ddim, ``progress``).
    :return: [B, D] float32 unit-norm image embeddings (embed scale undone).
    """
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
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


def load_prior(path: str | Path, device: str | torch.device = "cpu") -> tuple[PriorTransformer, dict]:
    """The EMA network of a prior-stage checkpoint, in eval mode, and the checkpoint's metadata.

    Loads with ``torch.load(weights_only=True)`` and refuses other stages' checkpoints.

    :param path: a prior-stage Lightning checkpoint (``run_dir/checkpoints/last.ckpt``).
    :return: ``(model, meta)``; ``meta`` has ``embed_dim``, ``clip_hash``, ``embed_scale``, ``text_width``,
        ``context_length``, ``clip_context_length``, ``model_config`` and ``diffusion`` (create_diffusion kwargs).
    """
    checkpoint = read_checkpoint(path)
    meta = stage_metadata(checkpoint, path, STAGE)
    state = {k[len(EMA_PREFIX):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(EMA_PREFIX)}
    if not state:
        raise ValueError(f"{path} holds no EMA weights ('{EMA_PREFIX}*' keys)")
    model = PriorTransformer.from_config(meta["model_config"])
    model.load_state_dict(state, strict=True)
    return model.to(device).eval().requires_grad_(False), meta


def check_prior_clip(meta: Mapping[str, Any], clip_hash: str, embed_dim: int, what: str = "the pipeline's CLIP") -> None:
    """Refuse a prior trained against another CLIP, naming both sides.

    :param meta: ``load_prior``'s metadata.
    :param clip_hash, embed_dim: the CLIP the prior is about to be chained with.
    :raises ValueError: when the hashes or embedding sizes differ.
    """
    if int(meta["embed_dim"]) != int(embed_dim) or str(meta["clip_hash"]) != str(clip_hash):
        raise ValueError(f"the prior was trained against CLIP {str(meta['clip_hash'])[:12]} (embed_dim "
                         f"{meta['embed_dim']}), but {what} is {str(clip_hash)[:12]} (embed_dim {embed_dim})")
