"""The real side of an evaluation: validation captions and images, and a cache of their features.

Real images and captions are read through the training pipeline (``ShardDataset``, epoch mode, no shuffling),
so the evaluated set is the first N samples of the shards in order, decoded, resized and centre-cropped as in
training. Real features depend only on (shard files, N, image size, extractor), so they are cached under that
key and computed once per configuration.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from unclip.checkpoints import atomic_write
from unclip.data.decode import SampleDecoder
from unclip.data.pipeline import ShardDataset
from unclip.data.shards import expand_shards, is_remote


@dataclass
class RealSet:
    """:param captions: N captions. :param meta: N json dicts. :param skipped: samples skipped while reading, by
    reason."""

    captions: list[str]
    meta: list[dict]
    skipped: dict[str, int] = field(default_factory=dict)


def read_real_set(shards: str | Sequence[str], n: int, image_size: int,
                  on_images: Callable[[torch.Tensor, int, list[str], list[dict]], None] | None = None,
                  batch_size: int = 64) -> RealSet:
    """The first ``n`` decodable samples of ``shards`` (in order) at ``image_size``, streamed: images are handed
    to ``on_images(images [B, 3, S, S] in [-1, 1], first index, the B captions, the B json dicts)`` batch by batch
    and not kept (30k real images at 256px would be 23 GB as float32, 6 GB as PIL images).

    :raises ValueError: when the shards hold fewer than ``n`` usable samples (an evaluation of a smaller set than
        configured would be reported under the wrong N).
    """
    urls = expand_shards(shards)
    dataset = ShardDataset(urls, batch_size=min(n, batch_size), image_size=image_size, mode="epoch",
                           shuffle_buffer=0, decoder=SampleDecoder(draft_size=image_size))
    captions: list[str] = []
    meta: list[dict] = []
    skipped: dict[str, int] = {}
    for batch in dataset:
        take = min(len(batch["caption"]), n - len(captions))
        batch_meta = list(batch.get("json") or [{}] * len(batch["caption"]))[:take]
        if on_images is not None:
            on_images(torch.as_tensor(batch["image"][:take]).float(), len(captions), list(batch["caption"])[:take],
                      batch_meta)
        meta += batch_meta
        captions += list(batch["caption"])[:take]
        for reason, count in (batch.get("data_stats") or {}).get("skipped", {}).items():
            skipped[reason] = skipped.get(reason, 0) + int(count)
        if len(captions) >= n:
            break
    if len(captions) < n:
        raise ValueError(f"num_samples={n} but the val shards {list(urls)[:3]} hold only {len(captions)} usable "
                         f"samples; lower num_samples")
    return RealSet(captions, meta, skipped)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
RESIZE = "PIL bicubic (reducing_gap 3.0) of the centre square to image_size (the training pipeline's ImageTransform)"


def image_files(folder: str | Path) -> list[Path]:
    """The images of a folder (and its subfolders), sorted by path; raises naming the folder when there are none."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    return files


def read_image_folder(folder: str | Path, n: int | None, image_size: int,
                      on_images: Callable[[torch.Tensor, int, list[str], list[dict]], None],
                      batch_size: int = 64) -> dict:
    """Stream the first ``n`` (None: all) images of a folder, sorted by path, at ``image_size`` through the same
    centre-crop resize as the shards, to ``on_images(images [B, 3, S, S] in [-1, 1], first, names, [{}...])``.
    Unreadable files are skipped and counted.

    :return: {"num_images", "skipped": {"decode_error": count}, "files": first and last file names}.
    """
    from PIL import Image

    from unclip.data.decode import ImageTransform

    transform, rng = ImageTransform(image_size), random.Random(0)  # centre crop: rng unused
    files = image_files(folder)
    done, skipped = 0, 0
    batch: list[np.ndarray] = []
    names: list[str] = []

    def flush() -> None:
        nonlocal done
        if batch:
            images = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() / 127.5 - 1
            on_images(images, done, list(names), [{}] * len(batch))
            done += len(batch)
            batch.clear()
            names.clear()

    for path in files:
        if n is not None and done + len(batch) >= n:
            break
        try:
            with Image.open(path) as img:
                batch.append(transform(img.convert("RGB"), rng))
            names.append(str(path.relative_to(folder)))
        except (OSError, ValueError):
            skipped += 1
            continue
        if len(batch) == batch_size:
            flush()
    flush()
    if n is not None and done < n:
        raise ValueError(f"num_samples={n} but {folder} holds only {done} readable images")
    return {"num_images": done, "skipped": {"decode_error": skipped} if skipped else {},
            "files": [str(files[0].name), str(files[-1].name)]}


def _fingerprint(urls: Sequence[str]) -> list[str | list[str | int]]:
    """What identifies the shard contents: local files by path, size and mtime; URLs by name."""
    out: list[str | list[str | int]] = []
    for url in urls:
        if is_remote(url):
            out.append(url)
        else:
            stat = os.stat(url)
            out.append([os.path.abspath(url), stat.st_size, int(stat.st_mtime)])
    return out


def cache_key(shards: str | Sequence[str], n: int, image_size: int, extractor: str) -> str:
    """A hash of (shard files, N, image size, extractor name) naming the cached real features."""
    payload = json.dumps({"shards": _fingerprint(expand_shards(shards)), "n": n, "image_size": image_size,
                          "extractor": extractor}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def load_cached(cache_dir: Path | None, key: str) -> torch.Tensor | None:
    """Features stored by :func:`store_cached`, or None."""
    path = cache_dir / f"{key}.npy" if cache_dir is not None else None
    if path is not None and path.is_file():
        return torch.from_numpy(np.load(path, allow_pickle=False))
    return None


def store_cached(cache_dir: Path | None, key: str, features: torch.Tensor) -> None:
    """Write features to ``cache_dir/<key>.npy`` atomically (nothing without a cache folder)."""
    features = features.float().cpu()
    path = cache_dir / f"{key}.npy" if cache_dir is not None else None
    if path is not None:
        atomic_write(path, lambda f: np.save(f, features.numpy(), allow_pickle=False))
