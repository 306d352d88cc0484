"""``unclip-data-check``: read shards through the training pipeline and print JSON statistics."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter

from unclip.data.datamodule import EpochDataLoader, _worker_init
from unclip.data.decode import SampleDecoder
from unclip.data.pipeline import ShardDataset
from unclip.data.shards import ShardSpecError, expand_shards


def _summary(values: list[int]) -> dict:
    if not values:
        return {"min": None, "median": None, "max": None}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def check_shards(specs: list[str], image_size: int = 64, batch_size: int = 64, num_workers: int = 0,
                 max_pixels: int | None = 64_000_000, min_side: int = 1, limit: int | None = None) -> dict:
    """Read every sample of ``specs`` through the training pipeline (epoch mode, one rank).

    :return: ``{"samples", "decode_errors", "skipped", "repaired", "images_per_s", "seconds",
        "caption_chars": {min, median, max}, "image_sizes": {"width", "height": {min, median, max},
        "upscaled": n}, "shards"}``
    """
    urls = expand_shards(specs, "shards")
    dataset = ShardDataset(urls, batch_size=batch_size, image_size=image_size, shuffle_buffer=0,
                           decoder=SampleDecoder(max_pixels=max_pixels, min_side=min_side, draft_size=image_size))
    loader = EpochDataLoader(dataset, lambda: 0, batch_size=None, num_workers=num_workers,
                             worker_init_fn=_worker_init)
    skipped: Counter = Counter()
    repaired: Counter = Counter()
    caption_chars: list[int] = []
    widths: list[int] = []
    heights: list[int] = []
    samples = 0
    start = time.perf_counter()
    for batch in loader:
        stats = batch["data_stats"]
        skipped.update(stats["skipped"])
        repaired.update(stats["repaired"])
        samples += len(batch["key"])
        caption_chars.extend(len(c) for c in batch["caption"])
        if "original_size" in batch:
            widths.extend(batch["original_size"][:, 0].tolist())
            heights.extend(batch["original_size"][:, 1].tolist())
        if limit is not None and samples >= limit:
            break
    seconds = time.perf_counter() - start
    return {
        "samples": samples,
        "decode_errors": skipped.get("decode_error", 0),
        "skipped": dict(sorted(skipped.items())),
        "repaired": dict(sorted(repaired.items())),
        "images_per_s": round(samples / seconds, 1) if seconds > 0 else None,
        "seconds": round(seconds, 3),
        "caption_chars": _summary(caption_chars),
        "image_sizes": {"width": _summary(widths), "height": _summary(heights),
                        "upscaled": sum(min(w, h) < image_size for w, h in zip(widths, heights, strict=True))},
        "shards": len(urls),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unclip-data-check", description=__doc__)
    parser.add_argument("shards", nargs="+", help="shard specs: paths, brace patterns, URLs")
    parser.add_argument("--image-size", type=int, default=64, help="output size of the training transform")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--max-pixels", type=int, default=64_000_000, help="skip larger images (bombs)")
    parser.add_argument("--min-side", type=int, default=1, help="skip images with a shorter side")
    parser.add_argument("--limit", type=int, default=None, help="stop after this many samples")
    args = parser.parse_args(argv)
    try:
        report = check_shards(args.shards, args.image_size, args.batch_size, args.num_workers,
                              args.max_pixels, args.min_side, args.limit)
    except ShardSpecError as exc:
        print(f"unclip-data-check: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
