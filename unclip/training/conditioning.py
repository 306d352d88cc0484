"""What the prior and decoder condition on, from precomputed embeddings or a frozen CLIP on the fly.

``ClipConditioner(batch)`` returns ``{"image_embed", "text_embed", "text_tokens", "text_mask"}``:
taken from the batch when the data module attached precomputed embeddings (``data.embeddings``), else
computed by the frozen CLIP of ``clip_ckpt`` from ``batch["image"]`` and ``batch["tokens"]``. The CLIP is
loaded lazily (``load()``, called from the stage's ``setup``), so building a module, e.g. on the meta
device for a dry run, reads no checkpoint, and it is kept out of the stage's own state dict.

Embeddings stored without the caption's per-token encodings (``unclip-embed store_token_encodings=false``) carry
the caption's token ids: their encodings are recomputed under no_grad by the frozen CLIP's text tower on the
batch's device, from ``clip_ckpt`` when given, else from the ``clip_source`` the folder's meta.json records;
either way its weights hash must be the folder's. Stored z_i and z_t are used as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unclip.config import ConfigError
from unclip.data.embeddings import TOKEN_IDS, read_meta, stores_token_encodings
from unclip.models.clip import describe_clip
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
        self.recompute = False  # True: the embeddings hold caption ids whose encodings the text tower recomputes
        self._clip: list[FrozenCLIP] = []  # a list keeps the CLIP out of state_dict and module traversal

    def load(self) -> ClipInfo:
        """Read the sources, check that they agree, and return the CLIP's facts."""
        if self.info is not None:
            return self.info
        meta = read_meta(self.embeddings) if self.embeddings else None
        emb = ClipInfo.from_meta(meta) if meta is not None else None
        self.recompute = meta is not None and self.need_text_tokens and not stores_token_encodings(meta)
        if self.clip_ckpt is not None:
            clip = FrozenCLIP.from_path(self.clip_ckpt)
            self._clip.append(clip)
            info = ClipInfo.of(clip)
            if emb is not None:
                refuse_disagreement(info, f"clip_ckpt={self.clip_ckpt}", emb, f"data.embeddings={self.embeddings}")
        else:
            assert emb is not None and meta is not None
            info = emb
            if self.recompute:
                self._clip.append(load_recorded_clip(str(self.embeddings), meta))
        if self.recompute:
            self._clip[0].model.visual = None  # batches carry z_i: only the text tower is used (and moved)
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
            if self.need_text_tokens and "text_tokens" in batch:
                out["text_tokens"] = batch["text_tokens"].float()
                out["text_mask"] = batch["text_mask"].bool()
            elif self.need_text_tokens:
                out.update(self.encode_captions(batch))
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


    def encode_captions(self, batch: dict) -> dict[str, torch.Tensor]:
        """Recompute stored captions' encodings from their ids on the ids' device (the text tower only).

        :return: ``{"text_tokens": [B, ctx, W] f32, "text_mask": [B, ctx] bool}``.
        """
        if TOKEN_IDS not in batch:
            raise ValueError(f"data.embeddings={self.embeddings}: batches carry neither text_tokens nor {TOKEN_IDS}")
        self.load()
        if not self._clip:
            raise ConfigError(f"data.embeddings={self.embeddings} stores caption ids only: set clip_ckpt")
        clip = self._clip[0]
        ids = batch[TOKEN_IDS].long()
        if clip.mean.device != ids.device:
            clip.to(ids.device)
        text = clip.embed_text(ids)
        return {"text_tokens": text["text_tokens"], "text_mask": text["text_mask"]}


def recorded_clip_source(embeddings: str, meta: dict) -> str:
    """The CLIP an ids-only embeddings folder was made with (meta.json's ``clip_source``).

    :raises ConfigError: naming ``clip_ckpt`` when the folder records none or it cannot be read.
    """
    source = meta.get("clip_source")
    hint = (f"data.embeddings={embeddings} stores caption token ids only (unclip-embed store_token_encodings=false) "
            f"and their encodings are recomputed with the CLIP's text tower")
    if not source:
        raise ConfigError(f"{hint}, but its meta.json records no clip_source: set clip_ckpt to the CLIP it was "
                          f"made with (clip_hash {str(meta.get('clip_hash'))[:12]})")
    try:
        describe_clip(source)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"{hint}, but its recorded clip_source={source} cannot be read ({exc}): set clip_ckpt to "
                          f"the CLIP it was made with, or re-embed with store_token_encodings=true") from exc
    return str(source)


def load_recorded_clip(embeddings: str, meta: dict) -> FrozenCLIP:
    """Load the CLIP meta.json records (on the CPU) and check its weights hash against the folder's."""
    source = recorded_clip_source(embeddings, meta)
    clip = FrozenCLIP.from_path(source)
    if meta.get("clip_hash") not in (None, clip.clip_hash):
        raise ConfigError(f"data.embeddings={embeddings} was made with clip_hash={meta['clip_hash']} but its recorded "
                          f"clip_source={source} now has clip_hash={clip.clip_hash}: set clip_ckpt to the CLIP it was "
                          f"made with")
    return clip


def refuse_disagreement(clip: ClipInfo, clip_source: str, embeddings: ClipInfo, embeddings_source: str) -> None:
    """Precomputed embeddings must come from the CLIP given beside them (embedding size and weights hash)."""
    found = embeddings.disagreement(clip)
    if found is not None:
        key, theirs, ours = found
        raise ConfigError(f"{embeddings_source} was made with {key}={theirs} but {clip_source} has {key}={ours}")
