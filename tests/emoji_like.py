"""A small stand-in for the emoji shards, built from the project's own generator, so that a clean clone runs the
tests that read ``data=emoji`` without the real set beside it.

Same layout as the real set (``train/{00000..00003}.tar``, ``val/00000.tar``; each sample a 128px JPEG q95,
``{key}.txt`` caption and ``{key}.json``), but demo-shapes content and a few hundred samples instead of 3,940.
Tests take sample counts from the shards (count_samples), never the real set's 3,540 / 400.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tarfile
import uuid
from pathlib import Path

from unclip.data.demo_shapes import GENERATOR_VERSION, DemoShapesConfig, iter_samples
from unclip.data.writer import EncodeOptions, write_shards

TRAIN_SHARDS = 4  # conf/data/emoji.yaml reads train/{00000..00003}.tar
PER_TRAIN_SHARD = 48
# The last train shard is short, as in the real set; val is one shard of 64 (tests read 32-50 val images at once).
CONFIG = DemoShapesConfig(seed=7, n_train=TRAIN_SHARDS * PER_TRAIN_SHARD - 16, n_val=64, image_size=128)
ENCODE = EncodeOptions(image_format="jpg", quality=95)


def has_shards(root: Path) -> bool:
    """Whether ``root`` holds an emoji-layout set (the first train shard and the val shard)."""
    return (root / "train" / "00000.tar").is_file() and (root / "val" / "00000.tar").is_file()


def emoji_like_root(cache_dir: Path) -> Path:
    """Where the stand-in set for CONFIG lives under ``cache_dir`` (its name changes with the generator)."""
    return cache_dir / "emoji_like" / f"v{GENERATOR_VERSION}-{CONFIG.version_hash()}"


def build_emoji_like(root: Path) -> Path:
    """Write the stand-in set to ``root`` unless it is there; built beside it and renamed, so a killed or concurrent
    build never leaves a half set under the real name. Returns ``root``."""
    if has_shards(root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".tmp-{root.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        splits = {}
        for split, per_shard in (("train", PER_TRAIN_SHARD), ("val", CONFIG.n_val)):
            stats = write_shards(iter_samples(CONFIG, split), tmp / split, ENCODE, samples_per_shard=per_shard)
            splits[split] = {"samples": stats["written"], "shards": stats["shards"]}
        assert splits["train"]["shards"] == TRAIN_SHARDS and splits["val"]["shards"] == 1, splits
        (tmp / "manifest.json").write_text(json.dumps({"config": dataclasses.asdict(CONFIG), "splits": splits}))
        try:
            os.rename(tmp, root)
        except OSError:
            if not has_shards(root):  # not a concurrent build that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def count_samples(shard: Path) -> int:
    """Samples in one shard (its captions), so tests derive counts from whichever set they run on."""
    with tarfile.open(shard) as tar:
        return sum(1 for name in tar.getnames() if name.endswith(".txt"))
