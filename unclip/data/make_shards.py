"""``unclip-shards``: turn a folder, a CSV / TSV / parquet table or existing shards into webdataset shards.

Inputs are read by the iter_* functions below into SourceSample streams; unclip.data.writer does the rest.
Examples::

    unclip-shards photos/ --out shards/ --resize center_crop --image-size 256
    unclip-shards captions.parquet --image-column file --caption-column text --out shards/ --workers 4
    unclip-shards 'old/{00000..00031}.tar' --out new/ --samples-per-shard 5000 --format webp
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from webdataset.shardlists import expand_urls
from webdataset.tariterators import tarfile_samples

from unclip.data.image_io import IMAGE_EXTENSIONS
from unclip.data.writer import DEFAULT_MAX_PIXELS, OUTPUT_FORMATS, EncodeOptions, ResizeMode, SourceSample, write_shards

# A folder of originals may hold formats we read but never write.
FOLDER_IMAGE_EXTENSIONS = tuple(IMAGE_EXTENSIONS) + ("gif", "bmp", "tif", "tiff")
TABLE_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}


def iter_folder(root: str | Path) -> Iterator[SourceSample]:
    """Pair each image under ``root`` with its same-stem ``.txt`` caption, in sorted (deterministic) order.

    An image without a caption and a caption without an image are still yielded (with None) so the writer
    counts them. Several images sharing one stem each become a sample with that caption.

    :param root: folder to walk recursively.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        groups: dict[str, dict[str, Any]] = {}
        for name in sorted(filenames):
            stem, dot, ext = name.rpartition(".")
            if not dot or not stem or name.startswith("."):
                continue
            ext = ext.lower()
            if ext in FOLDER_IMAGE_EXTENSIONS:
                groups.setdefault(stem, {"images": [], "txt": None})["images"].append(name)
            elif ext == "txt":
                groups.setdefault(stem, {"images": [], "txt": None})["txt"] = name
        folder = Path(dirpath)
        for stem in sorted(groups):
            group = groups[stem]
            caption = (folder / group["txt"]).read_bytes() if group["txt"] else None
            for name in group["images"]:
                yield SourceSample((folder / name).relative_to(root).as_posix(), folder / name, caption)
            if not group["images"]:
                yield SourceSample((folder / group["txt"]).relative_to(root).as_posix(), None, caption)


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (
        isinstance(value, str) and not value.strip())


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, str):  # undecodable CSV bytes arrive as surrogates
        return value.encode("utf-8", "surrogateescape").decode("utf-8", errors="replace")
    return value


def _read_rows(path: Path, kind: str) -> tuple[list[str], Iterator[dict[str, Any]]]:
    """Return (column names, row dicts) for a csv / tsv / parquet file, streaming rows."""
    if kind == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ImportError("reading parquet needs pyarrow: pip install 'unclip[parquet]'") from exc
        table = pq.ParquetFile(path)
        rows = (row for batch in table.iter_batches(batch_size=1024) for row in batch.to_pylist())
        return list(table.schema_arrow.names), rows
    # surrogateescape: a non-UTF-8 byte in a caption must reach decode_caption, not kill the whole read.
    handle = open(path, newline="", encoding="utf-8-sig", errors="surrogateescape")
    reader = csv.DictReader(handle, delimiter="\t" if kind == "tsv" else ",")
    columns = list(reader.fieldnames or [])

    def rows_then_close() -> Iterator[dict[str, Any]]:
        with handle:
            yield from reader

    return columns, rows_then_close()


def iter_table(path: str | Path, image_column: str = "image", caption_column: str = "caption",
               kind: str | None = None) -> Iterator[SourceSample]:
    """Read image paths and captions from a CSV, TSV or parquet file; other columns go into the json.

    :param path: the table file.
    :param image_column: column holding image paths, relative to the table's folder or absolute.
    :param caption_column: column holding captions.
    :param kind: csv, tsv or parquet; by default from the file suffix.
    """
    path = Path(path)
    kind = kind or TABLE_SUFFIXES.get(path.suffix.lower())
    if kind is None or kind not in TABLE_SUFFIXES.values():
        raise ValueError(f"cannot tell the table format of {path}; use a .csv, .tsv or .parquet suffix")
    columns, rows = _read_rows(path, kind)
    missing = [c for c in (image_column, caption_column) if c not in columns]
    if missing:
        raise ValueError(f"{path} has no column {missing}; its columns are {columns}")
    for number, row in enumerate(rows):
        cell, caption = row.get(image_column), row.get(caption_column)
        image = None if _blank(cell) else path.parent / os.fsdecode(str(cell).encode("utf-8", "surrogateescape"))
        if isinstance(caption, str):
            caption = caption.encode("utf-8", "surrogateescape")  # back to bytes: decode_caption decides
        elif caption is not None and not isinstance(caption, bytes):
            caption = None if _blank(caption) else str(caption)
        meta = {k: _json_safe(v) for k, v in row.items() if k not in (image_column, caption_column) and k}
        source = f"{path.name} row {number}" if _blank(cell) else _json_safe(str(cell))
        yield SourceSample(source, image, caption, meta)


def iter_shards(urls: str | Sequence[str]) -> Iterator[SourceSample]:
    """Read samples from existing webdataset shards (for re-sharding); their json fields are kept.

    :param urls: a brace pattern (``dir/{00000..00009}.tar``) or a list of shard paths / patterns.
    """
    specs = [urls] if isinstance(urls, str) else list(urls)
    expanded = [{"url": url} for spec in specs for url in expand_urls(spec)]
    errors: list[Exception] = []

    def count_and_continue(exn: Exception) -> bool:
        errors.append(exn)
        return True

    def pending_errors() -> Iterator[SourceSample]:
        # A truncated tar reports one failure twice (member, then header): count one per message.
        for message in dict.fromkeys(str(e.args[0]).split(" @ ")[0] for e in errors):
            yield SourceSample(f"tar read error: {message}", None, None, error="read_error")
        errors.clear()

    for sample in tarfile_samples(expanded, handler=count_and_continue):
        yield from pending_errors()
        key, url = sample["__key__"], sample["__url__"]
        image = next((sample[ext] for ext in FOLDER_IMAGE_EXTENSIONS if ext in sample), None)
        meta: dict[str, Any] = {}
        if "json" in sample:
            try:
                loaded = json.loads(sample["json"])
                meta = loaded if isinstance(loaded, dict) else {}
            except ValueError:
                pass  # a broken json loses its metadata, not the sample
        meta["original_key"] = key
        source = meta.get("source") or meta.get("url") or f"{url}#{key}"
        yield SourceSample(str(source), image, sample.get("txt"), meta)
    yield from pending_errors()


def iter_inputs(inputs: Sequence[str], image_column: str = "image", caption_column: str = "caption",
                input_type: str = "auto") -> Iterable[SourceSample]:
    """Chain the inputs given on the command line, each read by the iterator its type calls for.

    :param inputs: folders, table files, shard paths or brace patterns.
    :param image_column: image-path column for tables.
    :param caption_column: caption column for tables.
    :param input_type: auto, folder, table or shards.
    """
    for spec in inputs:
        kind = input_type
        if kind == "auto":
            if os.path.isdir(spec):
                kind = "folder"
            elif Path(spec).suffix.lower() in TABLE_SUFFIXES:
                kind = "table"
            else:
                kind = "shards"
        if kind == "folder":
            yield from iter_folder(spec)
        elif kind == "table":
            yield from iter_table(spec, image_column, caption_column)
        elif kind == "shards":
            yield from iter_shards(spec)
        else:
            raise ValueError(f"unknown input_type {input_type!r}; valid: auto, folder, table, shards")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of unclip-shards."""
    p = argparse.ArgumentParser(prog="unclip-shards", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", help="folder(s), .csv/.tsv/.parquet file(s), or shard paths/brace patterns")
    p.add_argument("--out", "-o", required=True, help="output folder")
    p.add_argument("--input-type", default="auto", choices=["auto", "folder", "table", "shards"])
    p.add_argument("--image-column", default="image", help="table column with image paths")
    p.add_argument("--caption-column", default="caption", help="table column with captions")
    p.add_argument("--samples-per-shard", type=int, default=10_000)
    p.add_argument("--resize", default="keep", choices=[m.value for m in ResizeMode])
    p.add_argument("--image-size", type=int, default=None, help="N for max_side / center_crop")
    p.add_argument("--format", default="jpg", choices=list(OUTPUT_FORMATS), dest="image_format")
    p.add_argument("--quality", type=int, default=95, help="JPEG / WebP quality")
    p.add_argument("--min-side", type=int, default=1, help="skip images with a shorter side below this")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="skip larger images without decoding them; 0 = no limit")
    p.add_argument("--shard-name", default="%05d.tar", help="printf-style shard file name")
    p.add_argument("--workers", type=int, default=1, help="image-processing processes")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in the output folder")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """Run unclip-shards, print its stats as JSON (also written to OUT/stats.json).

    :param argv: arguments (default: sys.argv[1:]).
    """
    args = build_parser().parse_args(argv)
    opts = EncodeOptions(resize=args.resize, image_size=args.image_size, image_format=args.image_format,
                         quality=args.quality, min_side=args.min_side, max_pixels=args.max_pixels or None)
    samples = iter_inputs(args.inputs, args.image_column, args.caption_column, args.input_type)
    stats = write_shards(samples, args.out, opts, samples_per_shard=args.samples_per_shard,
                         shard_name=args.shard_name, workers=args.workers, overwrite=args.overwrite)
    print(json.dumps(stats, ensure_ascii=False))


if __name__ == "__main__":
    main()
