"""Hostile or odd members: each is skipped (or dropped from its sample) and counted, never fatal."""

from __future__ import annotations

import gzip
import io
import tarfile
import tracemalloc
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image, UnidentifiedImageError

from tests.data.shard_helpers import image_bytes, npy_bytes, sample_members, write_tar
from unclip.data.datamodule import EpochDataLoader
from unclip.data.image_io import open_image
from unclip.data.inspect import check_shards
from unclip.data.pipeline import ShardDataset

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
       b"newpath 0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n")


def huge_header_npy() -> bytes:
    """A 100-byte npy whose header declares a 10^5 x 10^5 float64 array (80 GB)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": (100_000, 100_000)})
    return buf.getvalue() + b"\0" * 16


def hostile_shard(path) -> tuple[str, set[str]]:
    """One shard of every odd member at once; returns its URL and the keys that must come out."""
    extra = {"hugenpy": [("hugenpy.big.npy", huge_header_npy())],
             "structnpy": [("structnpy.rec.npy", npy_bytes(np.zeros(3, dtype=[("a", "<i4"), ("b", "<f4")])))],
             "reserved": [("reserved.image.npy", npy_bytes(np.zeros(3, dtype=np.float32))),
                          ("reserved.caption.npy", npy_bytes(np.zeros(2, dtype=np.int64))),
                          ("reserved.key.npy", npy_bytes(np.zeros(1, dtype=np.uint8)))]}
    members = []
    for key in ("ok0", "ok1", "deepjson", "hugenpy", "structnpy", "reserved", "eps"):
        own = sample_members(key, caption=f"caption of {key}", image=image_bytes() if key != "eps" else EPS)
        if key == "deepjson":
            own[-1] = ("deepjson.json", b"[" * 200_000 + b"]" * 200_000)
        # every sample has emb.npy, ok1's longer: ragged over the batch
        own.append((f"{key}.emb.npy", npy_bytes(np.arange(5 if key == "ok1" else 4, dtype=np.float32))))
        members += own + extra.get(key, [])
    return str(write_tar(path, members)), {"ok0", "ok1", "deepjson", "hugenpy", "structnpy", "reserved"}


def read_all(urls: list[str], batch_size: int = 16) -> tuple[list[dict], Counter, Counter]:
    batches, skipped, repaired = [], Counter(), Counter()
    for batch in EpochDataLoader(ShardDataset(urls, batch_size=batch_size, image_size=8, shuffle_buffer=0),
                                 lambda: 0, batch_size=None, num_workers=0):
        batches.append(batch)
        skipped.update(batch["data_stats"]["skipped"])
        repaired.update(batch["data_stats"]["repaired"])
    return batches, skipped, repaired


def test_a_shard_of_hostile_members_is_read_to_the_end_with_counts(tmp_path):
    url, keep = hostile_shard(tmp_path / "00000.tar")
    batches, skipped, repaired = read_all([url])
    (batch,) = batches
    assert set(batch["key"]) == keep
    assert skipped == {"decode_error": 1}  # the EPS behind a .jpg name
    assert repaired["bad_json"] == 1  # 200k levels of nesting
    assert repaired["bad_npy"] == 2  # the huge header and the structured array
    assert repaired["npy_reserved_name"] == 3 and repaired["ragged_npy"] == 1
    # no member replaced a batch field, and the ragged field is left out rather than crashing collate
    assert batch["image"].shape == (6, 3, 8, 8) and batch["caption"][batch["key"].index("reserved")] == \
        "caption of reserved"
    assert batch["key"] == [k for k in batch["key"] if isinstance(k, str)] and "emb" not in batch
    assert all(isinstance(j, dict) for j in batch["json"])


def test_unclip_data_check_reports_the_hostile_shard(tmp_path):
    url, keep = hostile_shard(tmp_path / "00000.tar")
    report = check_shards([url], image_size=8, batch_size=4)
    assert report["samples"] == len(keep) and report["skipped"] == {"decode_error": 1}
    assert report["repaired"]["bad_npy"] == 2 and report["repaired"]["bad_json"] == 1


def test_npy_headers_are_checked_before_allocating():
    from unclip.data.decode import load_npy

    with pytest.raises(ValueError, match="declares"):
        load_npy(huge_header_npy())
    with pytest.raises(ValueError, match="plain numeric"):
        load_npy(npy_bytes(np.zeros(2, dtype=[("a", "<i4")])))
    with pytest.raises(ValueError, match="plain numeric"):
        load_npy(npy_bytes(np.array(["text"])))
    fortran = np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3))
    assert np.array_equal(load_npy(npy_bytes(fortran)), fortran)


def test_a_jpg_member_that_is_eps_never_reaches_the_eps_parser():
    with pytest.raises(UnidentifiedImageError):
        open_image(EPS)
    assert open_image(image_bytes(fmt="PNG")).format == "PNG"  # a mislabelled PNG still opens


def test_members_the_decoder_ignores_are_never_read(tmp_path):
    # a gzip-compressed shard holding a 96 MiB member of zeros (about 100 KB compressed) nobody reads; passing
    # over it still inflates it chunk by chunk (a chunk of zeros inflates to some 20 MiB), never all at once
    path = tmp_path / "00000.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in sample_members("k0", image=image_bytes()) + [("k0.blob.bin", bytes(96 << 20))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        batches, _, repaired = read_all([str(path)])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [b["key"] for b in batches] == [["k0"]] and repaired["ignored_member:bin"] == 1
    assert peak < 48 << 20, f"peak {peak / 2**20:.0f} MiB: the ignored member was read"


def test_pil_bomb_guard_stays_on_for_the_whole_process(tmp_path):
    import unclip.data.image_io  # noqa: F401 - importing it must not switch the guard off
    import unclip.images
    from unclip.images import load_images

    assert Image.MAX_IMAGE_PIXELS is not None
    # a PNG whose header claims 20000 x 20000 pixels: refused at open, before any pixel is allocated
    png = bytearray(image_bytes(color=0, fmt="PNG", mode="L", size=(4, 4)))
    png[16:24] = (20000).to_bytes(4, "big") * 2
    png[29:33] = gzip.zlib.crc32(bytes(png[12:29])).to_bytes(4, "big")
    path = tmp_path / "bomb.png"
    path.write_bytes(bytes(png))
    with pytest.raises(Image.DecompressionBombError):
        load_images(str(path))
    assert unclip.images is not None and torch is not None
