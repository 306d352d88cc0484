"""A frozen CLIP that turns images and captions into what the prior and decoder condition on.

* ``embed_images``: unit-norm CLIP image embeddings z_i [B, D] from unclip images in [-1, 1].
* ``embed_text``: unit-norm text embeddings z_t [B, D], plus the caption's per-token encodings from the
  last text-transformer layer (after ``ln_final``, before pooling) [B, ctx, width] and their padding
  mask [B, ctx] (True for real tokens), which the prior and the decoder attend to (§2, docs/paper.md).

Unit norm is the paper's convention; the prior scales embeddings by a config factor (17.2) itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unclip.models.clip import describe_clip, load_clip, make_tokenizer, to_clip_pixels


class FrozenCLIP(nn.Module):
    """Wraps a trained open_clip ``CLIP`` for embedding; no parameter trains.

    :param model: an ``open_clip.CLIP`` (the text tower must be open_clip's own causal transformer).
    :param tokenizer: callable list[str] -> LongTensor [B, ctx].
    :param meta: ``load_clip``'s metadata (``embed_dim``, ``image_size``, ``image_mean``, ``image_std``,
        ``clip_hash``, ...).
    """

    mean: Tensor  # [1, 3, 1, 1] the image normalisation (non-persistent buffers)
    std: Tensor

    def __init__(self, model: nn.Module, tokenizer: Any, meta: dict):
        super().__init__()
        if not isinstance(model, open_clip.CLIP):
            raise TypeError(f"FrozenCLIP needs open_clip.CLIP with its own text transformer, got "
                            f"{type(model).__name__}: per-token text encodings are read from its layers")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.meta = dict(meta)
        self.register_buffer("mean", torch.tensor(meta["image_mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(meta["image_std"]).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_path(cls, path: str | Path | Mapping[str, Any], device: str | torch.device = "cpu") -> FrozenCLIP:
        """Load from any ``clip_ckpt`` spelling: a clip-stage checkpoint, an export or open_clip folder,
        ``ARCH:weights`` (see ``load_clip``)."""
        model, tokenizer, meta = load_clip(path, device)
        return cls(model, tokenizer, meta).to(device)

    @property
    def embed_dim(self) -> int:
        return int(self.meta["embed_dim"])

    @property
    def text_width(self) -> int:
        return int(self.model.transformer.width)

    @property
    def context_length(self) -> int:
        return int(self.model.context_length)

    @property
    def clip_hash(self) -> str:
        return str(self.meta["clip_hash"])

    def train(self, mode: bool = True) -> FrozenCLIP:
        return super().train(False)  # frozen: dropout and friends stay off whatever the parent does

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """:param images: [B, 3, H, W] in [-1, 1], any size (resized to CLIP's input size).
        :return: [B, D] unit-norm image embeddings z_i."""
        size = int(self.meta["image_size"])
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        return F.normalize(self.model.encode_image(to_clip_pixels(images, self.mean, self.std)).float(), dim=-1)

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(captions)).to(self.mean.device)

    @torch.no_grad()
    def embed_text(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Follows ``open_clip.CLIP.encode_text`` and also keeps the per-token sequence.

        :param tokens: [B, ctx] int64 token ids (``tokenize``).
        :return: ``{"text_embed": [B, D] unit norm, "text_tokens": [B, ctx, width] float32,
            "text_mask": [B, ctx] bool, True for tokens up to and including end-of-text}``.
        """
        m = self.model
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast) + m.positional_embedding.to(cast)
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))  # [B, ctx, width]
        pooled = open_clip.transformer.text_global_pool(x, tokens, m.text_pool_type,
                                                        eos_token_id=getattr(m, "text_eos_id", None))
        if m.text_projection is not None:
            projection = m.text_projection
            pooled = projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection
        # The causal text tower pools at end-of-text (argmax id); tokens after it are padding.
        end = tokens.argmax(dim=-1, keepdim=True)
        mask = torch.arange(tokens.shape[1], device=tokens.device)[None] <= end
        return {"text_embed": F.normalize(pooled.float(), dim=-1), "text_tokens": x.float(), "text_mask": mask}


def clip_meta(clip_ckpt: str | Path | Mapping[str, Any]) -> dict:
    """A CLIP's metadata without building the model (for tokenizers, sizes and chain checks): any ``clip_ckpt``
    spelling, see ``unclip.models.clip.describe_clip``."""
    return describe_clip(clip_ckpt)


def tokenizer_for(clip_ckpt: str | None):
    """``data.tokenizer`` for stages chained after a CLIP: its tokenizer, or None without a checkpoint
    (a stage reading precomputed embeddings needs no tokens)."""
    if clip_ckpt is None:
        return None
    meta = clip_meta(clip_ckpt)
    return make_tokenizer(meta["tokenizer"], int(meta["context_length"]))
