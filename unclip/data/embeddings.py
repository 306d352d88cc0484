"""Precomputed CLIP embeddings stored beside the shards, one file per shard, aligned by sample key.

Layout of an embeddings folder (written by ``unclip-embed``)::

    EMB_DIR/meta.json            {"clip_hash", "clip_source", "embed_dim", "text_width", "context_length",
                                  "store_token_encodings", ...}
    EMB_DIR/<folder>__<stem>.npz keys [N] str, image_embed [N, D] f16, text_embed [N, D] f16,
                                 text_ids [N, ctx] uint16/int32 (the caption's token ids),
                                 and with store_token_encodings: text_tokens [N, ctx, W] f16, text_mask [N, ctx] bool
    EMB_DIR/<folder>__<stem>.json  {"shard": the shard it was made from, "clip_hash", "samples",
                                    "fingerprint": {"name", "bytes", "samples"} of that shard, ...}

A file is named by the shard's folder and stem (``train/00000.tar`` -> ``train__00000``), so that
splits sharing shard names (train/00000.tar, val/00000.tar) never share a file; the reader also
checks the sidecar's shard against the one it reads, and its fingerprint (name and byte size; the
sample count too in :func:`check_embeddings` with ``count_samples``): a re-sharded folder keeps its
shard names but not their sizes, and stale embeddings would silently pair with the wrong captions.

The caption's per-token encodings are W = 1024 float16 numbers per position (158 KB a sample at the paper's
sizes, ~100 TB for 650M pairs): by default only the token ids are stored (a few KB a sample with z_i and z_t)
and the training stage recomputes the encodings with the frozen CLIP's text tower (``ClipConditioner``).
Folders written before ``text_ids`` existed hold encodings only and keep working.

Files are numpy archives read with ``allow_pickle=False``: nothing in them can run code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from unclip.checkpoints import atomic_write, atomic_write_json

META_FILE = "meta.json"
EMBEDS = ("image_embed", "text_embed")
TOKEN_IDS = "text_ids"
ENCODINGS = ("text_tokens", "text_mask")
ARRAYS = (*EMBEDS, TOKEN_IDS, *ENCODINGS)  # every array a file may hold besides keys


def stores_token_encodings(meta: dict) -> bool:
    """Whether a folder's files hold the caption encodings (True for folders made before this was optional)."""
    return bool(meta.get("store_token_encodings", True))


def required_arrays(store_token_encodings: bool) -> tuple[str, ...]:
    """The arrays every file of a folder holds: z_i, z_t and the ids, plus the encodings when stored."""
    return (*EMBEDS, TOKEN_IDS, *ENCODINGS) if store_token_encodings else (*EMBEDS, TOKEN_IDS)


def ids_dtype(vocab_size: int) -> np.dtype:
    """The smallest integer type of a tokenizer's ids (uint16 for CLIP's 49408-token BPE)."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)


def _last_parts(shard_url: str) -> tuple[str, str]:
    """(folder, stem) of a shard path or URL: ``/data/train/00012.tar`` -> ("train", "00012")."""
    parts = shard_url.rstrip("/").split("/")
    name = parts[-1][: -len(".tar")] if parts[-1].endswith(".tar") else parts[-1]
    return (parts[-2] if len(parts) > 1 else ""), name


def shard_stem(shard_url: str) -> str:
    """The name a shard's embedding files take: ``.../train/00012.tar`` -> ``train__00012``."""
    folder, name = _last_parts(shard_url)
    return f"{folder}__{name}" if folder else name


def embedding_path(emb_dir: str | Path, shard_url: str) -> Path:
    return Path(emb_dir) / f"{shard_stem(shard_url)}.npz"


def write_meta(emb_dir: str | Path, meta: dict) -> None:
    """Write meta.json atomically (several ranks may write the same content at once)."""
    atomic_write_json(Path(emb_dir) / META_FILE, meta)


def read_meta(emb_dir: str | Path) -> dict:
    """The folder's meta.json; raises FileNotFoundError naming the folder when there is none."""
    path = Path(emb_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{emb_dir} holds no {META_FILE}: not an unclip-embed output folder")
    return json.loads(path.read_text())


def write_shard_embeddings(path: str | Path, keys: list[str], arrays: dict[str, np.ndarray]) -> None:
    """Write one shard's embeddings atomically (temp file + rename): a killed run leaves no partial file.

    :param keys: sample keys, one per row of every array.
    :param arrays: ``EMBEDS`` and the caption (``text_ids``, or ``text_tokens`` and ``text_mask``, or both),
        N rows each.
    """
    path = Path(path)
    caption = (TOKEN_IDS,) if TOKEN_IDS in arrays or not set(ENCODINGS) & set(arrays) else ENCODINGS
    missing = [name for name in (*EMBEDS, *caption) if name not in arrays]
    if missing:
        raise ValueError(f"embeddings for {path.name} lack {missing}")
    bad = {name: a.shape[0] for name, a in arrays.items() if a.shape[0] != len(keys)}
    if bad:
        raise ValueError(f"embeddings for {path.name}: {len(keys)} keys but rows {bad}")
    atomic_write(path, lambda f: np.savez(f, allow_pickle=False, keys=np.asarray(keys, dtype=str), **arrays))


def load_shard_embeddings(path: str | Path) -> dict[str, np.ndarray]:
    """Load one shard's embeddings; ``{"keys": [N] str, <array name>: [N, ...]}``."""
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def shard_fingerprint(shard_url: str, samples: int | None = None) -> dict:
    """``{"name", "bytes", "samples"}`` of a shard (bytes None for remote URLs, which are not stat'ed)."""
    local = not (shard_url.startswith("pipe:") or "://" in shard_url)
    return {"name": shard_url.rstrip("/").rsplit("/", 1)[-1], "bytes": os.path.getsize(shard_url) if local else None,
            "samples": samples}


def fingerprint_mismatch(recorded: dict | None, shard_url: str, samples: int | None = None) -> str | None:
    """Why a sidecar's fingerprint does not describe the shard as it is now (None: it does, or none recorded)."""
    if not recorded:
        return None
    now = shard_fingerprint(shard_url, samples)
    for key in ("name", "bytes", "samples"):
        if recorded.get(key) is not None and now[key] is not None and recorded[key] != now[key]:
            return f"its {key} was {recorded[key]} when embedded and is {now[key]} now"
    return None


def check_embeddings(emb_dir: str | Path, shard_urls: list[str], count_samples=None) -> None:
    """Refuse training on shards without embeddings, or whose embeddings were made from another version.

    :param count_samples: ``url -> samples`` (e.g. ``unclip.data.partition.count_samples``) to compare member
        counts too; None compares names and byte sizes only (a stat per shard).
    :raises ValueError: naming up to three shards and what is wrong with each.
    """
    problems = []
    for url in shard_urls:
        path = embedding_path(emb_dir, url)
        if not path.is_file():
            problems.append(f"{url}: no {path.name} (run unclip-embed on it)")
            continue
        sidecar = path.with_suffix(".json")
        recorded = json.loads(sidecar.read_text()).get("fingerprint") if sidecar.is_file() else None
        why = fingerprint_mismatch(recorded, url, count_samples(url) if count_samples and recorded else None)
        if why:
            problems.append(f"{url}: {why} (re-sharded? rerun unclip-embed)")
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise ValueError(f"data.embeddings={emb_dir} does not match {len(problems)} shard(s): "
                         + "; ".join(problems[:3]) + more)


class ShardEmbeddingLookup:
    """Per-worker lookup of a sample's embeddings by (shard, key); keeps one shard's file in memory.

    :param emb_dir: the embeddings folder.
    """

    def __init__(self, emb_dir: str | Path):
        self.emb_dir = Path(emb_dir)
        self._shard: str | None = None
        self._arrays: dict[str, np.ndarray] = {}
        self._rows: dict[str, int] = {}

    def __call__(self, shard_url: str, key: str) -> dict[str, np.ndarray] | None:
        """The sample's arrays, or None when the shard's file lacks the key.

        :raises FileNotFoundError: when the shard has no embeddings file (run unclip-embed on it).
        :raises ValueError: when the file's sidecar says it was made from another shard.
        """
        if shard_url != self._shard:
            path = embedding_path(self.emb_dir, shard_url)
            if not path.is_file():
                raise FileNotFoundError(f"data.embeddings={self.emb_dir} has no {path.name} for shard {shard_url}: "
                                        f"run unclip-embed on it")
            sidecar = path.with_suffix(".json")
            if sidecar.is_file():
                record = json.loads(sidecar.read_text())
                made_from = str(record.get("shard", ""))
                if made_from and _last_parts(made_from) != _last_parts(shard_url):
                    raise ValueError(f"{path} was made from shard {made_from}, not {shard_url}")
                why = fingerprint_mismatch(record.get("fingerprint"), shard_url)
                if why:
                    raise ValueError(f"{path} does not match shard {shard_url}: {why} (re-sharded? rerun unclip-embed)")
            self._shard = shard_url
            self._arrays = load_shard_embeddings(path)
            self._rows = {str(k): i for i, k in enumerate(self._arrays.get("keys", []))}
        row = self._rows.get(key)
        if row is None:
            return None
        out = {name: self._arrays[name][row] for name in ARRAYS if name in self._arrays}
        if TOKEN_IDS in out:  # int64 like batch["tokens"] (torch handles uint16 in few ops)
            out[TOKEN_IDS] = out[TOKEN_IDS].astype(np.int64)
        return out
