"""Built-in demo shapes: determinism, held-out combinations, the cache, and the pixel checker."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from webdataset.shardlists import expand_urls

import unclip.data.demo_shapes as demo
from unclip.data.demo_shapes import (
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    DemoShapesConfig,
    ShapeSpec,
    caption,
    ensure_demo_shards,
    hard_negative_captions,
    held_out_combos,
    make_specs,
    render,
)
from unclip.data.demo_shapes_check import caption_accuracy, caption_matches, check_image, parse_caption

SMALL = DemoShapesConfig(seed=3, n_train=50, n_val=40, samples_per_shard=20)
ATTRIBUTES = ("shape", "color", "background", "size", "position")


def read_split(pattern: str) -> list[dict]:
    """Samples of a split as dicts of {ext: bytes}, in order."""
    samples: list[dict] = []
    for shard in expand_urls(pattern):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                if not samples or samples[-1]["__key__"] != key:
                    samples.append({"__key__": key})
                samples[-1][ext] = tar.extractfile(member).read()
    return samples


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> dict[str, str]:
    return ensure_demo_shards(SMALL, tmp_path_factory.mktemp("cache"))


def test_layout_and_records(small_set):
    assert small_set["train"].endswith("train/{00000..00002}.tar")
    assert small_set["val"].endswith("val/{00000..00001}.tar")
    train = read_split(small_set["train"])
    assert len(train) == 50 and train[0]["__key__"] == "000000000"
    for sample in train[:10]:
        meta = json.loads(sample["json"])
        img = Image.open(io.BytesIO(sample["png"]))
        assert img.size == (64, 64) and img.mode == "RGB"
        assert meta["caption"] == sample["txt"].decode()
        assert parse_caption(meta["caption"])["shape"] == meta["shape"]
        # the png is lossless, so the checker reads back exactly what the json records
        got = check_image(img)
        assert {k: got[k] for k in ATTRIBUTES} == {k: meta[k] for k in ATTRIBUTES}


def test_same_seed_same_bytes_other_seed_other_data(small_set, tmp_path):
    again = ensure_demo_shards(SMALL, tmp_path / "other_cache")
    for split in ("train", "val"):
        for a, b in zip(expand_urls(small_set[split]), expand_urls(again[split]), strict=True):
            assert Path(a).read_bytes() == Path(b).read_bytes()
    other = DemoShapesConfig(seed=4, n_train=50, n_val=40, samples_per_shard=20)
    assert [caption(s) for s, _ in make_specs(other, "train")] != [caption(s) for s, _ in make_specs(SMALL, "train")]


def test_held_out_combos_never_in_train_and_all_in_val():
    cfg = DemoShapesConfig(seed=1, n_train=3000, n_val=300)
    held = set(held_out_combos(cfg))
    assert len(held) == cfg.held_out_count
    train = make_specs(cfg, "train")
    assert not any((s.color, s.shape) in held or flag for s, flag in train)
    # every colour and every shape still appears in training
    assert {s.color for s, _ in train} == set(COLORS) and {s.shape for s, _ in train} == set(SHAPES)
    val = make_specs(cfg, "val")
    assert all(flag == ((s.color, s.shape) in held) for s, flag in val)
    assert {(s.color, s.shape) for s, flag in val if flag} == held
    assert sum(flag for _, flag in val) == 150  # val_held_out_fraction of 300
    assert all(s.background != s.color for s, _ in train + val)


def test_held_out_recorded_in_shards(small_set):
    held = {tuple(c) for c in held_out_combos(SMALL)}
    train = [json.loads(s["json"]) for s in read_split(small_set["train"])]
    val = [json.loads(s["json"]) for s in read_split(small_set["val"])]
    assert not any(m["held_out"] for m in train)
    assert any(m["held_out"] for m in val) and not all(m["held_out"] for m in val)
    assert all(m["held_out"] == ((m["color"], m["shape"]) in held) for m in val)


def test_hard_negatives_swap_one_attribute_and_never_name_a_held_out_pair(small_set):
    held = {tuple(c) for c in held_out_combos(SMALL)}
    for sample in read_split(small_set["train"]) + read_split(small_set["val"]):
        meta = json.loads(sample["json"])
        negatives = meta["hard_negatives"]
        assert negatives and len(set(negatives)) == len(negatives) and meta["caption"] not in negatives
        for negative in negatives:
            parsed = parse_caption(negative)
            assert (parsed["color"], parsed["shape"]) not in held
            changed = [k for k in ("shape", "color", "background", "size") if parsed[k] != meta[k]]
            assert changed == ["shape"], negative  # the default swaps the shape only
        other_shapes = {s for s in SHAPES if s != meta["shape"] and (meta["color"], s) not in held}
        assert {parse_caption(n)["shape"] for n in negatives} == other_shapes


def test_hard_negative_attributes_are_configurable():
    cfg = DemoShapesConfig(n_train=20, n_val=10, hard_negative_attributes=("color", "size"))
    held = set(held_out_combos(cfg))
    spec, _ = make_specs(cfg, "train")[0]
    negatives = [parse_caption(n) for n in hard_negative_captions(spec, cfg, held)]
    colours = [n["color"] for n in negatives if n["size"] == spec.size]
    assert spec.background not in colours and spec.color not in colours
    assert {n["size"] for n in negatives if n["color"] == spec.color} == set(SIZES) - {spec.size}
    with pytest.raises(ValueError, match="unknown hard-negative attribute"):
        hard_negative_captions(spec, DemoShapesConfig(hard_negative_attributes=("mood",)), held)


def test_explicit_held_out_list():
    cfg = DemoShapesConfig(n_train=500, n_val=50, held_out=(("red", "circle"), ("blue", "star")))
    assert held_out_combos(cfg) == [("red", "circle"), ("blue", "star")]
    assert not any((s.color, s.shape) in {("red", "circle"), ("blue", "star")} for s, _ in make_specs(cfg, "train"))
    with pytest.raises(ValueError, match="unknown held-out"):
        held_out_combos(DemoShapesConfig(held_out=(("red", "blob"),)))


PLACED = {"placed_sizes": ("small", "medium"), "position_in_caption": 0.5}  # shapes off-centre, positions named


def test_checker_reads_its_own_clean_images():
    cfg = DemoShapesConfig(seed=11, n_train=10, n_val=600, **PLACED)
    specs = [s for s, _ in make_specs(cfg, "val")]
    correct = 0
    for spec in specs:
        got = check_image(render(spec, cfg.image_size))
        correct += all(got[k] == getattr(spec, k) for k in ATTRIBUTES)
    assert correct / len(specs) >= 0.99


def test_default_shapes_are_centred_and_captions_name_no_position():
    specs = make_specs(DemoShapesConfig(n_train=200), "train")
    assert {s.position for s, _ in specs} == {"center"} and not any(s.named_position for s, _ in specs)
    assert {s.size for s, _ in specs} == set(SIZES)
    with pytest.raises(ValueError, match="placed_sizes \\['large'\\] cannot move off-centre"):
        DemoShapesConfig(placed_sizes=("large",))


@pytest.mark.parametrize("image_size", [32, 128])
def test_checker_other_image_sizes(image_size):
    cfg = DemoShapesConfig(seed=2, n_train=80, image_size=image_size)
    for spec, _ in make_specs(cfg, "train"):
        img = render(spec, image_size)
        assert img.size == (image_size, image_size)
        assert check_image(img)["shape"] == spec.shape


def test_checker_without_foreground():
    got = check_image(Image.new("RGB", (64, 64), COLORS["blue"]))
    assert got["background"] == "blue" and got["shape"] is None and got["color"] is None


def test_caption_grammar_and_parse_round_trip():
    spec = ShapeSpec("circle", "orange", "white", "small", "top left", 0.3, (-0.27, -0.27))
    assert caption(spec) == "a small orange circle in the top left on a white background"
    spec = ShapeSpec("heart", "red", "orange", "large", "center", 0.75, (0.0, 0.0), named_position=False)
    assert caption(spec) == "a large red heart on an orange background"
    specs = make_specs(DemoShapesConfig(n_train=300, **PLACED), "train")
    assert {s.position for s, _ in specs} == set(POSITIONS) and any(s.named_position for s, _ in specs)
    for spec, _ in specs:
        parsed = parse_caption(caption(spec))
        assert parsed["position"] == (spec.position if spec.named_position else None)
        assert all(parsed[k] == getattr(spec, k) for k in ("shape", "color", "background", "size"))
    with pytest.raises(ValueError, match="not a demo-shapes caption"):
        parse_caption("a photo of a cat")


def test_caption_matches_and_accuracy():
    spec = ShapeSpec("star", "yellow", "purple", "medium", "bottom right", 0.5, (0.17, 0.17))
    img = render(spec)
    assert caption_matches(spec, img) == {"shape": True, "color": True, "background": True, "size": True,
                                          "position": True, "all": True}
    wrong = caption_matches("a medium blue star on a purple background", img)
    assert wrong["color"] is False and wrong["shape"] is True and wrong["position"] is None and not wrong["all"]
    specs = [s for s, _ in make_specs(DemoShapesConfig(seed=5, n_train=40), "train")]
    acc = caption_accuracy([caption(s) for s in specs], [render(s) for s in specs])
    assert acc["n"] == 40 and acc["all"] == 1.0 and acc["shape"] == 1.0
    blank = caption_accuracy([caption(s) for s in specs], [Image.new("RGB", (64, 64), "white")] * 40)
    assert blank["shape"] == 0.0


def test_cache_is_reused_and_env_respected(tmp_path, monkeypatch):
    monkeypatch.setenv("UNCLIP_CACHE", str(tmp_path))
    cfg = DemoShapesConfig(n_train=5, n_val=3)
    first = ensure_demo_shards(cfg)
    assert first["train"].startswith(str(tmp_path / "demo_shapes" / cfg.version_hash()))
    shard = Path(first["train"])
    stamp = shard.stat().st_mtime_ns
    monkeypatch.setattr(demo, "write_shards", lambda *a, **k: pytest.fail("rebuilt a cached set"))
    assert ensure_demo_shards(cfg) == first and shard.stat().st_mtime_ns == stamp
    assert DemoShapesConfig(n_train=6, n_val=3).version_hash() != cfg.version_hash()


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    cfg = DemoShapesConfig(n_train=5, n_val=3)
    real = demo.write_shards

    def dies_on_val(samples, out_dir, *args, **kwargs):
        if Path(out_dir).name == "val":
            raise KeyboardInterrupt
        return real(samples, out_dir, *args, **kwargs)

    monkeypatch.setattr(demo, "write_shards", dies_on_val)
    with pytest.raises(KeyboardInterrupt):
        ensure_demo_shards(cfg, tmp_path)
    assert list((tmp_path / "demo_shapes").iterdir()) == []
    monkeypatch.setattr(demo, "write_shards", real)
    patterns = ensure_demo_shards(cfg, tmp_path)
    assert len(read_split(patterns["train"])) == 5 and len(read_split(patterns["val"])) == 3


def test_render_is_exact_colours_inside_the_shape():
    spec = ShapeSpec("square", "green", "black", "large", "center", 0.75, (0.0, 0.0))
    arr = np.asarray(render(spec))
    assert tuple(arr[32, 32]) == COLORS["green"] and tuple(arr[0, 0]) == COLORS["black"]


@pytest.mark.parametrize("field", ["n_train", "n_val"])
def test_empty_split_is_refused_naming_the_field(field):
    # an empty split writes no shards, so ensure_demo_shards would have no pattern to return for it
    with pytest.raises(ValueError, match=f"{field} must be >= 1, got 0"):
        DemoShapesConfig(**{field: 0})
