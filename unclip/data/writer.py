"""Write a stream of (image, caption) inputs as webdataset shards in img2dataset's layout.

Each written sample is ``{key}.jpg|png|webp``, ``{key}.txt`` and ``{key}.json``; the output folder also
gets ``stats.json``. Every input is either written or counted under a skip reason, so
``written + sum(skipped.values()) == inputs`` always holds. Output is deterministic: keys are given to
written samples in input order, whatever the number of worker processes.
"""

from __future__ import annotations

import collections
import enum
import io
import json
import math
import multiprocessing
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image

from unclip.data.decode import decode_caption
from unclip.data.image_io import SOURCE_FORMATS, ImageRejected, decode_rgb, open_image, to_rgb

# PIL's own decompression-bomb threshold (Image.MAX_IMAGE_PIXELS), the writer's default explicit limit.
DEFAULT_MAX_PIXELS = 89_478_485
OUTPUT_FORMATS = ("jpg", "png", "webp")
SKIP_REASONS = ("missing_image", "missing_caption", "empty_caption", "decode_error", "too_small", "too_large")
_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


class ResizeMode(str, enum.Enum):
    """How images are resized before encoding."""

    KEEP = "keep"  # original size
    MAX_SIDE = "max_side"  # downscale so the longer side is at most image_size; never upscale
    CENTER_CROP = "center_crop"  # scale the shorter side to image_size, crop the centre square


@dataclass(frozen=True)
class EncodeOptions:
    """What happens to each image between decoding and the shard.

    :param resize: resize policy (a ResizeMode or its string value).
    :param image_size: the N of max_side / center_crop; unused for keep.
    :param image_format: jpg, png or webp.
    :param quality: JPEG / WebP quality (ignored for png).
    :param min_side: images with a shorter side below this are skipped as ``too_small``.
    :param max_pixels: images with more pixels are skipped as ``too_large`` before decoding; None = no limit.
    """

    resize: ResizeMode = ResizeMode.KEEP
    image_size: int | None = None
    image_format: str = "jpg"
    quality: int = 95
    min_side: int = 1
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "resize", ResizeMode(self.resize))
        except ValueError:
            raise ValueError(f"unknown resize {self.resize!r}; valid: {[m.value for m in ResizeMode]}") from None
        if self.resize != ResizeMode.KEEP and (self.image_size is None or self.image_size < 1):
            raise ValueError(f"resize={self.resize.value} needs a positive image_size")
        if self.image_format not in OUTPUT_FORMATS:
            raise ValueError(f"unknown image_format {self.image_format!r}; valid: {list(OUTPUT_FORMATS)}")


@dataclass
class SourceSample:
    """One input before processing.

    :param source: where it came from (path, url or ``shard#key``), recorded in the json.
    :param image: encoded bytes, a path to read, an in-memory PIL image, or None when missing.
    :param caption: text, raw bytes (decoded as UTF-8 with a fallback), or None when missing.
    :param meta: extra json fields carried into the output json (ours take precedence on clashes).
    :param error: set when the input itself could not be read (e.g. ``read_error`` for a truncated
        tar): the sample is counted under this reason.
    """

    source: str
    image: bytes | Path | Image.Image | None
    caption: str | bytes | None
    meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Prepared:
    """A processed sample: either encoded output or the reason it was skipped."""

    source: str
    reason: str | None = None
    message: str = ""
    image: bytes = b""
    caption: str = ""
    size: tuple[int, int] = (0, 0)
    original_size: tuple[int, int] = (0, 0)
    caption_recoded: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


def resize_image(img: Image.Image, mode: ResizeMode | str, size: int | None) -> Image.Image:
    """Apply a resize policy.

    :param img: RGB image.
    :param mode: keep, max_side or center_crop.
    :param size: the target side N (unused for keep).
    """
    mode = ResizeMode(mode)
    w, h = img.size
    if mode == ResizeMode.KEEP:
        return img
    assert size is not None
    if mode == ResizeMode.MAX_SIDE:
        if max(w, h) <= size:
            return img
        scale = size / max(w, h)
        new = (max(1, round(w * scale)), max(1, round(h * scale)))
        return img.resize(new, Image.Resampling.LANCZOS, reducing_gap=3.0)
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    # One resample from the centre box: cheaper and sharper than resize-then-crop.
    box = (left, top, left + side, top + side)
    return img.resize((size, size), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)


def encode_image(img: Image.Image, image_format: str, quality: int = 95) -> bytes:
    """Encode an RGB image as jpg, png or webp bytes.

    :param img: RGB image.
    :param image_format: jpg, png or webp.
    :param quality: JPEG / WebP quality (ignored for png).
    """
    buf = io.BytesIO()
    if image_format == "png":
        img.save(buf, format="PNG", compress_level=6)
    else:
        img.save(buf, format=_PIL_FORMAT[image_format], quality=quality)
    return buf.getvalue()


def _load_rgb(image: bytes | Path | Image.Image, opts: EncodeOptions) -> tuple[Image.Image, tuple[int, int]]:
    """Decode to RGB with the size limits applied; returns (image, original size)."""
    if isinstance(image, Image.Image):
        w, h = image.size
        if opts.max_pixels is not None and w * h > opts.max_pixels:
            raise ImageRejected("too_large", f"image of {w}x{h} exceeds max_pixels={opts.max_pixels}")
        if min(w, h) < opts.min_side:
            raise ImageRejected("too_small", f"image of {w}x{h} has a side below min_side={opts.min_side}")
        return to_rgb(image), (w, h)
    data = image.read_bytes() if isinstance(image, Path) else image
    # Header only: size checks happen before any pixel is decoded, and draft mode may shrink the decode.
    header = open_image(data, max_pixels=opts.max_pixels, min_side=opts.min_side, formats=SOURCE_FORMATS)
    (w, h), orientation = header.size, _exif_orientation(header)
    draft = opts.image_size if opts.resize != ResizeMode.KEEP else None
    img = decode_rgb(data, draft_size=draft, formats=SOURCE_FORMATS)
    if orientation in _EXIF_TRANSPOSE:  # phone photos: store them the way they are shown
        img = img.transpose(_EXIF_TRANSPOSE[orientation])
        if orientation >= 5:
            w, h = h, w
    return img, (w, h)


# EXIF orientation tag value -> the transpose that displays the image upright (as ImageOps.exif_transpose).
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _exif_orientation(header: Image.Image) -> int:
    try:
        return int(header.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block is no reason to drop the image
        return 1


def prepare_sample(sample: SourceSample, opts: EncodeOptions) -> Prepared:
    """Decode, check, convert, resize and encode one input; never raises for bad data.

    :param sample: the input.
    :param opts: encoding options.
    """
    if sample.error is not None:
        return Prepared(sample.source, sample.error, "the input could not be read")
    if sample.image is None:
        return Prepared(sample.source, "missing_image", "no image for this caption")
    if sample.caption is None:
        return Prepared(sample.source, "missing_caption", "no caption for this image")
    caption, recoded = decode_caption(sample.caption)
    if not caption:
        return Prepared(sample.source, "empty_caption", "caption is empty")
    try:
        img, original = _load_rgb(sample.image, opts)
        img = resize_image(img, opts.resize, opts.image_size)
        data = encode_image(img, opts.image_format, opts.quality)
    except ImageRejected as exc:
        return Prepared(sample.source, exc.reason, str(exc))
    except FileNotFoundError as exc:
        return Prepared(sample.source, "missing_image", str(exc))
    except Exception as exc:  # noqa: BLE001 - any failure to parse bytes is a decode error, counted not raised
        return Prepared(sample.source, "decode_error", f"{type(exc).__name__}: {exc}")
    return Prepared(sample.source, image=data, caption=caption, size=img.size, original_size=original,
                    caption_recoded=recoded, meta=sample.meta)


def make_key(index: int, samples_per_shard: int) -> str:
    """img2dataset-style key: shard number then row, zero padded to at least 9 digits.

    :param index: position of the sample among written samples.
    :param samples_per_shard: shard size, which sets the number of row digits.
    """
    row_digits = max(1, len(str(samples_per_shard - 1)))
    shard, row = divmod(index, samples_per_shard)
    return f"{shard * 10 ** row_digits + row:0{max(9, 5 + row_digits)}d}"


def shard_pattern(out_dir: str | Path, shard_name: str, n_shards: int) -> str | None:
    """Brace pattern covering shards 0..n-1, e.g. ``out/{00000..00009}.tar``; None when there are none.

    :param out_dir: folder holding the shards.
    :param shard_name: printf-style name, e.g. ``%05d.tar``.
    :param n_shards: number of shards written.
    """
    if n_shards == 0:
        return None
    if n_shards == 1:
        return str(Path(out_dir) / (shard_name % 0))
    match = re.search(r"%0?(\d*)d", shard_name)
    assert match is not None
    prefix, suffix = shard_name[: match.start()], shard_name[match.end():]
    first, last = shard_name[match.start():match.end()] % 0, shard_name[match.start():match.end()] % (n_shards - 1)
    return str(Path(out_dir) / f"{prefix}{{{first}..{last}}}{suffix}")


def _shard_regex(shard_name: str) -> re.Pattern[str]:
    if len(re.findall(r"%0?\d*d", shard_name)) != 1 or "/" in shard_name:
        raise ValueError(f"shard_name {shard_name!r} must be a file name with exactly one %d, e.g. %05d.tar")
    return re.compile(re.sub(r"%0?\d*d", lambda _: r"\d+", re.escape(shard_name)) + "$")


def _prepared_stream(samples: Iterable[SourceSample], opts: EncodeOptions, workers: int,
                     chunk: int = 32) -> Iterator[Prepared]:
    """Prepare samples in order; with workers > 1 a pool does it, with a bounded number of chunks in flight."""
    if workers <= 1:
        for sample in samples:
            yield prepare_sample(sample, opts)
        return
    fn = partial(prepare_sample, opts=opts)
    iterator = iter(samples)
    # Pool.imap would read the whole input ahead (every image's bytes when re-sharding); keep a window.
    with multiprocessing.get_context().Pool(workers) as pool:
        pending: collections.deque = collections.deque()
        while True:
            while len(pending) < 2 * workers:
                batch = [s for _, s in zip(range(chunk), iterator, strict=False)]  # up to chunk samples
                if not batch:
                    break
                pending.append(pool.map_async(fn, batch))
            if not pending:
                return
            yield from pending.popleft().get()


def _json_default(value: Any) -> Any:
    # numpy scalars, dates and the like from tables: use their python value, else their text.
    item = getattr(value, "item", None)
    return item() if callable(item) else str(value)


def _record(prep: Prepared, key: str) -> dict[str, Any]:
    meta = prep.meta
    record = {
        "key": key,
        "caption": prep.caption,
        "width": prep.size[0],
        "height": prep.size[1],
        # When re-sharding, the upstream original size is the truer one.
        "original_width": meta.get("original_width", prep.original_size[0]),
        "original_height": meta.get("original_height", prep.original_size[1]),
        "source": prep.source,
    }
    if prep.caption_recoded:
        record["caption_recoded"] = True
    for name, value in meta.items():
        record.setdefault(name, value)
    return record


def _prepare_out_dir(out: Path, shard_name: str, overwrite: bool) -> None:
    pattern = _shard_regex(shard_name)
    out.mkdir(parents=True, exist_ok=True)
    old = sorted(p for p in out.iterdir() if pattern.match(p.name))
    if old and not overwrite:
        raise FileExistsError(f"{out} already holds shards ({old[0].name}, ...); pass overwrite=True to replace them")
    for path in old:  # only files our own naming would produce
        path.unlink()


def write_shards(samples: Iterable[SourceSample], out_dir: str | Path, opts: EncodeOptions | None = None,
                 samples_per_shard: int = 10_000, shard_name: str = "%05d.tar", workers: int = 1,
                 overwrite: bool = False) -> dict[str, Any]:
    """Process inputs and write them as shards plus ``stats.json``; returns the stats dict.

    :param samples: inputs, e.g. from iter_folder / iter_table / iter_shards in make_shards.
    :param out_dir: output folder (created if needed).
    :param opts: encoding options; defaults to EncodeOptions().
    :param samples_per_shard: samples in each shard (the last may hold fewer).
    :param shard_name: printf-style shard file name with one %d.
    :param workers: processes decoding and encoding images; 1 = in this process.
    :param overwrite: replace shards already in out_dir instead of refusing.
    :return: {"written", "shards", "skipped": {reason: n}, "inputs", "seconds", "caption_recoded",
        "pattern", "skipped_examples": {reason: "source: message"}, ...}
    """
    opts = opts or EncodeOptions()
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be positive")
    start = time.perf_counter()
    out = Path(out_dir)
    _prepare_out_dir(out, shard_name, overwrite)
    skipped: collections.Counter[str] = collections.Counter()
    examples: dict[str, str] = {}
    inputs = written = recoded = 0
    shard_files: list[str] = []
    sink: wds.ShardWriter | None = None
    try:
        for prep in _prepared_stream(samples, opts, workers):
            inputs += 1
            if prep.reason is not None:
                skipped[prep.reason] += 1
                examples.setdefault(prep.reason, f"{prep.source}: {prep.message}")
                continue
            if sink is None:  # opened lazily so that an input with nothing valid leaves no empty shard
                sink = wds.ShardWriter(str(out).replace("%", "%%") + "/" + shard_name, maxcount=samples_per_shard,
                                       maxsize=math.inf, post=shard_files.append, verbose=0, encoder=False,
                                       mtime=0)  # fixed mtime: same input, same bytes; an int adds no PAX header
            key = make_key(written, samples_per_shard)
            record = _record(prep, key)
            sink.write({
                "__key__": key,
                opts.image_format: prep.image,
                "txt": prep.caption.encode("utf-8"),
                "json": json.dumps(record, ensure_ascii=False, default=_json_default).encode("utf-8"),
            })
            written += 1
            recoded += prep.caption_recoded
    finally:
        if sink is not None:
            sink.close()
    stats: dict[str, Any] = {
        "written": written,
        "shards": len(shard_files),
        "skipped": dict(sorted(skipped.items())),
        "inputs": inputs,
        "caption_recoded": recoded,
        "seconds": round(time.perf_counter() - start, 3),
        "pattern": shard_pattern(out, shard_name, len(shard_files)),
        "image_format": opts.image_format,
        "resize": opts.resize.value,
        "image_size": opts.image_size,
        "samples_per_shard": samples_per_shard,
        "skipped_examples": dict(sorted(examples.items())),
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return stats
