"""The webdataset read pipeline: splitting, determinism, batching and hostile input."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from tests.data.shard_helpers import image_bytes, npy_bytes, sample_members, write_clean_shards, write_tar
from unclip.data.datamodule import EpochDataLoader, ShardDataModule
from unclip.data.pipeline import ShardDataset, collate, normalize_images


def read_keys(dataset: ShardDataset, num_workers: int, epoch: int = 0) -> list[str]:
    loader = EpochDataLoader(dataset, lambda: epoch, batch_size=None, num_workers=num_workers)
    return [k for batch in loader for k in batch["key"]]


def test_epoch_mode_reads_each_sample_exactly_once_over_ranks_and_workers(tmp_path):
    urls = write_clean_shards(tmp_path, n_shards=8, per_shard=5)
    expected = {f"{s:05d}{i:04d}" for s in range(8) for i in range(5)}
    for epoch in (0, 1):
        seen = []
        for rank in range(2):
            ds = ShardDataset(urls, batch_size=3, image_size=16, rank=rank, world_size=2, seed=7,
                              shuffle_buffer=10)
            seen += read_keys(ds, num_workers=2, epoch=epoch)
        assert Counter(seen) == Counter(expected), "every sample exactly once per epoch"


def test_epoch_order_depends_on_epoch_and_seed_only(tmp_path):
    urls = write_clean_shards(tmp_path, n_shards=4, per_shard=6)

    def make(seed: int) -> ShardDataset:
        return ShardDataset(urls, batch_size=4, image_size=16, seed=seed, shuffle_buffer=8)

    a0, a0_again, a1 = read_keys(make(1), 0, 0), read_keys(make(1), 0, 0), read_keys(make(1), 0, 1)
    assert a0 == a0_again
    assert a0 != a1 and sorted(a0) == sorted(a1)
    assert read_keys(make(2), 0, 0) != a0


def test_resampled_mode_differs_per_worker_and_is_reproducible(tmp_path):
    urls = write_clean_shards(tmp_path, n_shards=6, per_shard=4)

    def stream(seed: int, rank: int, worker: int, n: int = 40) -> list[str]:
        ds = ShardDataset(urls, batch_size=1, image_size=16, mode="resampled", seed=seed, rank=rank,
                          world_size=2, shuffle_buffer=8)
        ds._worker = lambda: (worker, 2)  # what get_worker_info() reports inside worker `worker`
        it = iter(ds)
        return [next(it)["key"][0] for _ in range(n)]

    first = stream(0, 0, 0)
    assert first == stream(0, 0, 0), "reproducible by seed"
    assert first != stream(0, 0, 1), "workers draw different streams"
    assert first != stream(0, 1, 0), "ranks draw different streams"
    assert first != stream(1, 0, 0), "the seed changes the stream"
    assert len(set(first)) > 10, "resampling keeps drawing from many shards"


def test_resampled_mode_through_real_workers(tmp_path):
    urls = write_clean_shards(tmp_path, n_shards=4, per_shard=4)
    ds = ShardDataset(urls, batch_size=2, image_size=16, mode="resampled", seed=3, shuffle_buffer=4)
    loader = EpochDataLoader(ds, lambda: 0, batch_size=None, num_workers=2)
    it = iter(loader)
    batches = [next(it)["key"] for _ in range(8)]  # workers alternate: even batches worker 0, odd worker 1
    assert batches[0::2] != batches[1::2]


def test_batch_contents_shapes_and_range(tmp_path):
    urls = write_clean_shards(tmp_path, n_shards=1, per_shard=5, size=(40, 24))
    batches = list(ShardDataset(urls, batch_size=2, image_size=16, shuffle_buffer=0))
    assert [len(b["key"]) for b in batches] == [2, 2, 1]
    img = batches[0]["image"]
    assert img.shape == (2, 3, 16, 16) and img.dtype == torch.float32
    assert img.min() >= -1 and img.max() <= 1
    assert batches[0]["caption"] == batches[0]["key"]
    assert batches[0]["original_size"].tolist() == [[40, 24], [40, 24]]
    total = Counter()
    for b in batches:
        total.update({"samples": b["data_stats"]["samples"]})
    assert total["samples"] == 5


def test_random_crop_differs_from_centre_and_is_seeded(tmp_path):
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (16, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noise.save(buf, format="PNG")
    path = write_tar(tmp_path / "00000.tar", [("k.png", buf.getvalue()), ("k.txt", b"noise")])

    def get(crop: str, seed: int):
        return next(iter(ShardDataset([str(path)], batch_size=1, image_size=16, crop=crop, seed=seed,
                                      shuffle_buffer=0)))["image"]

    centre = get("center", 0)
    expected = torch.from_numpy(np.array(noise)[:, 24:40]).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(centre[0], expected), "centre crop of a same-size side is an exact copy"
    assert torch.equal(get("random", 5), get("random", 5))
    assert any(not torch.equal(get("random", s), centre) for s in range(5))


def test_tokenizer_runs_in_the_pipeline(tmp_path):
    urls = write_clean_shards(tmp_path, n_shards=1, per_shard=3)

    def tok(captions: list[str]) -> torch.Tensor:
        return torch.tensor([[len(c), 1] for c in captions])

    batch = next(iter(ShardDataset(urls, batch_size=3, image_size=16, tokenizer=tok, shuffle_buffer=0)))
    assert batch["tokens"].tolist() == [[9, 1]] * 3


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/unclip_pwned_by_shard",))


def hostile_shards(tmp_path) -> tuple[list[str], set[str]]:
    """Two shards full of bad samples around valid ones; returns (urls, keys that must survive)."""
    good = image_bytes((10, 200, 10), (32, 32))
    big = Image.new("L", (10_000, 10_000), 255)
    buf = io.BytesIO()
    big.save(buf, format="PNG")  # a 100-megapixel image that compresses to a few KB
    members = []
    members += sample_members("ok0", image=good)
    members += sample_members("garbage", image=b"this is not an image at all")
    members += sample_members("zerobyte", image=b"")
    members += sample_members("truncated", image=good[: len(good) // 2])
    members += sample_members("nocaption", caption=None, image=good)
    members += sample_members("noimage", caption="a caption without its image")
    members += sample_members("tiny", image=image_bytes((1, 2, 3), (1, 1), fmt="PNG"))
    members += [("huge.png", buf.getvalue()), ("huge.txt", b"a huge white square")]
    members += sample_members("latin1", caption="caf\xe9 cr\xe8me".encode("latin-1"), image=good)
    members += sample_members("extras", image=good)
    members += [("extras.pyd", pickle.dumps(_Exploit())), ("extras.exe", b"MZ\x90\x00")]
    members += sample_members("badnpy", image=good)
    members += [("badnpy.emb.npy", npy_bytes(np.array([_Exploit()], dtype=object)))]
    members += sample_members("goodnpy", image=good)
    members += [("goodnpy.emb.npy", npy_bytes(np.arange(4, dtype=np.float32)))]
    members += sample_members("badjson", image=good)
    members[-1] = ("badjson.json", b"{not json")
    members += sample_members("ok1", image=good)
    first = write_tar(tmp_path / "00000.tar", members)
    # a tar cut in the middle of a member: samples before the cut survive, the error is counted
    whole = write_tar(tmp_path / "whole.tar", sample_members("t0", image=good) + sample_members("t1", image=good)
                      + sample_members("t2", image=good * 20))
    with tarfile.open(whole) as tar:
        cut = next(m.offset_data + m.size // 2 for m in tar.getmembers() if m.name == "t2.jpg")
    truncated = tmp_path / "00001.tar"
    truncated.write_bytes(whole.read_bytes()[:cut])
    keep = {"ok0", "tiny", "latin1", "extras", "badnpy", "goodnpy", "badjson", "ok1", "t0", "t1"}
    return [str(first), str(truncated)], keep


def test_hostile_input_is_counted_never_crashes_and_loses_nothing_valid(tmp_path):
    if os.path.exists("/tmp/unclip_pwned_by_shard"):
        os.remove("/tmp/unclip_pwned_by_shard")
    urls, keep = hostile_shards(tmp_path)
    ds = ShardDataset(urls, batch_size=4, image_size=16, shuffle_buffer=0)
    skipped, repaired, keys, samples = Counter(), Counter(), [], {}
    for batch in EpochDataLoader(ds, lambda: 0, batch_size=None, num_workers=0):
        skipped.update(batch["data_stats"]["skipped"])
        repaired.update(batch["data_stats"]["repaired"])
        keys += batch["key"]
        samples.update({k: i for i, k in enumerate(batch["key"])})
        if "emb" in batch:
            pytest.fail("an npy member present in only some samples of a batch must not be stacked")
    assert set(keys) == keep
    assert skipped["decode_error"] == 3  # garbage, zero-byte, truncated image
    assert skipped["missing_caption"] == 1 and skipped["missing_image"] == 1
    assert skipped["too_small"] == 0 and skipped["too_large"] == 1  # 1x1 is allowed at min_side=1
    assert sum(v for k, v in skipped.items() if k.startswith("read_error")) == 1
    assert repaired["caption_recoded"] == 1
    assert repaired["ignored_member:pyd"] == 1 and repaired["ignored_member:exe"] == 1
    assert repaired["bad_npy"] == 1 and repaired["bad_json"] == 1
    assert not os.path.exists("/tmp/unclip_pwned_by_shard"), "a shard member was unpickled"


def test_min_side_skips_tiny_images_and_recoded_caption_is_kept(tmp_path):
    urls, _ = hostile_shards(tmp_path)
    from unclip.data.decode import SampleDecoder
    ds = ShardDataset(urls[:1], batch_size=64, image_size=16, shuffle_buffer=0,
                      decoder=SampleDecoder(min_side=2))
    batch = next(iter(ds))
    assert batch["data_stats"]["skipped"]["too_small"] == 1
    assert batch["caption"][batch["key"].index("latin1")] == "café crème"


def test_npy_members_are_stacked_when_every_sample_has_them(tmp_path):
    members = []
    for i in range(3):
        members += sample_members(f"k{i}", image=image_bytes())
        members.append((f"k{i}.img_emb.npy", npy_bytes(np.full(4, i, dtype=np.float16))))
    path = write_tar(tmp_path / "00000.tar", members)
    batch = next(iter(ShardDataset([str(path)], batch_size=3, image_size=8, shuffle_buffer=0)))
    assert batch["img_emb"].shape == (3, 4) and batch["img_emb"].dtype == torch.float16
    assert batch["img_emb"][:, 0].tolist() == [0, 1, 2]


def test_datamodule_validates_and_splits_by_trainer_rank(tmp_path):
    urls = write_clean_shards(tmp_path, n_shards=4, per_shard=2)
    kwargs = dict(val_shards=None, batch_size=2, num_workers=0, mode="epoch", image_size=16, crop="center",
                  shuffle_buffer=0, seed=0, tokenizer=None, max_pixels=None, min_side=1, pin_memory=False,
                  persistent_workers=False, prefetch_factor=None, embeddings=None, decode_images=True,
                  batches_per_epoch=2)
    with pytest.raises(ValueError, match="data.train_shards"):
        ShardDataModule(train_shards=str(tmp_path / "missing_{0..3}.tar"), **kwargs)
    dm = ShardDataModule(train_shards=urls, **kwargs)

    class FakeTrainer:
        global_rank, world_size, current_epoch = 1, 2, 3

    dm.trainer = FakeTrainer()
    loader = dm.train_dataloader()
    keys = [k for b in loader for k in b["key"]]
    assert loader.dataset.epoch == 3
    # 8 samples, 2 ranks x 2 batches x 2 = 8 slots: rank 1 takes the second half of the shard sequence
    assert sorted(keys) == ["000020000", "000020001", "000030000", "000030001"]


def test_fixed_batches_per_epoch_keeps_uneven_ranks_in_lockstep(tmp_path):
    # 5 shards of unequal size over 2 ranks x 2 workers: one pass would give the ranks different counts
    urls = []
    for s, n in enumerate([9, 2, 7, 3, 5]):
        urls += write_clean_shards(tmp_path / f"s{s}", n_shards=1, per_shard=n)
    counts, sizes = [], set()
    for rank in range(2):
        ds = ShardDataset(urls, batch_size=2, image_size=8, rank=rank, world_size=2, shuffle_buffer=4,
                          batches_per_epoch=7)
        loader = EpochDataLoader(ds, lambda: 0, batch_size=None, num_workers=2)
        batches = list(loader)
        counts.append(len(batches))
        sizes |= {len(b["key"]) for b in batches}
    assert counts == [7, 7] and sizes == {2}


def test_multi_rank_training_without_batches_per_epoch_is_refused(tmp_path):
    urls = write_clean_shards(tmp_path, n_shards=4, per_shard=2)
    kwargs = dict(val_shards=None, batch_size=2, num_workers=0, mode="epoch", image_size=16, crop="center",
                  shuffle_buffer=0, seed=0, tokenizer=None, max_pixels=None, min_side=1, pin_memory=False,
                  persistent_workers=False, prefetch_factor=None, embeddings=None, decode_images=True)
    dm = ShardDataModule(train_shards=urls, batches_per_epoch=None, **kwargs)

    class TwoRanks:
        global_rank, world_size, current_epoch = 0, 2, 0

    dm.trainer = TwoRanks()
    with pytest.raises(ValueError, match="data.batches_per_epoch must be set for data.mode=epoch on 2 ranks"):
        dm.train_dataloader()
    dm = ShardDataModule(train_shards=urls, batches_per_epoch=3, **kwargs)
    dm.trainer = TwoRanks()
    assert len(list(dm.train_dataloader())) == 3
    assert len(list(dm.val_dataloader())) == 0  # no val shards: an empty list of loaders


def test_uint8_batches_normalise_to_exactly_the_float_batches(tmp_path):
    urls = write_clean_shards(tmp_path, n_shards=1, per_shard=4)
    common = dict(batch_size=4, image_size=16, shuffle_buffer=0)
    (as_float,) = list(ShardDataset(urls, **common))
    (as_uint8,) = list(ShardDataset(urls, image_dtype="uint8", **common))
    assert as_uint8["image"].dtype == torch.uint8 and as_float["image"].dtype == torch.float32
    assert torch.equal(normalize_images(as_uint8["image"]), as_float["image"])
    assert normalize_images(as_float["image"]) is as_float["image"], "float batches pass through"
    # the training datamodule sends uint8 and converts after the transfer to the device
    dm = ShardDataModule(train_shards=urls, val_shards=None, batch_size=4, num_workers=0, mode="epoch", image_size=16,
                         crop="center", shuffle_buffer=0, seed=0, tokenizer=None, max_pixels=None, min_side=1,
                         pin_memory=False, persistent_workers=False, prefetch_factor=None, embeddings=None,
                         decode_images=True, batches_per_epoch=None)
    (raw,) = list(dm.train_dataloader())
    assert raw["image"].dtype == torch.uint8
    assert torch.equal(dm.on_after_batch_transfer(raw, 0)["image"], as_float["image"])
    with pytest.raises(ValueError, match="data.image_dtype must be one of"):
        ShardDataset(urls, image_dtype="float16", **common)


def _negatives_shard(tmp_path) -> list[str]:
    members = []
    for i, negatives in enumerate([["a blue square", "a red circle", "a green star"], ["one only"], None,
                                   [7, "", "kept"]]):
        meta = {"key": i} if negatives is None else {"key": i, "hard_negatives": negatives}
        members += sample_members(f"{i:04d}", caption=f"caption {i}", image=image_bytes(), meta=meta)
    return [str(write_tar(tmp_path / "00000.tar", members))]


def test_hard_negative_captions_are_drawn_tokenized_and_masked(tmp_path):
    urls = _negatives_shard(tmp_path)
    tok = lambda captions: torch.tensor([[len(c), 1] for c in captions])  # noqa: E731
    batch = next(iter(ShardDataset(urls, batch_size=4, image_size=16, tokenizer=tok, shuffle_buffer=0,
                                   hard_negatives=2)))
    assert batch["negative_tokens"].shape == (4, 2, 2)
    # Two of three drawn for sample 0; the one listed; none; malformed entries dropped (7 and "").
    assert batch["negative_mask"].tolist() == [[True, True], [True, False], [False, False], [True, False]]
    lengths = batch["negative_tokens"][..., 0].tolist()
    assert set(lengths[0]) <= {len("a blue square"), len("a red circle"), len("a green star")}
    assert lengths[1][0] == len("one only") and lengths[3][0] == len("kept")
    assert lengths[2] == [0, 0], "empty slots are tokenized empty captions"
    draws = {tuple(next(iter(ShardDataset(urls, batch_size=1, image_size=16, tokenizer=tok, shuffle_buffer=0,
                                         hard_negatives=1, seed=s)))["negative_tokens"][0, 0].tolist())
             for s in range(12)}
    assert len(draws) > 1, "the draw depends on the seed"
    plain = next(iter(ShardDataset(urls, batch_size=4, image_size=16, tokenizer=tok, shuffle_buffer=0)))
    assert "negative_tokens" not in plain


def test_a_negative_that_is_another_samples_caption_is_dropped():
    tok = lambda captions: torch.tensor([[len(c)] for c in captions])  # noqa: E731
    samples = [{"key": "a", "caption": "a red circle", "json": {}, "npy": {}, "negatives": ["a red square"]},
               {"key": "b", "caption": "a red square", "json": {}, "npy": {},
                "negatives": ["a red star", "a red circle"]}]
    batch = collate(samples, tok, hard_negatives=2)
    assert batch["negative_mask"].tolist() == [[False, False], [True, False]]
    assert batch["negative_tokens"][1, 0, 0] == len("a red star")


def test_hard_negatives_need_a_tokenizer(tmp_path):
    urls = _negatives_shard(tmp_path)
    with pytest.raises(ValueError, match="data.tokenizer"):
        ShardDataset(urls, batch_size=2, image_size=16, hard_negatives=1)
    with pytest.raises(ValueError, match="data.hard_negatives must be >= 0"):
        ShardDataset(urls, batch_size=2, image_size=16, hard_negatives=-1, tokenizer=lambda c: None)


# Caption bytes the writer (unclip-shards) and the reader (SampleDecoder) once decoded differently: a UTF-8 BOM
# (kept by the reader), Windows-1252 quotes and euro sign (read as C1 controls), bytes cp1252 leaves undefined.
CAPTION_BYTES = [b"\xef\xbb\xbfa red circle", b"\x93quoted\x94 for 5\x80", b"caf\xe9 \x81\x8d", b"plain utf-8 \xc3\xa9",
                 b"  padded\n"]


@pytest.mark.parametrize("raw", CAPTION_BYTES)
def test_writer_and_reader_decode_the_same_caption_bytes_alike(raw):
    from unclip.data.decode import SampleDecoder, SkipCounter
    from unclip.data.writer import decode_caption

    counter = SkipCounter()
    read = SampleDecoder(require=("caption",), decode_images=False)({"__key__": "k", "txt": raw}, counter)
    written, recoded = decode_caption(raw)
    assert read is not None and read["caption"] == written
    assert counter.repaired["caption_recoded"] == int(recoded)
    assert not written.startswith("\ufeff") and written == written.strip()
