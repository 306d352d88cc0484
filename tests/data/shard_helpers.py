"""Helpers that write small (and hostile) shards for the data tests."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(color=(200, 30, 30), size=(32, 32), fmt="JPEG", mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """Write members (name, bytes) in order into an uncompressed tar."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sample_members(key: str, caption: str | bytes | None = "a red square", image: bytes | None = None,
                   meta: dict | None = None) -> list[tuple[str, bytes]]:
    members = []
    if image is not None:
        members.append((f"{key}.jpg", image))
    if caption is not None:
        members.append((f"{key}.txt", caption if isinstance(caption, bytes) else caption.encode()))
    members.append((f"{key}.json", json.dumps(meta or {"key": key}).encode()))
    return members


def write_clean_shards(root: Path, n_shards: int, per_shard: int, size=(24, 24)) -> list[str]:
    """Shards of valid samples whose caption is their key (so a reader can check what it got)."""
    root.mkdir(parents=True, exist_ok=True)
    urls = []
    for s in range(n_shards):
        members = []
        for i in range(per_shard):
            key = f"{s:05d}{i:04d}"
            rgb = ((s * 37 + i * 11) % 256, (i * 53) % 256, (s * 91) % 256)
            members += sample_members(key, caption=key, image=image_bytes(rgb, size))
        urls.append(str(write_tar(root / f"{s:05d}.tar", members)))
    return urls


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=array.dtype == object)
    return buf.getvalue()
