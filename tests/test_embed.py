"""unclip-embed: stored embeddings equal the on-the-fly ones, recomputed caption encodings equal stored ones,
resume, rank split, refused mismatches."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import EMOJI, ROOT, make_tiny_clip_export
from tests.data.shard_helpers import write_clean_shards
from tests.emoji_like import count_samples
from unclip.config import ConfigError
from unclip.data.embeddings import embedding_path, load_shard_embeddings, read_meta
from unclip.data.pipeline import ShardDataset
from unclip.embed import assign_shards, resolve_rank, run_embed
from unclip.models.clip_embedder import FrozenCLIP
from unclip.training.conditioning import ClipConditioner
from unclip.training.preflight import check_token_encodings

VAL_SHARD = EMOJI / "val" / "00000.tar"
VAL_SIZE = count_samples(VAL_SHARD)


def embed(clip, shards, out, **kw) -> dict:
    args = dict(batch_size=128, num_workers=0, rank=None, world_size=None, device="cpu", progress=False)
    return run_embed(str(clip), shards, str(out), **{**args, **kw})


def test_stored_embeddings_equal_the_on_the_fly_ones_by_key(tiny_clip_export, tmp_path):
    out = tmp_path / "emb"
    summary = embed(tiny_clip_export, str(VAL_SHARD), out, num_workers=1, store_token_encodings=True)
    assert summary["shards_written"] == 1 and summary["samples"] == VAL_SIZE and summary["images_per_s"] > 0
    clip = FrozenCLIP.from_path(tiny_clip_export)
    meta = read_meta(out)
    assert meta["clip_hash"] == clip.clip_hash and meta["embed_dim"] == clip.embed_dim == 128
    stored = load_shard_embeddings(embedding_path(out, str(VAL_SHARD)))
    assert stored["text_tokens"].dtype == np.float16 and stored["text_tokens"].shape == (VAL_SIZE, 32, 128)
    assert len(set(stored["keys"].tolist())) == VAL_SIZE
    # Read the shard SHUFFLED through the training pipeline: stored rows must follow their keys.
    ds = ShardDataset([str(VAL_SHARD)], batch_size=50, image_size=64, shuffle_buffer=100, seed=3,
                      tokenizer=clip.tokenizer, embeddings=str(out))
    batch = next(iter(ds))
    live = ClipConditioner(str(tiny_clip_export), None, need_text_tokens=True)(
        {"image": batch["image"], "tokens": batch["tokens"]})
    precomputed = ClipConditioner(str(tiny_clip_export), str(out), need_text_tokens=True)(batch)
    for name in ("image_embed", "text_embed", "text_tokens"):
        torch.testing.assert_close(precomputed[name], live[name], atol=4e-3, rtol=2e-3)  # float16 storage
    assert torch.equal(precomputed["text_mask"], live["text_mask"])
    rows = [int(np.nonzero(stored["keys"] == k)[0][0]) for k in batch["key"]]
    assert batch["key"] != sorted(batch["key"]), "the batch was shuffled"
    torch.testing.assert_close(torch.from_numpy(stored["image_embed"][rows]).float(), live["image_embed"],
                               atol=4e-3, rtol=2e-3)


def test_resume_skips_finished_shards_and_redoes_unfinished_ones(tiny_clip_export, tmp_path):
    urls = write_clean_shards(tmp_path / "shards", n_shards=3, per_shard=5)
    out = tmp_path / "emb"
    first = embed(tiny_clip_export, urls, out)
    assert (first["shards_written"], first["shards_skipped"], first["samples"]) == (3, 0, 15)
    before = {u: embedding_path(out, u).stat().st_mtime_ns for u in urls}
    embedding_path(out, urls[1]).with_suffix(".json").unlink()  # as if killed before the sidecar was written
    again = embed(tiny_clip_export, urls, out)
    assert (again["shards_written"], again["shards_skipped"]) == (1, 2)
    assert all(embedding_path(out, u).stat().st_mtime_ns == before[u] for u in (urls[0], urls[2]))
    assert not list(out.glob(".*")), "no temp files left behind"
    assert json.loads(embedding_path(out, urls[1]).with_suffix(".json").read_text())["samples"] == 5


def test_two_ranks_cover_every_shard_exactly_once(tiny_clip_export, tmp_path, monkeypatch):
    urls = write_clean_shards(tmp_path / "shards", n_shards=5, per_shard=2)
    out = tmp_path / "emb"
    assert sorted(assign_shards(urls, 0, 2) + assign_shards(urls, 1, 2)) == sorted(urls)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_rank(None, None) == (1, 2) and resolve_rank(0, 2) == (0, 2)
    one = embed(tiny_clip_export, urls, out)  # rank 1 of 2 from the environment
    zero = embed(tiny_clip_export, urls, out, rank=0, world_size=2)
    assert (zero["shards_written"], one["shards_written"]) == (3, 2)
    keys = [k for u in urls for k in load_shard_embeddings(embedding_path(out, u))["keys"].tolist()]
    assert sorted(keys) == sorted(f"{s:05d}{i:04d}" for s in range(5) for i in range(2))
    with pytest.raises(ConfigError, match="rank 2 outside world_size 2"):
        resolve_rank(2, 2)


def test_another_clip_and_colliding_shard_names_are_refused(tiny_clip_export, tmp_path):
    urls = write_clean_shards(tmp_path / "a" / "train", n_shards=1, per_shard=2)
    out = tmp_path / "emb"
    embed(tiny_clip_export, urls, out)
    other = make_tiny_clip_export(tmp_path / "other_clip", seed=1)
    ours, theirs = read_meta(out)["clip_hash"], FrozenCLIP.from_path(other).clip_hash
    with pytest.raises(ConfigError, match=f"CLIP of clip_hash={ours}, but clip_ckpt has clip_hash={theirs}"):
        embed(other, urls, out)
    # b/train/00000.tar and a/train/00000.tar share a folder name and stem, hence a file name
    same_name = write_clean_shards(tmp_path / "b" / "train", n_shards=1, per_shard=2)
    with pytest.raises(ConfigError, match="holds the embeddings of .*a/train/00000.tar, not of .*b/train/00000.tar"):
        embed(tiny_clip_export, same_name, out)
    with pytest.raises(ConfigError, match="would both write"):
        embed(tiny_clip_export, urls + same_name, tmp_path / "emb2")


def test_command_line(tiny_clip_export, tmp_path):
    urls = write_clean_shards(tmp_path / "shards", n_shards=2, per_shard=3)
    cmd = [sys.executable, "-m", "unclip.embed", f"clip_ckpt={tiny_clip_export}",
           f"shards=[{urls[0]},{urls[1]}]", f"out_dir={tmp_path / 'emb'}", "num_workers=0", "progress=false"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["shards_written"] == 2 and summary["samples"] == 6
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "emb" / ".hydra").exists()


def test_ids_only_embeddings_recompute_the_stored_encodings_in_fewer_bytes(tiny_clip_export, tmp_path):
    urls = write_clean_shards(tmp_path / "shards", n_shards=1, per_shard=12)
    ids_dir, full_dir = tmp_path / "ids", tmp_path / "full"
    embed(tiny_clip_export, urls, ids_dir)  # the default: token ids, no encodings
    embed(tiny_clip_export, urls, full_dir, store_token_encodings=True)
    meta = read_meta(ids_dir)
    assert meta["store_token_encodings"] is False and meta["clip_source"] == str(tiny_clip_export.resolve())
    ids_file, full_file = embedding_path(ids_dir, urls[0]), embedding_path(full_dir, urls[0])
    ids_only, full = load_shard_embeddings(ids_file), load_shard_embeddings(full_file)
    assert "text_tokens" not in ids_only and ids_only["text_ids"].dtype == np.uint16
    assert ids_only["text_ids"].shape == (12, 32)
    np.testing.assert_array_equal(ids_only["text_ids"], full["text_ids"])
    # 32 x 128 float16 encodings (8 KB) + mask per sample against 32 uint16 ids (64 B)
    per_sample_ids, per_sample_full = ids_file.stat().st_size / 12, full_file.stat().st_size / 12
    assert per_sample_full - per_sample_ids > 32 * 128 * 2 and per_sample_ids < per_sample_full / 5
    ds = ShardDataset(urls, batch_size=12, image_size=32, shuffle_buffer=0, embeddings=str(ids_dir))
    batch = next(iter(ds))
    assert "text_tokens" not in batch and batch["text_ids"].dtype == torch.int64
    recompute = ClipConditioner(None, str(ids_dir), need_text_tokens=True)  # CLIP from meta.json's clip_source
    got = recompute(batch)
    assert recompute.recompute and recompute._clip[0].model.visual is None, "text tower only"
    stored = ClipConditioner(None, str(full_dir), need_text_tokens=True)(
        next(iter(ShardDataset(urls, batch_size=12, image_size=32, shuffle_buffer=0, embeddings=str(full_dir)))))
    assert got["text_tokens"].shape == (12, 32, 128)
    torch.testing.assert_close(got["text_tokens"], stored["text_tokens"], atol=4e-3, rtol=2e-3)  # f16 storage
    assert torch.equal(got["text_mask"], stored["text_mask"])
    torch.testing.assert_close(got["image_embed"], stored["image_embed"])


def test_ids_only_embeddings_without_a_reachable_clip_are_refused(tiny_clip_export, tmp_path):
    from omegaconf import OmegaConf

    urls = write_clean_shards(tmp_path / "shards", n_shards=1, per_shard=2)
    out = tmp_path / "emb"
    embed(tiny_clip_export, urls, out)
    with pytest.raises(ConfigError, match="written with store_token_encodings=false"):  # one folder, one format
        embed(tiny_clip_export, urls, out, store_token_encodings=True)
    meta = read_meta(out)
    (out / "meta.json").write_text(json.dumps({**meta, "clip_source": str(tmp_path / "moved_clip")}))
    cfg = OmegaConf.create({"stage": "prior", "clip_ckpt": None, "data": {"embeddings": str(out)}})
    with pytest.raises(ConfigError, match="stores caption token ids only.*cannot be read.*set clip_ckpt"):
        check_token_encodings(cfg)
    with pytest.raises(ConfigError, match="set clip_ckpt"):
        ClipConditioner(None, str(out), need_text_tokens=True).load()
    cfg.clip_ckpt = str(tiny_clip_export)
    check_token_encodings(cfg)  # a clip_ckpt given beside the folder is used instead
    ClipConditioner(None, str(out), need_text_tokens=False).load()  # z_i and z_t only: no CLIP needed
    other = make_tiny_clip_export(tmp_path / "other_clip", seed=1)
    (out / "meta.json").write_text(json.dumps({**meta, "clip_source": str(other)}))
    with pytest.raises(ConfigError, match="was made with clip_hash="):
        ClipConditioner(None, str(out), need_text_tokens=True).load()
