"""scripts/collect_runs.py on hand-made job folders: nested report.json keys, missing results, natural order."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

from tests.conftest import ROOT
from tests.scaleout.helpers import env

SCRIPT = str(ROOT / "scripts" / "collect_runs.py")


def _job(path, overrides, metrics=None, report=None):
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if metrics is not None:
        (path / "metrics.json").write_text(json.dumps(metrics))
    if report is not None:
        (path / "eval").mkdir()
        (path / "eval" / "report.json").write_text(json.dumps(report))


def test_rows_in_job_order_with_flattened_reports_and_failed_jobs_marked(tmp_path):
    _job(tmp_path / "10", ["a=3", "b=x"], {"val/loss": 0.5})
    _job(tmp_path / "2", ["a=2", "b=x"], {"val/loss": 0.25}, {"fid": 12.5, "steps": {"prior": 64}})
    _job(tmp_path / "3", ["a=1", "b=x"])  # crashed before writing anything
    out = tmp_path / "t.csv"
    proc = subprocess.run([sys.executable, SCRIPT, str(tmp_path), "--csv", str(out)], env=env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(out.open()))
    assert [r["job"] for r in rows] == ["2", "3", "10"]
    assert list(rows[0])[:4] == ["job", "status", "a", "b"]
    assert rows[0]["report.fid"] == "12.5" and rows[0]["report.steps.prior"] == "64"
    assert [r["status"] for r in rows] == ["ok", "no results", "ok"] and rows[1]["val/loss"] == ""
    assert rows[2]["val/loss"] == "0.5"


def test_a_folder_without_jobs_is_an_error(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, str(tmp_path)], env=env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and "no jobs under" in proc.stderr
