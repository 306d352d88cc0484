"""What the prior and decoder condition on, from precomputed embeddings or a frozen CLIP on the fly.

``ClipConditioner(batch)`` returns ``{"image_embed", "text_embed", "text_tokens", "text_mask"}``:
taken from the batch when the data module attached precomputed embeddings (``data.embeddings``), else
computed by the frozen CLIP of ``clip_ckpt`` from ``batch["image"]`` and ``batch["tokens"]``. The CLIP is
loaded lazily (``load()``, called from the stage's ``setup``), so building a module, e.g. on the meta
device for a dry run, reads no checkpoint, and it is kept out of the stage's own state dict.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unclip.config import ConfigError
from unclip.data.embeddings import read_meta
from unclip.models.clip_embedder import FrozenCLIP
from unclip.stages import ClipInfo


class ClipConditioner(nn.Module):
    """:param clip_ckpt: clip-stage checkpoint or export (None when only embeddings are read).
    :param embeddings: folder written by ``unclip-embed`` (None to embed on the fly).
    :param need_text_tokens: whether callers use the caption's per-token encodings.
    """

    def __init__(self, clip_ckpt: str | None, embeddings: str | None, need_text_tokens: bool):
        super().__init__()
        if clip_ckpt is None and embeddings is None:
            raise ConfigError("this stage needs CLIP embeddings: set clip_ckpt (embed on the fly) or "
                              "data.embeddings (precomputed by unclip-embed)")
        self.clip_ckpt = clip_ckpt
        self.embeddings = embeddings
        self.need_text_tokens = need_text_tokens
        self.info: ClipInfo | None = None
        self._clip: list[FrozenCLIP] = []  # a list keeps the CLIP out of state_dict and module traversal

    def load(self) -> ClipInfo:
        """Read the sources, check that they agree, and return the CLIP's facts."""
        if self.info is not None:
            return self.info
        emb = ClipInfo.from_meta(read_meta(self.embeddings)) if self.embeddings else None
        if self.clip_ckpt is not None:
            clip = FrozenCLIP.from_path(self.clip_ckpt)
            self._clip.append(clip)
            info = ClipInfo.of(clip)
            if emb is not None:
                refuse_disagreement(info, f"clip_ckpt={self.clip_ckpt}", emb, f"data.embeddings={self.embeddings}")
        else:
            assert emb is not None
            info = emb
        self.info = info
        return info

    @property
    def embed_dim(self) -> int:
        return self.load().embed_dim

    @property
    def text_width(self) -> int:
        return int(self.load().text_width)  # type: ignore[arg-type]

    @property
    def context_length(self) -> int:
        return int(self.load().context_length)  # type: ignore[arg-type]

    @property
    def clip_hash(self) -> str:
        return str(self.load().clip_hash)

    @property
    def clip(self) -> FrozenCLIP:
        self.load()
        if not self._clip:
            raise ConfigError("embedding on the fly needs clip_ckpt (only data.embeddings was given)")
        return self._clip[0]

    @torch.no_grad()
    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """:return: ``{"image_embed": [B, D] f32 unit norm, "text_embed": [B, D] f32 unit norm,
        "text_tokens": [B, ctx, W] f32, "text_mask": [B, ctx] bool}`` (text_tokens/mask only when needed)."""
        if "image_embed" in batch:
            out = {"image_embed": F.normalize(batch["image_embed"].float(), dim=-1),
                   "text_embed": F.normalize(batch["text_embed"].float(), dim=-1)}
            if self.need_text_tokens:
                out["text_tokens"] = batch["text_tokens"].float()
                out["text_mask"] = batch["text_mask"].bool()
            return out
        if "tokens" not in batch or "image" not in batch:
            raise ValueError("embedding on the fly needs batch['image'] and batch['tokens'] "
                             "(set data.tokenizer to the CLIP's tokenizer)")
        clip = self.clip
        device = batch["image"].device
        if clip.mean.device != device:
            clip.to(device)
        text = clip.embed_text(batch["tokens"].to(device))
        out = {"image_embed": clip.embed_images(batch["image"]), "text_embed": text["text_embed"]}
        if self.need_text_tokens:
            out.update(text_tokens=text["text_tokens"], text_mask=text["text_mask"])
        return out


def refuse_disagreement(clip: ClipInfo, clip_source: str, embeddings: ClipInfo, embeddings_source: str) -> None:
    """Precomputed embeddings must come from the CLIP given beside them (embedding size and weights hash)."""
    found = embeddings.disagreement(clip)
    if found is not None:
        key, theirs, ours = found
        raise ConfigError(f"{embeddings_source} was made with {key}={theirs} but {clip_source} has {key}={ours}")
