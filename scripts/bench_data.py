"""Data pipeline throughput: the full read pipeline at 0/1/2 workers against a PIL decode+resize floor.

The floor decodes the same JPEG bytes (already in memory) and resizes them in one process, with
nothing else: the pipeline reads tars, decodes, crops, resizes and batches on top. Rows without a dtype suffix
are the training configuration (``data.image_dtype=uint8``: workers send uint8 pixels, the datamodule normalises
them on the training device); ``_float32`` rows normalise in the workers (what unclip-embed and unclip-eval read).
scripts/bench.py adds the suite's peak RSS (it runs each suite in a process of its own).
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
import time
from pathlib import Path

from PIL import Image

DEFAULT_SHARDS = os.environ.get("UNCLIP_BENCH_SHARDS", "data/emoji/train/{00000..00003}.tar")


def _image_bytes(urls: list[str]) -> list[bytes]:
    out = []
    for url in urls:
        with tarfile.open(url) as tar:
            out += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith((".jpg", ".png", ".webp"))]
    return out


def floor_images_per_s(blobs: list[bytes], size: int, draft: bool, repeat: int) -> float:
    """PIL decode + resize alone, bytes already in memory, one process."""
    start = time.perf_counter()
    for _ in range(repeat):
        for data in blobs:
            img = Image.open(io.BytesIO(data))
            if draft:
                img.draft("RGB", (size, size))
            img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    return repeat * len(blobs) / (time.perf_counter() - start)


def pipeline_images_per_s(urls: list[str], size: int, workers: int, batch_size: int, repeat: int,
                          batches: int, image_dtype: str = "uint8") -> tuple[float, float]:
    """Steady-state images/s of the full pipeline (from the first batch on) and the start-up seconds.

    ``batches`` full batches per epoch (the shards are re-read as needed), so the measurement is not
    dominated by forking workers on a 3,540-image set.
    """
    from unclip.data.datamodule import EpochDataLoader, _worker_init
    from unclip.data.pipeline import ShardDataset

    dataset = ShardDataset(urls, batch_size=batch_size, image_size=size, shuffle_buffer=1000,
                           batches_per_epoch=batches, image_dtype=image_dtype)
    loader = EpochDataLoader(dataset, lambda: 0, batch_size=None, num_workers=workers, worker_init_fn=_worker_init)
    best, startup = 0.0, float("inf")
    for epoch in range(repeat):
        dataset.set_epoch(epoch)
        start = time.perf_counter()
        it = iter(loader)
        next(it)
        first = time.perf_counter()
        n = sum(batch["image"].shape[0] for batch in it)
        best = max(best, n / (time.perf_counter() - first))
        startup = min(startup, first - start)
    return best, startup


def run(quick: bool = False, shards: str = DEFAULT_SHARDS, size: int = 64) -> list[dict]:
    from unclip.data.shards import expand_shards

    urls = expand_shards(shards, "UNCLIP_BENCH_SHARDS")
    blobs = _image_bytes(urls)
    repeat = 1 if quick else 3
    floor = max(floor_images_per_s(blobs, size, False, 1) for _ in range(repeat))
    floor_draft = max(floor_images_per_s(blobs, size, True, 1) for _ in range(repeat))
    rows = [
        {"workload": "data/floor_pil_decode_resize", "metric": "images_per_s", "value": round(floor, 1),
         "unit": "img/s"},
        {"workload": "data/floor_pil_draft_decode_resize", "metric": "images_per_s", "value": round(floor_draft, 1),
         "unit": "img/s"},
    ]
    # uint8 batches are what training loads (data.image_dtype); float32 ones what unclip-embed / eval read
    for workers, dtype in ((0, "uint8"), (1, "uint8"), (2, "uint8"), (2, "float32")):
        ips, startup = pipeline_images_per_s(urls, size, workers, 64, repeat, batches=60 if quick else 150,
                                             image_dtype=dtype)
        name = f"data/pipeline_{workers}w" + ("" if dtype == "uint8" else f"_{dtype}")
        rows.append({"workload": name, "metric": "images_per_s", "value": round(ips, 1), "unit": "img/s"})
        rows.append({"workload": name, "metric": "first_batch", "value": round(startup, 3), "unit": "s"})
        rows.append({"workload": name, "metric": "ratio_to_floor", "value": round(ips / floor, 3), "unit": "x"})
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    print(json.dumps(run(quick="--quick" in sys.argv), indent=1))
