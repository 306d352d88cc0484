"""``unclip-embed``: precompute a frozen CLIP's embeddings for shards, one file per shard, aligned by sample key.

    unclip-embed clip_ckpt=runs/clip/<run>/checkpoints/last.ckpt shards='/data/train/{00000..00099}.tar' \
        out_dir=/data/emb/train

``clip_ckpt`` takes every spelling of ``unclip.models.clip_source``: also an open_clip folder (e.g. OpenAI's
ViT-L/14 as ``timm/vit_large_patch14_clip_224.openai``) or ``ARCH:path/to/weights``.

Per shard it writes ``out_dir/<shard stem>.npz`` (``unclip.data.embeddings``: keys, image_embed, text_embed,
text_ids = the caption's token ids; with ``store_token_encodings=true`` also text_tokens = the caption's last
text-transformer layer in float16 and text_mask, ~50x the bytes at ViT-H sizes), then ``<shard stem>.json``
recording the source shard, the CLIP hash and the samples skipped while reading it. Both are written atomically
(temp file + rename), the ``.json`` last, so a shard counts as done only when both exist; a rerun skips done
shards (resume) and refuses an output folder made with another CLIP, or a shard whose name is already taken by
a different shard (``train/00000.tar`` and ``val/00000.tar`` need separate folders). Shards are split over
ranks as ``shards[rank::world_size]`` (``rank``/``world_size`` keys, else the RANK/WORLD_SIZE environment).
``meta.json`` records the CLIP (``clip_source``, resolved to an absolute path, and ``clip_hash``): a stage
training on ids only loads that CLIP's text tower from it when no ``clip_ckpt`` is given.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from unclip.checkpoints import atomic_write_json
from unclip.config import ConfigError, conf_dir
from unclip.data.decode import SampleDecoder, keep_member
from unclip.data.embeddings import (
    ARRAYS,
    META_FILE,
    TOKEN_IDS,
    embedding_path,
    fingerprint_mismatch,
    ids_dtype,
    read_meta,
    required_arrays,
    shard_fingerprint,
    stores_token_encodings,
    write_meta,
    write_shard_embeddings,
)
from unclip.data.partition import count_samples
from unclip.data.pipeline import ShardDataset
from unclip.data.shards import expand_shards, is_remote
from unclip.models.clip_embedder import FrozenCLIP
from unclip.models.clip_source import SourceKind, parse_clip_source

META_KEYS = ("clip_hash", "embed_dim", "text_width", "context_length")


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """This process's (rank, world_size): explicit values, else the RANK/WORLD_SIZE environment, else (0, 1)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else int(rank)
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else int(world_size)
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} outside world_size {world_size}")
    return rank, world_size


def assign_shards(urls: list[str], rank: int, world_size: int) -> list[str]:
    """The shards this rank embeds: every ``world_size``-th one from ``rank``, so ranks never share a shard."""
    return urls[rank::world_size]


def source_name(url: str) -> str:
    """A shard's identity in the sidecar: its absolute path, or the URL as given for remote shards."""
    return url if is_remote(url) else str(Path(url).resolve())


def portable_clip_source(spec: str) -> str:
    """``clip_ckpt`` as recorded in meta.json: local paths made absolute, so a training run elsewhere finds it."""
    source = parse_clip_source(spec)
    if source.kind in (SourceKind.CHECKPOINT, SourceKind.FOLDER):
        return str(Path(source.location).resolve())
    if source.kind is SourceKind.ARCH and source.location:
        return f"{source.arch}:{Path(source.location).resolve()}"
    return source.spec  # downloads and ARCH:random name themselves


def sidecar_path(emb_dir: str | Path, url: str) -> Path:
    return embedding_path(emb_dir, url).with_suffix(".json")


def write_sidecar(path: Path, record: dict) -> None:
    """A shard's sidecar (what was embedded, with which CLIP), written atomically."""
    atomic_write_json(path, record)


def check_folder(emb_dir: Path, meta: dict, urls: list[str]) -> None:
    """Refuse an output folder made with another CLIP, and shards whose output names collide.

    :raises ConfigError: naming both CLIP hashes/sizes, or both shards.
    """
    if (emb_dir / META_FILE).is_file():
        existing = read_meta(emb_dir)
        for key in ("clip_hash", "embed_dim", "text_width"):
            if existing.get(key) != meta[key]:
                raise ConfigError(f"{emb_dir} holds embeddings made with a CLIP of {key}={existing.get(key)}, but "
                                  f"clip_ckpt has {key}={meta[key]}: use another out_dir")
        stored = stores_token_encodings(existing)
        if stored != meta["store_token_encodings"]:
            raise ConfigError(f"{emb_dir} was written with store_token_encodings={str(stored).lower()}: rerun with "
                              f"that, or use another out_dir")
    seen: dict[Path, str] = {}
    for url in urls:
        path = embedding_path(emb_dir, url)
        if path in seen:
            raise ConfigError(f"shards {seen[path]} and {url} would both write {path}: embed them into separate "
                              f"out_dir folders")
        seen[path] = url


def shard_done(emb_dir: Path, url: str, clip_hash: str, names: tuple[str, ...] = ARRAYS) -> bool:
    """True when the shard's embeddings and sidecar exist for this CLIP (a finished, complete shard).

    :raises ConfigError: when the output name belongs to a different shard.
    """
    npz, sidecar = embedding_path(emb_dir, url), sidecar_path(emb_dir, url)
    if not (npz.is_file() and sidecar.is_file()):
        return False
    record = json.loads(sidecar.read_text())
    if record.get("shard") != source_name(url):
        raise ConfigError(f"{npz} holds the embeddings of {record.get('shard')}, not of {source_name(url)}: "
                          f"shards with the same file name need separate out_dir folders")
    if record.get("clip_hash") != clip_hash or fingerprint_mismatch(record.get("fingerprint"), url):
        return False  # another CLIP, or the shard changed since (re-sharded): embed it again
    with np.load(npz, allow_pickle=False) as data:  # reads the zip directory only
        return {"keys", *names} <= set(data.files)


@torch.no_grad()
def embed_shard(clip: FrozenCLIP, url: str, emb_dir: Path, batch_size: int, num_workers: int,
                progress: Any | None = None, store_token_encodings: bool = False) -> dict:
    """Embed one shard in file order and write its ``.npz`` and sidecar.

    :param clip: the frozen CLIP (its device is used).
    :param store_token_encodings: also store the caption's per-token encodings (else token ids only).
    :param progress: a tqdm bar advanced by the samples read, or None.
    :return: the sidecar record ``{"shard", "clip_hash", "samples", "skipped": {reason: count}}``.
    """
    image_size = int(clip.meta["image_size"])
    dataset = ShardDataset([url], batch_size=batch_size, image_size=image_size, mode="epoch", shuffle_buffer=0,
                           crop="center", tokenizer=clip.tokenizer, decoder=SampleDecoder(draft_size=image_size))
    loader = DataLoader(dataset, batch_size=None, num_workers=min(num_workers, 1))  # one shard: one reader
    device = clip.mean.device
    keys: list[str] = []
    names = required_arrays(store_token_encodings)
    id_type = ids_dtype(clip.model.token_embedding.num_embeddings)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    skipped: Counter = Counter()
    for batch in loader:
        skipped.update(batch["data_stats"]["skipped"])
        text = clip.embed_text(batch["tokens"].to(device))
        rows = {"image_embed": clip.embed_images(batch["image"].to(device)), **text, TOKEN_IDS: batch["tokens"]}
        for name in names:
            value = rows[name].cpu()
            parts[name].append(value.numpy().astype(id_type) if name == TOKEN_IDS
                               else value.numpy() if name == "text_mask" else value.half().numpy())
        keys += batch["key"]
        if progress is not None:
            progress.update(len(batch["key"]))
    if len(set(keys)) != len(keys):
        raise ValueError(f"{url} repeats sample keys: embeddings could not be aligned by key")
    if not keys:  # every sample skipped: an empty file still marks the shard as done
        d, ctx, w = clip.embed_dim, clip.context_length, clip.text_width
        empty = {"image_embed": (0, d), "text_embed": (0, d), TOKEN_IDS: (0, ctx), "text_tokens": (0, ctx, w),
                 "text_mask": (0, ctx)}
        types = {"text_mask": np.dtype(bool), TOKEN_IDS: id_type}
        parts = {n: [np.zeros(empty[n], types.get(n, np.float16))] for n in names}
    arrays = {name: np.concatenate(p) for name, p in parts.items()}
    write_shard_embeddings(embedding_path(emb_dir, url), keys, arrays)
    record = {"shard": source_name(url), "clip_hash": clip.clip_hash, "samples": len(keys), "skipped": dict(skipped),
              "fingerprint": shard_fingerprint(url, count_samples(url, keep_member))}
    write_sidecar(sidecar_path(emb_dir, url), record)
    return record


def run_embed(clip_ckpt: str, shards: str | Sequence[str], out_dir: str, batch_size: int, num_workers: int,
              rank: int | None, world_size: int | None, device: str, progress: bool,
              store_token_encodings: bool = False) -> dict:
    """Embed this rank's shards into ``out_dir``, skipping finished ones.

    :param store_token_encodings: store the caption's per-token encodings too (else ids only, recomputed by the
        training stage with the CLIP's text tower).

    :return: ``{"rank", "world_size", "shards_written", "shards_skipped", "samples", "skipped", "images_per_s",
        "seconds", "out_dir"}`` for this rank.
    """
    rank, world_size = resolve_rank(rank, world_size)
    urls = expand_shards(shards, "shards")  # a config's ListConfig is a Sequence of its (resolved) strings
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    clip = FrozenCLIP.from_path(clip_ckpt, device)
    meta = {"clip_hash": clip.clip_hash, "clip_source": portable_clip_source(clip_ckpt), "embed_dim": clip.embed_dim,
            "text_width": clip.text_width, "context_length": clip.context_length,
            "image_size": int(clip.meta["image_size"]), "store_token_encodings": bool(store_token_encodings)}
    emb_dir = Path(out_dir)
    check_folder(emb_dir, meta, urls)
    if not (emb_dir / META_FILE).is_file():
        write_meta(emb_dir, meta)
    mine = assign_shards(urls, rank, world_size)
    names = required_arrays(store_token_encodings)
    todo = [u for u in mine if not shard_done(emb_dir, u, clip.clip_hash, names)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(unit="img", desc=f"unclip-embed rank {rank}: {len(todo)}/{len(mine)} shards", file=sys.stderr)
    start = time.perf_counter()
    samples, skipped = 0, Counter[str]()
    for url in todo:
        record = embed_shard(clip, url, emb_dir, batch_size, num_workers, bar, store_token_encodings)
        samples += record["samples"]
        skipped.update(record["skipped"])
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return {"rank": rank, "world_size": world_size, "shards_written": len(todo),
            "shards_skipped": len(mine) - len(todo), "samples": samples, "skipped": dict(skipped),
            "images_per_s": round(samples / seconds, 2) if samples else 0.0, "seconds": round(seconds, 2),
            "out_dir": str(emb_dir)}


# An absolute path: a relative one makes Hydra look for a python package "conf" when run as a console script.
@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="embed")
def main(cfg: DictConfig) -> None:
    summary = run_embed(cfg.clip_ckpt, cfg.shards, cfg.out_dir, cfg.batch_size, cfg.num_workers, cfg.rank,
                        cfg.world_size, cfg.device, cfg.progress, cfg.store_token_encodings)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
