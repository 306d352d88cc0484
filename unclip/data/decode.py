"""Turn raw webdataset samples (bytes per member) into decoded, validated samples.

Only images (jpg, png, webp), txt, json and npy members are read; every other member is passed over
in the tar stream without being read (``keep_member``) and counted. npy members load with
``allow_pickle=False`` after their header is checked (plain numeric dtype, bytes matching the declared
shape), so nothing in a shard is ever unpickled, executed or allowed to allocate more than it holds.
A sample that cannot be used (no image, no caption, undecodable image) is skipped and counted by
reason; a bad optional member (json, npy) is dropped and counted under ``repaired``.
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
READ_EXTENSIONS = IMAGE_EXTENSIONS + TEXT_EXTENSIONS + META_EXTENSIONS + ARRAY_EXTENSIONS
# Batch fields an npy member must not replace (``<key>.image.npy`` would otherwise become batch["image"]).
RESERVED_FIELDS = frozenset({"image", "original_size", "caption", "key", "json", "tokens", "negative_tokens",
                             "negative_mask", "data_stats", "image_embed", "text_embed", "text_tokens", "text_mask",
                             "text_ids"})


def member_extension(name: str) -> str:
    """The extension a member is decoded by: the last one (``k.image.npy`` -> npy)."""
    return name.rsplit("/", 1)[-1].rsplit(".", 1)[-1].lower()


def keep_member(name: str) -> bool:
    """Whether the read pipeline reads a tar member at all (others are skipped in the stream, unread)."""
    base = name.rsplit("/", 1)[-1]
    return "." in base and member_extension(name) in READ_EXTENSIONS


# numpy's header readers by format version; other versions are refused.
_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def load_npy(data: bytes) -> np.ndarray:
    """An npy member as a numeric array, checked before anything is allocated.

    :raises ValueError: for a bad header, a non-numeric (object, structured, string) dtype, or a declared
        shape that the bytes do not hold (a tiny file claiming a huge array).
    """
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    if version not in _NPY_HEADERS:
        raise ValueError(f"npy format version {version} not read")
    shape, fortran, dtype = _NPY_HEADERS[version](stream)
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in "biuf":
        raise ValueError(f"npy dtype {dtype} is not a plain numeric type")
    expected = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    if expected != len(data) - stream.tell():
        raise ValueError(f"npy header declares {shape} {dtype} ({expected} bytes) but holds "
                         f"{len(data) - stream.tell()}")
    array = np.frombuffer(data, dtype=dtype, offset=stream.tell()).reshape(shape, order="F" if fortran else "C")
    return np.ascontiguousarray(array)


_SHARD_NAME = re.compile(r"name='([^']*)'")


@dataclass
class SkipCounter:
    """Counts of skipped samples (by reason) and of repairs, kept per process and drained into batches."""

    skipped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)
    samples: int = 0
    padded: int = 0  # samples read again to fill a fixed quota (see unclip.data.partition)
    # Read errors in a row with no sample between them before giving up (None: never). An endless
    # (resampled) stream over unreadable shards would otherwise retry forever without a word.
    stop_after_failures: int | None = None
    failures_in_row: int = 0

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    failed_shards: set = field(default_factory=set)

    def handler(self, exn: Exception) -> bool:
        """webdataset exception handler: count a tar-level error once per shard and go on.

        :raises RuntimeError: after ``stop_after_failures`` errors in a row without any sample read.
        """
        # webdataset reports one truncation twice (member read, then header read); both name the file.
        shard = _SHARD_NAME.search(str(exn.args))
        if shard is None or shard.group(1) not in self.failed_shards:
            self.skipped[f"read_error:{type(exn).__name__}"] += 1
        if shard is not None:
            self.failed_shards.add(shard.group(1))
        self.failures_in_row += 1
        if self.stop_after_failures is not None and self.failures_in_row >= self.stop_after_failures:
            raise RuntimeError(f"data: {self.failures_in_row} shard read errors in a row without one sample "
                               f"(last: {type(exn).__name__}: {str(exn)[:300]}); are the shards readable?") from exn
        return True

    def selector(self):
        """A ``select_files`` predicate for webdataset that counts the members it passes over."""
        def select(name: str) -> bool:
            if keep_member(name):
                return True
            self.repaired[f"ignored_member:{member_extension(name)}"] += 1
            return False
        return select

    def drain(self) -> dict:
        """Return the counts since the last drain and reset them."""
        out = {"samples": self.samples, "skipped": dict(self.skipped), "repaired": dict(self.repaired),
               "padded": self.padded}
        self.skipped.clear()
        self.repaired.clear()
        self.samples = self.padded = 0
        return out


def decode_caption(raw: str | bytes) -> tuple[str, bool]:
    """Decode and strip a caption, the one rule for writing (unclip-shards) and reading shards; returns
    (text, recoded), recoded meaning it was not valid UTF-8. A UTF-8 byte-order mark is dropped.

    :param raw: caption text or bytes.
    """
    if isinstance(raw, str):
        return raw.strip(), False
    try:
        return raw.decode("utf-8-sig").strip(), False
    except UnicodeDecodeError:
        pass
    # Legacy captions are mostly Windows-1252; latin-1 maps every byte, so a caption is never lost.
    try:
        return raw.decode("cp1252").strip(), True
    except UnicodeDecodeError:
        return raw.decode("latin-1").strip(), True


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
                out["caption"], recoded = decode_caption(value)
                if recoded:  # counted, never dropped
                    counter.repaired["caption_recoded"] += 1
            elif ext in META_EXTENSIONS:
                try:
                    meta = json.loads(value)
                except (ValueError, UnicodeDecodeError, RecursionError):  # deep nesting overflows the parser
                    meta = None
                if isinstance(meta, dict):
                    out["json"] = meta
                else:
                    counter.repaired["bad_json"] += 1
            elif ext in ARRAY_EXTENSIONS:
                if name.rsplit(".", 1)[0] in RESERVED_FIELDS:
                    counter.repaired["npy_reserved_name"] += 1
                    continue
                try:
                    out["npy"][name] = load_npy(value)
                except (ValueError, OSError, EOFError):
                    counter.repaired["bad_npy"] += 1
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
            img = img.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
        return np.asarray(img)
