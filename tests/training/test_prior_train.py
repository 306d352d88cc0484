"""The prior stage end to end through ``unclip.training.runner.train`` on the emoji shards.

Fast: a few steps on a random-weights CLIP, embedding on the fly and from ``unclip-embed`` files (metrics.json
written, checkpoint loadable as a prior chained to that CLIP). Slow: with a CLIP trained for 40 steps in a
session fixture, a short prior run and the ``emoji_prior_tiny`` preset as shipped beat the text-embedding baseline
cos(z_t, z_i) on the val set, and beat the prediction for a shuffled caption.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import EMOJI, compose_train
from tests.emoji_like import count_samples
from unclip.data.embeddings import embedding_path, load_shard_embeddings, write_shard_embeddings
from unclip.embed import run_embed
from unclip.models.clip_embedder import FrozenCLIP
from unclip.models.prior_sampling import load_prior
from unclip.stages import ClipInfo
from unclip.training.runner import train

VAL_SHARD = EMOJI / "val" / "00000.tar"
VAL_SIZE = count_samples(VAL_SHARD)
pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers")
VAL_KEYS = ("val/cos_pred", "val/cos_text", "val/cos_shuffled", "val/mse_ema", "val/num_samples")


def run_prior(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str) -> tuple[dict, dict]:
    monkeypatch.setenv("UNCLIP_EMOJI_ROOT", str(EMOJI))
    cfg = compose_train(["experiment=emoji_prior_tiny", f"run_dir={tmp_path / 'prior'}",
                         "trainer.enable_progress_bar=false", *overrides])
    out = train(cfg)
    return out, json.loads((Path(out["run_dir"]) / "metrics.json").read_text())


def short(steps: int) -> list[str]:
    return [f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
            f"callbacks.checkpoint.every_n_train_steps={steps}"]


@pytest.fixture(scope="session")
def trained_clip(tmp_path_factory) -> str:
    """The emoji_clip_tiny preset cut to 40 steps (~40 s on 2 cores): recall@5 ~15% against 1.25% chance."""
    run_dir = tmp_path_factory.mktemp("emoji_clip") / "run"
    cfg = compose_train(["experiment=emoji_clip_tiny", f"run_dir={run_dir}", "trainer.enable_progress_bar=false",
                         "trainer.max_steps=40", "trainer.val_check_interval=40",
                         "callbacks.checkpoint.every_n_train_steps=40", "module.scheduler.warmup_steps=10",
                         f"data.train_shards='{EMOJI}/train/{{00000..00003}}.tar'", f"data.val_shards={VAL_SHARD}"])
    return train(cfg)["last_checkpoint"]


def test_prior_trains_on_the_fly_and_chains_to_its_clip(tiny_clip_export, tmp_path, monkeypatch):
    out, metrics = run_prior(tmp_path, monkeypatch, f"clip_ckpt={tiny_clip_export}", *short(8),
                             "data.batch_size=32", "module.val_sampling.steps=4")
    assert set(VAL_KEYS) <= metrics.keys() and metrics["val/num_samples"] == VAL_SIZE
    assert metrics["global_step"] == 8
    model, info = load_prior(out["last_checkpoint"])
    info.check(ClipInfo.of(FrozenCLIP.from_path(tiny_clip_export)))
    assert model.embed_dim == 128 and info.clip.context_length == 32


def test_prior_trains_on_precomputed_embeddings_without_decoding_images(tiny_clip_export, tmp_path, monkeypatch):
    emb = tmp_path / "emb"
    run_embed(str(tiny_clip_export), str(VAL_SHARD), str(emb), batch_size=200, num_workers=0, rank=0,
              world_size=1, device="cpu", progress=False)
    path = embedding_path(emb, str(VAL_SHARD))  # drop 10 samples' rows: they must be skipped and counted
    stored = load_shard_embeddings(path)
    keep = {name: array[10:] for name, array in stored.items() if name != "keys"}
    write_shard_embeddings(path, stored["keys"][10:].tolist(), keep)
    # The val shard serves as both splits: train/00000.tar and val/00000.tar share a name, so one folder
    # cannot hold both (unclip-embed refuses it).
    batch = min(32, (VAL_SIZE - 10) // 6)  # 6 steps within one pass: each dropped row is skipped once
    out, metrics = run_prior(tmp_path, monkeypatch, f"data.embeddings={emb}", "data.decode_images=false",
                             f"data.train_shards={VAL_SHARD}", f"data.val_shards={VAL_SHARD}", *short(6),
                             f"data.batch_size={batch}", "module.val_sampling.steps=4")
    assert metrics["val/num_samples"] == VAL_SIZE - 10 and metrics["global_step"] == 6
    assert 0 < out["metrics"]["data/skipped"] <= 10, "training reports the samples it read without embeddings"
    assert load_prior(out["last_checkpoint"])[1].clip.clip_hash == FrozenCLIP.from_path(tiny_clip_export).clip_hash


@pytest.mark.slow
def test_short_prior_run_beats_the_text_embedding_baseline(trained_clip, tmp_path, monkeypatch):
    start = time.perf_counter()
    _, metrics = run_prior(tmp_path, monkeypatch, f"clip_ckpt={trained_clip}", *short(150))
    print(f"\nprior 150 steps: {time.perf_counter() - start:.0f} s, {json.dumps(metrics)}")
    assert metrics["val/num_samples"] == VAL_SIZE
    assert metrics["val/cos_pred"] > metrics["val/cos_text"] + 0.2
    assert metrics["val/cos_pred"] > metrics["val/cos_shuffled"]


@pytest.mark.slow
def test_emoji_prior_tiny_preset_beats_the_text_embedding_baseline(trained_clip, tmp_path, monkeypatch):
    start = time.perf_counter()
    _, metrics = run_prior(tmp_path, monkeypatch, f"clip_ckpt={trained_clip}")
    print(f"\nemoji_prior_tiny: {time.perf_counter() - start:.0f} s, {json.dumps(metrics)}")
    assert metrics["global_step"] == 600 and metrics["val/num_samples"] == VAL_SIZE
    assert metrics["val/cos_pred"] > metrics["val/cos_text"] + 0.2
    assert metrics["val/cos_pred"] > metrics["val/cos_shuffled"] + 0.02
