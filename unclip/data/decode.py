"""Turn raw webdataset samples (bytes per member) into decoded, validated samples.

Only images (jpg, png, webp), txt, json and npy members are decoded; npy with ``allow_pickle=False``.
Everything else is dropped and counted: nothing in a shard is ever unpickled or executed. A sample
that cannot be used (no image, no caption, undecodable image) is skipped and counted by reason.
"""

from __future__ import annotations

import io
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from unclip.data.image_io import IMAGE_EXTENSIONS, ImageRejected, decode_rgb_sized

TEXT_EXTENSIONS = ("txt", "caption")
META_EXTENSIONS = ("json",)
ARRAY_EXTENSIONS = ("npy",)


_SHARD_NAME = re.compile(r"name='([^']*)'")


@dataclass
class SkipCounter:
    """Counts of skipped samples (by reason) and of repairs, kept per process and drained into batches."""

    skipped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)
    samples: int = 0

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    failed_shards: set = field(default_factory=set)

    def handler(self, exn: Exception) -> bool:
        """webdataset exception handler: count a tar-level error once per shard and go on."""
        # webdataset reports one truncation twice (member read, then header read); both name the file.
        shard = _SHARD_NAME.search(str(exn.args))
        if shard is None or shard.group(1) not in self.failed_shards:
            self.skipped[f"read_error:{type(exn).__name__}"] += 1
        if shard is not None:
            self.failed_shards.add(shard.group(1))
        return True

    def drain(self) -> dict:
        """Return the counts since the last drain and reset them."""
        out = {"samples": self.samples, "skipped": dict(self.skipped), "repaired": dict(self.repaired)}
        self.skipped.clear()
        self.repaired.clear()
        self.samples = 0
        return out


def decode_caption(data: bytes, counter: SkipCounter) -> str:
    """UTF-8 caption; other encodings are recoded (latin-1 never fails) and counted, never dropped."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        counter.repaired["caption_recoded"] += 1
        text = data.decode("latin-1")
    return text.strip()


@dataclass
class SampleDecoder:
    """Decode one raw sample into ``{"key", "image" (PIL RGB), "original_size", "caption", "json", "npy"}``.

    :param require: members a sample must have to be kept: any of "image", "caption".
    :param max_pixels: refuse images above this pixel count (decompression bombs) before decoding.
    :param min_side: refuse images whose shorter side is below this.
    :param draft_size: let the JPEG decoder downscale while keeping the shorter side >= this.
    :param decode_images: False skips image decoding (and the image requirement) entirely, for stages
        that read only captions and precomputed embeddings.
    """

    require: tuple[str, ...] = ("image", "caption")
    max_pixels: int | None = 64_000_000
    min_side: int = 1
    draft_size: int | None = None
    decode_images: bool = True

    def __call__(self, raw: dict, counter: SkipCounter) -> dict | None:
        out: dict = {"key": raw.get("__key__", ""), "npy": {}}
        image_bytes = None
        for name, value in raw.items():
            if name.startswith("__"):
                continue
            ext = name.rsplit(".", 1)[-1].lower()
            if ext in IMAGE_EXTENSIONS and image_bytes is None:
                image_bytes = value
            elif ext in TEXT_EXTENSIONS and "caption" not in out:
                out["caption"] = decode_caption(value, counter)
            elif ext in META_EXTENSIONS:
                try:
                    out["json"] = json.loads(value)
                except (ValueError, UnicodeDecodeError):
                    counter.repaired["bad_json"] += 1
            elif ext in ARRAY_EXTENSIONS:
                try:
                    out["npy"][name] = np.load(io.BytesIO(value), allow_pickle=False)
                except (ValueError, OSError, EOFError):
                    counter.repaired["bad_npy"] += 1  # e.g. an object array that would need pickle
            else:
                counter.repaired[f"ignored_member:{ext}"] += 1
        if "caption" in self.require and not out.get("caption"):
            counter.skip("missing_caption")
            return None
        if not self.decode_images:
            return out
        if image_bytes is None:
            if "image" in self.require:
                counter.skip("missing_image")
                return None
            return out
        try:
            out["image"], out["original_size"] = decode_rgb_sized(image_bytes, self.max_pixels, self.min_side,
                                                                 self.draft_size)
        except ImageRejected as exc:
            counter.skip(exc.reason)
            return None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            counter.skip("decode_error")
            return None
        return out


@dataclass
class ImageTransform:
    """Resize the shorter side to ``size`` and crop a square: centre or random, in one PIL resample.

    Cropping the source box first and resampling only that box does the work once, on the pixels
    that are kept. Returns HWC uint8; normalisation to [-1, 1] happens per batch.
    """

    size: int
    crop: str = "center"

    def __post_init__(self) -> None:
        if self.crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {self.crop!r}")

    def __call__(self, img: Image.Image, rng: random.Random) -> np.ndarray:
        w, h = img.size
        side = min(w, h)
        if self.crop == "center":
            left, top = (w - side) // 2, (h - side) // 2
        else:
            left, top = rng.randint(0, w - side), rng.randint(0, h - side)
        box = (left, top, left + side, top + side)
        if side == self.size:
            img = img.crop(box) if (w, h) != (side, side) else img
        else:
            img = img.resize((self.size, self.size), Image.BICUBIC, box=box, reducing_gap=3.0)
        return np.asarray(img)
