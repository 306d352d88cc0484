"""The checkpoint chain CLIP → prior → decoder → upsamplers: loading and validation before any sampling.

:func:`check_chain` compares the stages' descriptions only (no weights), so a mismatch is reported in milliseconds
with both sides named; the rules are the stages' own (``check`` of :mod:`unclip.stages`): the prior and the decoder
must have been trained against the very CLIP being chained (same weights hash, embedding size, text width and
context), and every upsampler must take the previous stage's output size. :func:`load_chain` reads every
checkpoint safely (``weights_only``), checks, and returns the networks with their descriptions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from unclip.models.clip_embedder import FrozenCLIP
from unclip.stages import ClipInfo, ContractError, DecoderInfo, PriorInfo, StageInfo, UpsamplerInfo


class ChainError(ContractError):
    """Checkpoints that cannot be chained; the message names both sides."""


_Info = TypeVar("_Info", bound=StageInfo)


@dataclass
class Stage(Generic[_Info]):
    """One loaded stage: its network (EMA weights, eval mode), its description and where it came from."""

    net: Any
    info: _Info
    path: str

    @property
    def meta(self) -> dict:
        """The description as its ``checkpoint["unclip"]`` dict (read ``info`` instead)."""
        return self.info.to_meta()


@dataclass
class Chain:
    clip: FrozenCLIP
    clip_path: str
    decoder: Stage[DecoderInfo]
    prior: Stage[PriorInfo] | None = None
    upsamplers: list[Stage[UpsamplerInfo]] = field(default_factory=list)

    @property
    def output_size(self) -> int:
        """Side of the final images: the last upsampler's, else the decoder's."""
        last: Stage[DecoderInfo] | Stage[UpsamplerInfo] = self.upsamplers[-1] if self.upsamplers else self.decoder
        return last.info.image_size


def check_chain(clip: ClipInfo, clip_path: str, decoder: DecoderInfo, decoder_path: str,
                prior: PriorInfo | None = None, prior_path: str | None = None,
                upsamplers: Sequence[tuple[UpsamplerInfo, str]] = ()) -> None:
    """Refuse stages that do not fit together, naming both sides.

    :param clip: the CLIP being chained (``ClipInfo.of(frozen_clip)``).
    :param decoder, prior: their descriptions; ``upsamplers``: ``(description, path)`` in cascade order.
    :raises ChainError: on the first mismatch.
    """
    the_clip = f"the CLIP {clip_path}"
    try:
        if prior is not None:
            prior.check(clip, f"the prior {prior_path}", the_clip)
        decoder.check(clip, f"the decoder {decoder_path}", the_clip)
        previous: DecoderInfo | UpsamplerInfo = decoder
        source = f"the decoder {decoder_path}"
        for k, (info, path) in enumerate(upsamplers):
            info.check(previous, f"upsampler {k} {path}", source)
            previous, source = info, f"upsampler {k} {path}"
    except ContractError as exc:
        raise ChainError(str(exc)) from None


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
    decoder_stage = Stage(*DecoderInfo.load(decoder, device), path=str(decoder))
    prior_stage = Stage(*PriorInfo.load(prior, device), path=str(prior)) if prior is not None else None
    upsampler_stages = [Stage(*UpsamplerInfo.load(p, device), path=str(p)) for p in upsamplers]
    prior_info = prior_stage.info if prior_stage else None
    check_chain(ClipInfo.of(frozen), str(clip), decoder_stage.info, decoder_stage.path,
                prior_info, prior_stage.path if prior_stage else None,
                [(s.info, s.path) for s in upsampler_stages])
    return Chain(clip=frozen, clip_path=str(clip), decoder=decoder_stage, prior=prior_stage,
                 upsamplers=upsampler_stages)
