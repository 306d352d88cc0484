"""The checkpoint chain CLIP → prior → decoder → upsamplers: loading and validation before any sampling.

:func:`check_chain` compares the stages' metadata only (no weights), so a mismatch is reported in milliseconds
with both sides named: the prior and the decoder must have been trained against the very CLIP being chained
(same weights hash, same embedding size, same text width), and every upsampler must take the previous stage's
output size. :func:`load_chain` reads every checkpoint safely (``weights_only``), checks, and returns the
networks with their metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unclip.models.clip_embedder import FrozenCLIP
from unclip.models.decoder_sampling import load_decoder, load_upsampler
from unclip.models.prior_sampling import load_prior


class ChainError(ValueError):
    """Checkpoints that cannot be chained; the message names both sides."""


@dataclass
class Stage:
    """One loaded stage: its network (EMA weights, eval mode), its checkpoint metadata and where it came from."""

    net: Any
    meta: dict
    path: str


@dataclass
class Chain:
    clip: FrozenCLIP
    clip_path: str
    decoder: Stage
    prior: Stage | None = None
    upsamplers: list[Stage] = field(default_factory=list)

    @property
    def output_size(self) -> int:
        """Side of the final images: the last upsampler's, else the decoder's."""
        last = self.upsamplers[-1] if self.upsamplers else self.decoder
        return int(last.meta["image_size"])


def _short(value: Any) -> str:
    return str(value)[:12] if value is not None else "unknown"


def _check_clip_pair(what: str, path: str, meta: dict, clip: dict, clip_path: str) -> None:
    """A prior or decoder must be trained against this CLIP (hash and embedding size)."""
    if int(meta["embed_dim"]) != int(clip["embed_dim"]):
        raise ChainError(f"{what} {path} works on {meta['embed_dim']}-d CLIP embeddings, but the CLIP "
                         f"{clip_path} has embed_dim {clip['embed_dim']}")
    if meta.get("clip_hash") is None:
        raise ChainError(f"{what} {path} does not record which CLIP it was trained against (no clip_hash); "
                         f"it cannot be checked against {clip_path}")
    if str(meta["clip_hash"]) != str(clip["clip_hash"]):
        raise ChainError(f"{what} {path} was trained against CLIP {_short(meta['clip_hash'])}, but the CLIP "
                         f"{clip_path} is {_short(clip['clip_hash'])}")


def check_chain(clip: dict, clip_path: str, decoder: dict, decoder_path: str, prior: dict | None = None,
                prior_path: str | None = None, upsamplers: Sequence[tuple[dict, str]] = ()) -> None:
    """Refuse checkpoints that do not fit together, naming both sides.

    :param clip: CLIP metadata with ``embed_dim``, ``clip_hash``, ``text_width`` (``FrozenCLIP.meta`` plus width).
    :param decoder, prior: their checkpoint metadata (``checkpoint["unclip"]``).
    :param upsamplers: ``(meta, path)`` in cascade order.
    :raises ChainError: on the first mismatch.
    """
    if prior is not None:
        _check_clip_pair("the prior", str(prior_path), prior, clip, clip_path)
        if int(prior["text_width"]) != int(clip["text_width"]):
            raise ChainError(f"the prior {prior_path} reads {prior['text_width']}-wide caption tokens, but the "
                             f"CLIP {clip_path} encodes them {clip['text_width']} wide")
    _check_clip_pair("the decoder", decoder_path, decoder, clip, clip_path)
    text = decoder.get("model_config", {}).get("text")
    if decoder.get("text_conditioning") and text and int(text["input_width"]) != int(clip["text_width"]):
        raise ChainError(f"the decoder {decoder_path} reads {text['input_width']}-wide caption tokens, but the "
                         f"CLIP {clip_path} encodes them {clip['text_width']} wide")
    size, source = int(decoder["image_size"]), f"the decoder {decoder_path}"
    for k, (meta, path) in enumerate(upsamplers):
        if int(meta["input_size"]) != size:
            raise ChainError(f"upsampler {k} {path} takes {meta['input_size']}px inputs, but {source} outputs "
                             f"{size}px images")
        size, source = int(meta["image_size"]), f"upsampler {k} {path}"


def clip_chain_meta(clip: FrozenCLIP) -> dict:
    """What :func:`check_chain` needs of a loaded CLIP."""
    return {"embed_dim": clip.embed_dim, "clip_hash": clip.clip_hash, "text_width": clip.text_width}


def load_chain(clip: str | Path, decoder: str | Path, prior: str | Path | None = None,
               upsamplers: Sequence[str | Path] = (), device: str | torch.device = "cpu") -> Chain:
    """Load and validate a chain of checkpoints (EMA weights, eval mode, on ``device``).

    :param clip: a clip-stage checkpoint or an ``export_open_clip`` folder.
    :param decoder: a decoder-stage checkpoint.
    :param prior: a prior-stage checkpoint (None: image-conditioned use only — variations, interpolations).
    :param upsamplers: upsampler-stage checkpoints in cascade order.
    :raises ChainError: when the checkpoints do not fit together; ValueError for another stage's checkpoint.
    """
    frozen = FrozenCLIP.from_path(clip, device)
    decoder_stage = Stage(*load_decoder(decoder, device), path=str(decoder))
    prior_stage = Stage(*load_prior(prior, device), path=str(prior)) if prior is not None else None
    upsampler_stages = [Stage(*load_upsampler(p, device), path=str(p)) for p in upsamplers]
    check_chain(clip_chain_meta(frozen), str(clip), decoder_stage.meta, decoder_stage.path,
                prior_stage.meta if prior_stage else None, prior_stage.path if prior_stage else None,
                [(s.meta, s.path) for s in upsampler_stages])
    return Chain(clip=frozen, clip_path=str(clip), decoder=decoder_stage, prior=prior_stage,
                 upsamplers=upsampler_stages)
