"""unclip-shards: round trips, every input kind, every PIL mode, and hostile inputs that must be counted."""

from __future__ import annotations

import csv
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unclip.data.make_shards import iter_folder, iter_shards, iter_table, main
from unclip.data.writer import EncodeOptions, SourceSample, make_key, write_shards

# ----------------------------------------------------------------------------- helpers

def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def read_shards(out: Path) -> list[dict]:
    """All samples of all shards in out, in order, as {ext: bytes} plus __key__ (read with plain tarfile)."""
    samples: list[dict] = []
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                if not samples or samples[-1]["__key__"] != key:
                    samples.append({"__key__": key})
                samples[-1][ext] = tar.extractfile(member).read()
    return samples


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def gradient(w: int, h: int, seed: int) -> Image.Image:
    """A smooth image (JPEG-friendly) that differs per seed."""
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full_like(x, seed * 37 % 256)], -1)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def huge_png_header(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, with almost no pixel data: costs nothing to make."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def check_stats(stats: dict, out: Path) -> None:
    """stats.json matches the returned stats and nothing is unaccounted for."""
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk["written"] == stats["written"] and on_disk["skipped"] == stats["skipped"]
    assert stats["written"] + sum(stats["skipped"].values()) == stats["inputs"]
    assert stats["shards"] == len(list(out.glob("*.tar")))


# ----------------------------------------------------------------------------- round trips

def test_png_round_trip_is_exact_and_keys_follow_img2dataset(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (12, 16, 3), dtype=np.uint8) for _ in range(19)]
    samples = [SourceSample(f"s{i}", encode(Image.fromarray(a)), f"caption {i}") for i, a in enumerate(arrays)]
    out = tmp_path / "out"
    stats = write_shards(samples, out, EncodeOptions(image_format="png"), samples_per_shard=8)
    check_stats(stats, out)
    assert (stats["written"], stats["shards"]) == (19, 3)
    assert stats["pattern"] == str(out / "{00000..00002}.tar")
    got = read_shards(out)
    # shard number then a one-digit row (8 per shard), 9 digits in all
    assert [s["__key__"] for s in got[:10]] == [f"{k:09d}" for k in (0, 1, 2, 3, 4, 5, 6, 7, 10, 11)]
    assert got[-1]["__key__"] == make_key(18, 8) == "000000022"
    for i, sample in enumerate(got):
        assert set(sample) == {"__key__", "png", "txt", "json"}
        assert sample["txt"].decode() == f"caption {i}"
        np.testing.assert_array_equal(pixels(sample["png"]), arrays[i])
        meta = json.loads(sample["json"])
        assert meta["key"] == sample["__key__"] and meta["caption"] == f"caption {i}"
        assert (meta["width"], meta["height"], meta["original_width"], meta["source"]) == (16, 12, 16, f"s{i}")


@pytest.mark.parametrize("fmt", ["jpg", "webp"])
def test_lossy_round_trip_within_tolerance(tmp_path, fmt):
    images = [gradient(48, 32, i) for i in range(4)]
    samples = [SourceSample(str(i), img, f"c{i}") for i, img in enumerate(images)]
    write_shards(samples, tmp_path, EncodeOptions(image_format=fmt, quality=95))
    for img, sample in zip(images, read_shards(tmp_path), strict=True):
        diff = np.abs(pixels(sample[fmt]) - np.asarray(img, dtype=np.int16))
        assert diff.mean() < 3, diff.mean()
        assert diff.max() < 40


# ----------------------------------------------------------------------------- PIL modes

def mode_images() -> dict[str, tuple[Image.Image, str, tuple[int, int, int]]]:
    """name -> (image, file format, expected RGB of pixel (0, 0))."""
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red must become white
    la = Image.new("LA", (8, 8), (0, 0))
    half = Image.new("RGBA", (8, 8), (0, 0, 255, 128))  # half-transparent blue over white
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 1
    i16 = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    return {
        "rgba": (rgba, "PNG", (255, 255, 255)),
        "rgba_half": (half, "PNG", (127, 127, 255)),
        "la": (la, "PNG", (255, 255, 255)),
        "p": (pal, "PNG", (10, 200, 30)),
        "p_transparent": (pal_t, "PNG", (255, 255, 255)),
        "l": (Image.new("L", (8, 8), 100), "PNG", (100, 100, 100)),
        "i16": (i16, "PNG", (255, 255, 255)),
        "cmyk": (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "TIFF", (255, 0, 0)),
        "one_bit": (Image.new("1", (8, 8), 1), "PNG", (255, 255, 255)),
    }


def test_every_mode_becomes_rgb_with_transparency_on_white(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    modes = mode_images()
    for name, (img, fmt, _) in modes.items():
        data = encode(img, fmt)
        if name == "p_transparent":
            data = encode(img, fmt, transparency=1)
        (src / f"{name}.{'tif' if fmt == 'TIFF' else 'png'}").write_bytes(data)
        (src / f"{name}.txt").write_text(name)
    stats = write_shards(iter_folder(src), tmp_path / "out", EncodeOptions(image_format="png"))
    assert stats["written"] == len(modes) and stats["skipped"] == {}
    for sample in read_shards(tmp_path / "out"):
        name = sample["txt"].decode()
        img = Image.open(io.BytesIO(sample["png"]))
        assert img.mode == "RGB"
        got = np.asarray(img)[0, 0]
        assert np.abs(got.astype(int) - modes[name][2]).max() <= 2, (name, got)


# ----------------------------------------------------------------------------- hostile inputs

@pytest.fixture
def hostile_folder(tmp_path) -> Path:
    """One valid image per case plus every kind of broken input, each in its own subfolder or stem."""
    root = tmp_path / "hostile"
    (root / "sub").mkdir(parents=True)
    good = encode(gradient(20, 20, 1), "JPEG", quality=90)
    (root / "good.jpg").write_bytes(good)
    (root / "good.txt").write_text("a good caption\n")
    (root / "sub" / "nested.png").write_bytes(encode(gradient(10, 12, 2)))
    (root / "sub" / "nested.txt").write_text("nested")
    (root / "garbage.jpg").write_bytes(b"this is not an image at all" * 10)
    (root / "garbage.txt").write_text("garbage")
    (root / "zero.png").write_bytes(b"")
    (root / "zero.txt").write_text("zero bytes")
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "truncated.txt").write_text("truncated")
    (root / "nocaption.png").write_bytes(encode(gradient(9, 9, 3)))
    (root / "noimage.txt").write_text("caption without image")
    (root / "tiny.png").write_bytes(encode(Image.new("RGB", (1, 1), "red")))
    (root / "tiny.txt").write_text("one pixel")
    (root / "bomb.png").write_bytes(huge_png_header(10_000, 10_000))
    (root / "bomb.txt").write_text("decompression bomb")
    (root / "latin1.png").write_bytes(encode(gradient(8, 8, 4)))
    (root / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    (root / "blank.png").write_bytes(encode(gradient(8, 8, 5)))
    (root / "blank.txt").write_text("  \n")
    (root / "notes.md").write_text("ignored: not an image or caption")
    return root


def test_hostile_inputs_are_counted_and_valid_ones_kept(hostile_folder, tmp_path):
    out = tmp_path / "out"
    opts = EncodeOptions(image_format="png", min_side=2, max_pixels=50_000_000)
    stats = write_shards(iter_folder(hostile_folder), out, opts)
    check_stats(stats, out)
    assert stats["skipped"] == {"decode_error": 3, "empty_caption": 1, "missing_caption": 1, "missing_image": 1,
                                "too_large": 1, "too_small": 1}
    assert stats["inputs"] == 11 and stats["written"] == 3 and stats["caption_recoded"] == 1
    assert set(stats["skipped_examples"]) == set(stats["skipped"])
    captions = {s["txt"].decode("utf-8"): json.loads(s["json"]) for s in read_shards(out)}
    assert set(captions) == {"a good caption", "café crème", "nested"}
    assert captions["café crème"]["caption_recoded"] is True
    assert captions["nested"]["source"] == "sub/nested.png"


def test_bomb_is_rejected_from_its_header(tmp_path):
    # The crafted file has no real pixel data: decoding it would be a decode_error, not too_large.
    sample = SourceSample("bomb", huge_png_header(10_000, 10_000), "x")
    stats = write_shards([sample], tmp_path)
    assert stats["skipped"] == {"too_large": 1} and stats["shards"] == 0
    assert not list(tmp_path.glob("*.tar"))  # nothing valid: no empty shard either


# ----------------------------------------------------------------------------- input kinds

def write_table(path: Path, rows: list[dict], kind: str) -> None:
    if kind == "parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
        return
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if kind == "tsv" else ",")
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.parametrize("kind", ["csv", "tsv", "parquet"])
def test_table_inputs(tmp_path, kind):
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        gradient(10, 10, i).save(tmp_path / "imgs" / f"{i}.png")
    rows = [{"file": f"imgs/{i}.png", "text": f"picture, number {i}", "license": "cc0", "score": i / 2}
            for i in range(3)]
    rows.append({"file": "imgs/missing.png", "text": "gone", "license": "cc0", "score": 0.0})
    rows.append({"file": str(tmp_path / "imgs" / "0.png"), "text": "absolute path", "license": "", "score": 1.0})
    table = tmp_path / "meta" / f"list.{kind}"
    table.parent.mkdir()
    for row in rows:  # relative paths resolve against the table's folder
        if not row["file"].startswith("/"):
            row["file"] = "../" + row["file"]
    write_table(table, rows, kind)
    out = tmp_path / "out"
    stats = write_shards(iter_table(table, "file", "text"), out, EncodeOptions(image_format="png"))
    check_stats(stats, out)
    assert stats["written"] == 4 and stats["skipped"] == {"missing_image": 1}
    got = read_shards(out)
    assert [s["txt"].decode() for s in got] == ["picture, number 0", "picture, number 1", "picture, number 2",
                                              "absolute path"]
    meta = json.loads(got[1]["json"])
    assert meta["license"] == "cc0" and float(meta["score"]) == 0.5 and meta["source"] == "../imgs/1.png"
    with pytest.raises(ValueError, match="columns are"):
        next(iter_table(table, "url", "text"))


def test_csv_with_non_utf8_caption_is_kept(tmp_path):
    gradient(8, 8, 0).save(tmp_path / "a.png")
    (tmp_path / "t.csv").write_bytes(b"image,caption\na.png,na\xefve caf\xe9\n")
    stats = write_shards(iter_table(tmp_path / "t.csv"), tmp_path / "out")
    assert stats["written"] == 1 and stats["caption_recoded"] == 1
    assert read_shards(tmp_path / "out")[0]["txt"].decode() == "naïve café"


def test_reshard_keeps_order_captions_and_json_fields(tmp_path):
    samples = [SourceSample(f"s{i}", gradient(16, 8, i), f"cap {i}", {"extra": i}) for i in range(7)]
    first = tmp_path / "first"
    write_shards(samples, first, EncodeOptions(image_format="png"), samples_per_shard=3)
    second = tmp_path / "second"
    stats = write_shards(iter_shards(str(first / "{00000..00002}.tar")), second,
                         EncodeOptions(image_format="webp", resize="center_crop", image_size=8), samples_per_shard=5)
    check_stats(stats, second)
    assert (stats["written"], stats["shards"]) == (7, 2)
    got = read_shards(second)
    metas = [json.loads(s["json"]) for s in got]
    assert [s["txt"].decode() for s in got] == [f"cap {i}" for i in range(7)]
    assert [m["extra"] for m in metas] == list(range(7))
    assert metas[3]["original_key"] == "000000010" and metas[3]["source"] == "s3"
    assert (metas[3]["width"], metas[3]["original_width"]) == (8, 16)
    # a list of shards works too
    again = write_shards(iter_shards(sorted(map(str, first.glob("*.tar")))), tmp_path / "third")
    assert again["written"] == 7


# ----------------------------------------------------------------------------- resizing, determinism, CLI

@pytest.mark.parametrize("resize,size,src,expected", [
    ("keep", None, (300, 150), (300, 150)),
    ("max_side", 64, (300, 150), (64, 32)),
    ("max_side", 64, (150, 300), (32, 64)),
    ("max_side", 64, (40, 20), (40, 20)),  # never upscaled
    ("center_crop", 64, (300, 150), (64, 64)),
    ("center_crop", 64, (40, 20), (64, 64)),
])
def test_resize_policies(tmp_path, resize, size, src, expected):
    opts = EncodeOptions(resize=resize, image_size=size, image_format="png")
    stats = write_shards([SourceSample("x", encode(gradient(*src, 0), "JPEG"), "c")], tmp_path, opts)
    assert stats["written"] == 1
    sample = read_shards(tmp_path)[0]
    assert Image.open(io.BytesIO(sample["png"])).size == expected
    meta = json.loads(sample["json"])
    assert (meta["width"], meta["height"], meta["original_width"], meta["original_height"]) == (*expected, *src)


def test_exif_orientation_is_applied(tmp_path):
    img = gradient(20, 10, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise
    data = encode(img, "JPEG", quality=95, exif=exif.tobytes())
    write_shards([SourceSample("x", data, "c")], tmp_path, EncodeOptions(image_format="png"))
    sample = read_shards(tmp_path)[0]
    out = pixels(sample["png"])
    expected = np.asarray(img.transpose(Image.Transpose.ROTATE_270), dtype=np.int16)
    assert out.shape == (20, 10, 3) and np.abs(out - expected).mean() < 3
    meta = json.loads(sample["json"])
    assert (meta["width"], meta["height"], meta["original_width"], meta["original_height"]) == (10, 20, 10, 20)


def test_center_crop_keeps_the_centre(tmp_path):
    arr = np.zeros((10, 30, 3), np.uint8)
    arr[:, 10:20] = (0, 255, 0)  # green centre square between red side bars
    arr[:, :10] = arr[:, 20:] = (255, 0, 0)
    opts = EncodeOptions(resize="center_crop", image_size=10, image_format="png")
    write_shards([SourceSample("x", Image.fromarray(arr), "c")], tmp_path, opts)
    assert (pixels(read_shards(tmp_path)[0]["png"]) == (0, 255, 0)).all()


def test_output_is_deterministic_with_and_without_workers(hostile_folder, tmp_path):
    opts = EncodeOptions(image_format="jpg", min_side=2)
    write_shards(iter_folder(hostile_folder), tmp_path / "a", opts, samples_per_shard=2)
    write_shards(iter_folder(hostile_folder), tmp_path / "b", opts, samples_per_shard=2, workers=2)
    names = sorted(p.name for p in (tmp_path / "a").glob("*.tar"))
    assert names == sorted(p.name for p in (tmp_path / "b").glob("*.tar")) and len(names) == 2
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_invalid_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="valid"):
        EncodeOptions(resize="stretch")
    with pytest.raises(ValueError, match="image_size"):
        EncodeOptions(resize="max_side")
    with pytest.raises(ValueError, match="valid"):
        EncodeOptions(image_format="gif")
    with pytest.raises(ValueError, match="%d"):
        write_shards([], tmp_path, shard_name="shard.tar")


def test_cli(hostile_folder, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [str(hostile_folder), "--out", str(out), "--format", "webp", "--resize", "max_side", "--image-size",
            "16", "--min-side", "2", "--samples-per-shard", "2", "--shard-name", "part-%04d.tar"]
    main(argv)
    stats = json.loads(capsys.readouterr().out)
    assert stats["written"] == 3 and stats["shards"] == 2 and stats["pattern"] == str(out / "part-{0000..0001}.tar")
    assert sorted(p.name for p in out.glob("*.tar")) == ["part-0000.tar", "part-0001.tar"]
    with pytest.raises(FileExistsError):
        main(argv)
    main(argv + ["--overwrite"])
    assert json.loads(capsys.readouterr().out)["written"] == 3


def test_reshard_counts_a_truncated_tar_and_keeps_samples_before_the_cut(tmp_path):
    import io
    import tarfile

    from unclip.data.make_shards import iter_shards
    from unclip.data.writer import write_shards

    def png(colour):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
        return buf.getvalue()

    whole = tmp_path / "whole.tar"
    with tarfile.open(whole, "w") as tar:
        for i, data in enumerate([png("red"), png("blue"), png("green") * 50]):
            for name, payload in ((f"k{i}.png", data), (f"k{i}.txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    with tarfile.open(whole) as tar:
        cut = next(m.offset_data + m.size // 2 for m in tar.getmembers() if m.name == "k2.png")
    broken = tmp_path / "broken.tar"
    broken.write_bytes(whole.read_bytes()[:cut])
    stats = write_shards(iter_shards(str(broken)), tmp_path / "out")
    assert stats["written"] == 2
    assert stats["skipped"] == {"read_error": 1}
    assert stats["written"] + sum(stats["skipped"].values()) == stats["inputs"]
