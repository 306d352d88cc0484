"""Multi-rank reading: exactly-once with a fixed quota per rank, placement checks, resampled failures.

Ranks are ShardDatasets with their own rank / world_size read through real DataLoader worker processes
(the split is ours: ranks x workers); every result is compared with the single-process set of keys.
"""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from tests.data.shard_helpers import sample_members, write_clean_shards, write_tar
from unclip.data.datamodule import EpochDataLoader, ShardDataModule
from unclip.data.decode import SampleDecoder
from unclip.data.pipeline import ShardDataset

SIZES = [13, 7, 22, 5, 9, 18, 11, 4, 16, 15]  # 120 samples in shards of uneven size


def uneven_shards(root) -> list[str]:
    def members(s: int, n: int) -> list:
        return [m for i in range(n) for m in sample_members(f"s{s:02d}i{i:03d}", caption=f"{s} {i}")]

    return [str(write_tar(root / f"{s:05d}.tar", members(s, n))) for s, n in enumerate(SIZES)]


def captions_only(urls, **kwargs) -> ShardDataset:
    return ShardDataset(urls, image_size=8, decoder=SampleDecoder(require=("caption",), decode_images=False),
                        **kwargs)


def read_ranks(urls, world: int, num_workers: int, epoch: int = 0, **kwargs) -> tuple[list[list[str]], int]:
    """Keys each rank reads in one epoch (through real worker processes) and the padded count."""
    per_rank, padded = [], 0
    for rank in range(world):
        ds = captions_only(urls, rank=rank, world_size=world, **kwargs)
        keys = []
        for batch in EpochDataLoader(ds, lambda: epoch, batch_size=None, num_workers=num_workers):
            keys += batch["key"]
            padded += batch["data_stats"].get("padded", 0)
        per_rank.append(keys)
    return per_rank, padded


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    urls = uneven_shards(tmp_path_factory.mktemp("uneven"))
    reference = [k for b in captions_only(urls, batch_size=7, shuffle_buffer=0) for k in b["key"]]
    assert len(reference) == sum(SIZES) == len(set(reference))
    return urls, set(reference)


@pytest.mark.parametrize("batches_per_epoch,unique", [(12, 120), (10, 100), (14, 120)])
def test_batches_per_epoch_reads_each_sample_once_on_uneven_shards(shards, batches_per_epoch, unique):
    # 2 ranks x 2 workers x batch 5: 12 batches per rank are exactly the 120 samples; 10 leave 20 for the next
    # epoch (none read twice); 14 read all 120 once and 20 again, counted as padded.
    urls, reference = shards
    per_rank, padded = read_ranks(urls, world=2, num_workers=2, batch_size=5, shuffle_buffer=8,
                                  batches_per_epoch=batches_per_epoch)
    assert [len(k) for k in per_rank] == [batches_per_epoch * 5] * 2, "ranks step in lockstep"
    keys = per_rank[0] + per_rank[1]
    assert set(keys) <= reference and len(set(keys)) == unique
    assert len(keys) - len(set(keys)) == padded == max(0, 2 * batches_per_epoch * 5 - 120)


def test_a_short_quota_in_fixed_shard_order_reaches_every_sample_over_epochs(shards):
    urls, reference = shards
    seen = set()
    for epoch in range(2):  # 100 slots of 120 samples per epoch, shard order fixed (shuffle_buffer=0)
        per_rank, padded = read_ranks(urls, world=2, num_workers=1, epoch=epoch, batch_size=5, shuffle_buffer=0,
                                      batches_per_epoch=10)
        keys = per_rank[0] + per_rank[1]
        assert len(keys) == len(set(keys)) == 100 and padded == 0
        seen |= set(keys)
    assert seen == reference


def test_fewer_shards_than_readers_still_fills_every_rank(tmp_path):
    urls = write_clean_shards(tmp_path, n_shards=1, per_shard=20, size=(8, 8))
    per_rank, padded = read_ranks(urls, world=2, num_workers=2, batch_size=4, shuffle_buffer=0, batches_per_epoch=2)
    assert [len(k) for k in per_rank] == [8, 8] and padded == 0
    assert len(set(per_rank[0] + per_rank[1])) == 16


def datamodule_kwargs(**overrides) -> dict:
    kwargs = dict(val_shards=None, batch_size=2, num_workers=0, mode="epoch", image_size=8, crop="center",
                  shuffle_buffer=0, seed=0, tokenizer=None, max_pixels=None, min_side=1, pin_memory=False,
                  persistent_workers=False, prefetch_factor=None, embeddings=None, decode_images=False,
                  batches_per_epoch=None)
    kwargs.update(overrides)
    return kwargs


def test_resampled_mode_trains_on_several_ranks_without_batches_per_epoch(tmp_path):
    urls = write_clean_shards(tmp_path, n_shards=4, per_shard=3, size=(8, 8))
    streams = []
    for rank in range(2):
        dm = ShardDataModule(train_shards=urls, **datamodule_kwargs(mode="resampled"))

        class Trainer:
            global_rank, world_size, current_epoch = rank, 2, 0

        dm.trainer = Trainer()
        it = iter(dm.train_dataloader())
        streams.append([k for _ in range(5) for k in next(it)["key"]])
    assert all(len(s) == 10 for s in streams) and streams[0] != streams[1]


def test_resampled_mode_over_unreadable_shards_fails_with_a_message(tmp_path):
    urls = []
    for i in range(3):
        path = tmp_path / f"{i:05d}.tar"
        path.write_bytes(b"this is not a tar file" * 40)
        urls.append(str(path))
    ds = captions_only(urls, batch_size=2, mode="resampled", shuffle_buffer=0)
    outcome = []

    def read() -> None:
        try:
            next(iter(ds))
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion below
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)  # a thread: a hung stream must not hang the suite
    reader.start()
    reader.join(20)
    assert not reader.is_alive(), "the resampled stream retried unreadable shards for 20 s without an error"
    assert isinstance(outcome[0], RuntimeError) and "read errors in a row without one sample" in str(outcome[0])


def test_resampled_mode_tolerates_some_unreadable_shards(tmp_path):
    urls = write_clean_shards(tmp_path, n_shards=2, per_shard=3, size=(8, 8))
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"garbage" * 100)
    ds = captions_only(urls + [str(bad)], batch_size=2, mode="resampled", shuffle_buffer=0, seed=1)
    it = iter(ds)
    skipped = Counter()
    for _ in range(30):
        skipped.update(next(it)["data_stats"]["skipped"])
    assert sum(v for k, v in skipped.items() if k.startswith("read_error")) >= 1


def test_more_workers_than_batches_per_rank_make_exactly_the_quota(shards):
    urls, reference = shards
    per_rank, padded = read_ranks(urls, world=2, num_workers=3, batch_size=5, shuffle_buffer=0, batches_per_epoch=2)
    assert [len(k) for k in per_rank] == [10, 10] and padded == 0
    assert len(set(per_rank[0] + per_rank[1])) == 20
