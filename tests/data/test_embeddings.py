"""Precomputed embeddings: storage, key alignment in the pipeline, missing keys counted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.data.shard_helpers import write_clean_shards
from unclip.data.embeddings import embedding_path, load_shard_embeddings, read_meta, write_meta, write_shard_embeddings
from unclip.data.pipeline import ShardDataset


def code(key: str) -> int:
    """A small number (exact in float16) naming a write_clean_shards key: shard * 100 + row."""
    return int(key[:5]) * 100 + int(key[5:])


def fake_embeddings(keys: list[str], d: int = 4, ctx: int = 3, w: int = 2) -> dict[str, np.ndarray]:
    """Rows whose values encode their key, so misalignment is visible."""
    ids = np.array([code(k) for k in keys], dtype=np.float32)
    return {"image_embed": np.repeat(ids[:, None], d, 1).astype(np.float16),
            "text_embed": np.repeat(-ids[:, None], d, 1).astype(np.float16),
            "text_tokens": np.zeros((len(keys), ctx, w), np.float16),
            "text_mask": np.ones((len(keys), ctx), bool)}


def test_round_trip_and_atomic_write(tmp_path):
    keys = ["000000001", "000000102"]
    write_shard_embeddings(tmp_path / "00000.npz", keys, fake_embeddings(keys))
    loaded = load_shard_embeddings(tmp_path / "00000.npz")
    assert list(loaded["keys"]) == keys and loaded["image_embed"].dtype == np.float16
    assert [p.name for p in tmp_path.iterdir()] == ["00000.npz"], "no temp file left behind"
    with pytest.raises(ValueError, match="2 keys but rows"):
        write_shard_embeddings(tmp_path / "x.npz", keys, fake_embeddings(keys[:1]))
    write_meta(tmp_path, {"clip_hash": "abc", "embed_dim": 4})
    assert read_meta(tmp_path)["clip_hash"] == "abc"
    assert embedding_path(tmp_path, "/data/train/00007.tar") == tmp_path / "train__00007.npz"
    assert embedding_path(tmp_path, "/data/val/00007.tar") != embedding_path(tmp_path, "/data/train/00007.tar")


def test_pipeline_attaches_embeddings_by_key_and_counts_missing_ones(tmp_path):
    urls = write_clean_shards(tmp_path / "shards", n_shards=2, per_shard=4)
    emb = tmp_path / "emb"
    for s, url in enumerate(urls):
        keys = [f"{s:05d}{i:04d}" for i in range(4) if not (s == 1 and i == 2)]  # one key missing
        write_shard_embeddings(embedding_path(emb, url), keys, fake_embeddings(keys))
    ds = ShardDataset(urls, batch_size=3, image_size=8, shuffle_buffer=5, seed=1, embeddings=str(emb))
    seen, skipped = 0, 0
    for batch in ds:
        ids = torch.tensor([code(k) for k in batch["key"]], dtype=torch.float32)
        assert torch.equal(batch["image_embed"][:, 0].float(), ids), "embedding rows follow their keys"
        assert torch.equal(batch["text_embed"][:, 0].float(), -ids)
        assert batch["text_mask"].dtype == torch.bool
        seen += len(batch["key"])
        skipped += batch["data_stats"]["skipped"].get("missing_embedding", 0)
    assert seen == 7 and skipped == 1


def test_caption_only_reading_decodes_no_image(tmp_path):
    from unclip.data.decode import SampleDecoder

    urls = write_clean_shards(tmp_path, n_shards=1, per_shard=3)
    ds = ShardDataset(urls, batch_size=3, image_size=8, shuffle_buffer=0,
                      decoder=SampleDecoder(require=("caption",), decode_images=False))
    batch = next(iter(ds))
    assert "image" not in batch and batch["caption"] == batch["key"]


def test_a_shard_without_embeddings_or_with_another_shards_file_is_an_error(tmp_path):
    import json

    urls = write_clean_shards(tmp_path / "shards", n_shards=1, per_shard=2)
    ds = ShardDataset(urls, batch_size=2, image_size=8, shuffle_buffer=0, embeddings=str(tmp_path / "emb"))
    with pytest.raises(FileNotFoundError, match="run unclip-embed"):
        next(iter(ds))
    keys = ["000000000", "000000001"]
    path = embedding_path(tmp_path / "emb", urls[0])
    write_shard_embeddings(path, keys, fake_embeddings(keys))
    path.with_suffix(".json").write_text(json.dumps({"shard": "/elsewhere/val/00000.tar"}))
    with pytest.raises(ValueError, match="was made from shard /elsewhere/val/00000.tar"):
        next(iter(ds))


def test_embeddings_attach_before_the_shuffle_one_load_per_shard(tmp_path, monkeypatch):
    import unclip.data.embeddings as embeddings

    urls = write_clean_shards(tmp_path / "shards", n_shards=3, per_shard=6)
    emb = tmp_path / "emb"
    for s, url in enumerate(urls):
        keys = [f"{s:05d}{i:04d}" for i in range(6)]
        write_shard_embeddings(embedding_path(emb, url), keys, fake_embeddings(keys))
    loads = []
    real = embeddings.load_shard_embeddings
    monkeypatch.setattr(embeddings, "load_shard_embeddings", lambda path: loads.append(path) or real(path))
    ds = ShardDataset(urls, batch_size=4, image_size=8, shuffle_buffer=18, seed=2, embeddings=str(emb))
    keys = []
    for batch in ds:
        ids = torch.tensor([code(k) for k in batch["key"]], dtype=torch.float32)
        assert torch.equal(batch["image_embed"][:, 0].float(), ids)
        keys += batch["key"]
    assert len(keys) == 18 and len({k[:5] for k in keys[:6]}) > 1, "the shuffle mixes the shards"
    assert len(loads) == 3, f"{len(loads)} file loads for 3 shards"


def test_resharded_shards_are_refused_against_stale_embeddings(tmp_path):
    import json

    from unclip.data.embeddings import check_embeddings, shard_fingerprint
    from unclip.data.partition import count_samples

    urls = write_clean_shards(tmp_path / "shards", n_shards=2, per_shard=3)
    emb = tmp_path / "emb"
    for s, url in enumerate(urls):
        keys = [f"{s:05d}{i:04d}" for i in range(3)]
        write_shard_embeddings(embedding_path(emb, url), keys, fake_embeddings(keys))
        embedding_path(emb, url).with_suffix(".json").write_text(json.dumps(
            {"shard": url, "fingerprint": shard_fingerprint(url, count_samples(url))}))
    check_embeddings(emb, urls, count_samples)  # as embedded: accepted
    write_clean_shards(tmp_path / "shards", n_shards=2, per_shard=40)  # re-sharded under the same names
    with pytest.raises(ValueError, match="bytes was .* when embedded"):
        check_embeddings(emb, urls)
    with pytest.raises(ValueError, match="re-sharded"):
        next(iter(ShardDataset(urls, batch_size=2, image_size=8, shuffle_buffer=0, embeddings=str(emb))))
    with pytest.raises(ValueError, match="no .*npz"):
        check_embeddings(emb, urls + write_clean_shards(tmp_path / "more", n_shards=1, per_shard=1))


def test_ids_only_records_are_smaller_and_read_back_as_int64_ids(tmp_path):
    keys = [f"00000{i:04d}" for i in range(8)]
    full = fake_embeddings(keys, d=16, ctx=8, w=64)
    ids = {"image_embed": full["image_embed"], "text_embed": full["text_embed"],
           "text_ids": np.arange(64, dtype=np.uint16).reshape(8, 8) + 49000}
    write_shard_embeddings(tmp_path / "full.npz", keys, full)
    write_shard_embeddings(tmp_path / "ids.npz", keys, ids)
    full_bytes, ids_bytes = ((tmp_path / n).stat().st_size for n in ("full.npz", "ids.npz"))
    assert full_bytes - ids_bytes >= 8 * (8 * 64 * 2 + 8 - 8 * 2)  # encodings + mask out, ids in
    with pytest.raises(ValueError, match=r"lack \['text_embed'\]"):
        write_shard_embeddings(tmp_path / "x.npz", keys, {"image_embed": full["image_embed"],
                                                          "text_ids": ids["text_ids"]})
    urls = write_clean_shards(tmp_path / "shards", n_shards=1, per_shard=8)
    emb = tmp_path / "emb"
    write_shard_embeddings(embedding_path(emb, urls[0]), keys, ids)
    batch = next(iter(ShardDataset(urls, batch_size=8, image_size=8, shuffle_buffer=0, embeddings=str(emb))))
    assert "text_tokens" not in batch and batch["text_ids"].dtype == torch.int64
    assert batch["text_ids"][0].tolist() == list(range(49000, 49008))
