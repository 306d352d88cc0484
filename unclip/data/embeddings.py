"""Precomputed CLIP embeddings stored beside the shards, one file per shard, aligned by sample key.

Layout of an embeddings folder (written by ``unclip-embed``)::

    EMB_DIR/meta.json          {"clip_hash", "embed_dim", "text_width", "context_length", ...}
    EMB_DIR/<shard stem>.npz   keys [N] str, image_embed [N, D] f16, text_embed [N, D] f16,
                               text_tokens [N, ctx, W] f16, text_mask [N, ctx] bool

Files are numpy archives read with ``allow_pickle=False``: nothing in them can run code.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

META_FILE = "meta.json"
ARRAYS = ("image_embed", "text_embed", "text_tokens", "text_mask")


def shard_stem(shard_url: str) -> str:
    """``.../train/00012.tar`` -> ``00012`` (the name an embeddings file takes)."""
    name = shard_url.rstrip("/").rsplit("/", 1)[-1]
    return name[: -len(".tar")] if name.endswith(".tar") else name


def embedding_path(emb_dir: str | Path, shard_url: str) -> Path:
    return Path(emb_dir) / f"{shard_stem(shard_url)}.npz"


def write_meta(emb_dir: str | Path, meta: dict) -> None:
    path = Path(emb_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def read_meta(emb_dir: str | Path) -> dict:
    """The folder's meta.json; raises FileNotFoundError naming the folder when there is none."""
    path = Path(emb_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{emb_dir} holds no {META_FILE}: not an unclip-embed output folder")
    return json.loads(path.read_text())


def write_shard_embeddings(path: str | Path, keys: list[str], arrays: dict[str, np.ndarray]) -> None:
    """Write one shard's embeddings atomically (temp file + rename): a killed run leaves no partial file.

    :param keys: sample keys, one per row of every array.
    :param arrays: at least the entries of ``ARRAYS`` with N rows each.
    """
    path = Path(path)
    missing = [name for name in ARRAYS if name not in arrays]
    if missing:
        raise ValueError(f"embeddings for {path.name} lack {missing}")
    bad = {name: a.shape[0] for name, a in arrays.items() if a.shape[0] != len(keys)}
    if bad:
        raise ValueError(f"embeddings for {path.name}: {len(keys)} keys but rows {bad}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".npz", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        np.savez(f, keys=np.asarray(keys, dtype=str), **arrays)
    os.replace(tmp, path)


def load_shard_embeddings(path: str | Path) -> dict[str, np.ndarray]:
    """Load one shard's embeddings; ``{"keys": [N] str, <array name>: [N, ...]}``."""
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


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
        """The sample's arrays, or None when its shard has no file or the file lacks the key."""
        if shard_url != self._shard:
            self._shard = shard_url
            path = embedding_path(self.emb_dir, shard_url)
            self._arrays = load_shard_embeddings(path) if path.is_file() else {}
            self._rows = {str(k): i for i, k in enumerate(self._arrays.get("keys", []))}
        row = self._rows.get(key)
        if row is None:
            return None
        return {name: self._arrays[name][row] for name in ARRAYS}
