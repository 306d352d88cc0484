"""The clip stage end to end through ``unclip.training.runner.train`` on the emoji shards.

Fast: ~20 steps of a tiny CLIP (loss falls; checkpoint, metrics.json and export written and loadable).
Slow: the ``emoji_clip_tiny`` preset as shipped reaches retrieval recall@5 far above chance, and a
two-process CPU DDP run through the ``unclip-train`` command line validates on the whole val set.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import pytest
import torch

from tests.conftest import EMOJI
from tests.emoji_like import count_samples
from tests.training.test_clip_module import compose_train
from unclip.models.clip import CONFIG_FILE, WEIGHTS_FILE, load_clip, read_checkpoint
from unclip.training.runner import train

VAL_SIZE = count_samples(EMOJI / "val" / "00000.tar")


def run_emoji(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str) -> dict:
    monkeypatch.setenv("UNCLIP_EMOJI_ROOT", str(EMOJI))
    cfg = compose_train(["experiment=emoji_clip_tiny", f"run_dir={tmp_path / 'run'}",
                         "trainer.enable_progress_bar=false", *overrides])
    return train(cfg)


def logged(run_dir: Path, key: str) -> list[float]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


def test_tiny_clip_trains_through_the_runner(tmp_path, monkeypatch):
    steps = 20
    out = run_emoji(tmp_path, monkeypatch, f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
                    f"callbacks.checkpoint.every_n_train_steps={steps}", "trainer.log_every_n_steps=1",
                    "data.batch_size=32", "module.scheduler.warmup_steps=3")
    run_dir = Path(out["run_dir"])
    losses = logged(run_dir, "train/loss")
    assert len(losses) == steps
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == steps and metrics["val/num_samples"] == VAL_SIZE
    assert {"val/i2t_recall@1", "val/t2i_recall@5", "val/i2t_recall@10", "val/loss"} <= metrics.keys()

    # The Lightning checkpoint loads with weights_only=True and describes the CLIP.
    ckpt = read_checkpoint(out["last_checkpoint"])
    assert ckpt["unclip"]["stage"] == "clip" and ckpt["unclip"]["embed_dim"] == 128
    assert ckpt["unclip"]["image_size"] == 64 and ckpt["unclip"]["context_length"] == 32

    # The export and the checkpoint hold the same weights; plain open_clip reads the export.
    export = run_dir / "clip_export"
    assert (export / CONFIG_FILE).is_file() and (export / WEIGHTS_FILE).is_file()
    from_ckpt, tokenizer, meta = load_clip(out["last_checkpoint"])
    from_export, _, export_meta = load_clip(export)
    assert meta["clip_hash"] == export_meta["clip_hash"] == ckpt["unclip"]["clip_hash"]
    plain = open_clip.create_model("local-dir:" + str(export)).eval()
    tokens = tokenizer(["a grinning face", "a red apple"])
    with torch.no_grad():
        torch.testing.assert_close(plain.encode_text(tokens), from_ckpt.encode_text(tokens))


@pytest.mark.slow
def test_emoji_clip_tiny_preset_retrieves_far_above_chance(tmp_path, monkeypatch):
    start = time.perf_counter()
    out = run_emoji(tmp_path, monkeypatch)
    seconds = time.perf_counter() - start
    metrics = json.loads((Path(out["run_dir"]) / "metrics.json").read_text())
    print(f"\nemoji_clip_tiny: {seconds:.0f} s, {json.dumps(metrics)}")
    chance = 5 / VAL_SIZE
    assert metrics["val/num_samples"] == VAL_SIZE
    assert metrics["val/i2t_recall@5"] > 10 * chance and metrics["val/t2i_recall@5"] > 10 * chance


@pytest.mark.slow
def test_two_process_cpu_ddp_through_the_command_line(tmp_path):
    run_dir = tmp_path / "ddp"
    # One val shard for two ranks: rank 1 validates nothing and must still join the gather.
    cmd = [sys.executable, "-m", "unclip.train", "experiment=emoji_clip_tiny", "trainer=ddp_cpu",
           f"run_dir={run_dir}", "trainer.max_steps=6", "trainer.val_check_interval=6",
           "callbacks.checkpoint.every_n_train_steps=6", "data.batch_size=16", "trainer.enable_progress_bar=false",
           "cpu_threads=1", "data.batches_per_epoch=6"]
    env = {**os.environ, "UNCLIP_EMOJI_ROOT": str(EMOJI)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val/num_samples"] == VAL_SIZE and metrics["global_step"] == 6
    assert load_clip(run_dir / "clip_export")[2]["clip_hash"] == read_checkpoint(
        run_dir / "checkpoints" / "last.ckpt")["unclip"]["clip_hash"]
