"""``unclip-train -m`` with the basic launcher: one run_dir per job under the sweep dir, a sweep preset's values
overridable from the command line, and scripts/collect_runs.py turning the jobs into one table."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from tests.conftest import ROOT
from tests.scaleout.helpers import TINY, env, finish, start


def test_multirun_of_two_jobs_gives_two_run_dirs_and_one_collected_table(tmp_path, emoji_root, tiny_clip_export):
    sweep = tmp_path / "sweep"
    tiny = [o for o in TINY if not o.startswith("data.batches_per_epoch")]  # one process per job
    # +sweep=prior_cond_drop sweeps 0.0,0.1,0.2; the command line narrows it to two values.
    cmd = [sys.executable, "-m", "unclip.train", "-m", "experiment=emoji_prior_tiny", "+sweep=prior_cond_drop",
           "module.cond_drop_prob=0.0,0.2", f"clip_ckpt={tiny_clip_export}", f"hydra.sweep.dir={sweep}", *tiny]
    code, tail = finish(start(cmd, tmp_path, tmp_path / "sweep.log"), tmp_path / "sweep.log", timeout=400)
    assert code == 0, tail
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    for job, drop in zip(jobs, (0.0, 0.2), strict=True):
        config = OmegaConf.load(job / "config.yaml")
        # not the preset's run_dir
        assert config.run_dir == str(job) and config.callbacks.metrics_file.run_dir == str(job)
        assert config.module.cond_drop_prob == drop
        assert json.loads((job / "metrics.json").read_text())["global_step"] == 2
        assert (job / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "runs").exists(), "nothing written to the preset's own run_dir"

    table = tmp_path / "table.csv"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "collect_runs.py"), str(sweep), "--csv", str(table)],
                          env=env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(table.open()))
    assert [r["job"] for r in rows] == ["0", "1"] and {r["status"] for r in rows} == {"ok"}
    header = list(rows[0])
    assert header[:3] == ["job", "status", "module.cond_drop_prob"], "the swept key comes first"
    assert [float(r["module.cond_drop_prob"]) for r in rows] == [0.0, 0.2]
    for job, row in zip(jobs, rows, strict=True):
        metrics = json.loads((job / "metrics.json").read_text())
        assert float(row["val/cos_pred"]) == pytest.approx(metrics["val/cos_pred"], rel=1e-5)
    markdown = proc.stdout.splitlines()
    assert markdown[0].startswith("| job | status | module.cond_drop_prob |") and len(markdown) == 4
