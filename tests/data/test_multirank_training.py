"""The paper prior preset on two gloo ranks: resampled shards without batches_per_epoch, over shards full of
hostile members, finishing with every rank's skip counts by reason in its CSV log (tiny model overrides)."""

from __future__ import annotations

import csv
import sys

import pytest

from tests.data.test_hostile_members import hostile_shard
from tests.scaleout.helpers import finish, start


@pytest.mark.slow  # two training processes: about 3 min on a loaded 2-core machine (fast tests cover each part)
def test_paper_prior_trains_on_two_ranks_over_hostile_resampled_shards(tmp_path, tiny_clip_export):
    urls = [hostile_shard(tmp_path / f"{i:05d}.tar")[0] for i in range(2)]
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "unclip.train", "experiment=paper_prior", "trainer=ddp_cpu", "trainer.devices=2",
           "model/prior=tiny", "model.embed_dim=128", "model.text_width=128", "model.context_length=32",
           f"clip_ckpt={tiny_clip_export}", f"data.train_shards=[{','.join(urls)}]", "data.val_shards=null",
           "data.decode_images=true", "data.batch_size=2", "data.num_workers=1", "data.pin_memory=false",
           "data.persistent_workers=false", "trainer.max_steps=3", "trainer.precision=32",
           "trainer.val_check_interval=3", "trainer.log_every_n_steps=1", "logger=csv", f"run_dir={run_dir}",
           "cpu_threads=1", "trainer.enable_progress_bar=false", "callbacks.checkpoint.every_n_train_steps=3",
           "module.scheduler.warmup_steps=1"]
    code, log = finish(start(cmd, tmp_path / "cwd", tmp_path / "train.log"), tmp_path / "train.log", timeout=540)
    assert code == 0, log
    assert "data.batches_per_epoch" not in log
    with (run_dir / "logs" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    last = {k: float(v) for row in rows for k, v in row.items() if v not in ("", None)}
    for rank in (0, 1):  # both ranks read EPS-behind-.jpg samples and bad npy members in 3 steps of 2
        assert f"data/padded/rank{rank}" in last
        assert any(k.startswith("data/repaired/") and k.endswith(f"/rank{rank}") for k in last), sorted(last)
    assert last["data/skipped/all"] + last["data/repaired/all"] > 0
