"""scripts/collect_runs.py on hand-made job folders: nested report.json keys, missing results, natural order."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from tests.conftest import ROOT
from tests.scaleout.helpers import env

SCRIPT = str(ROOT / "scripts" / "collect_runs.py")
_spec = importlib.util.spec_from_file_location("collect_runs", SCRIPT)
collect_runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(collect_runs)


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


def test_eval_reports_are_rows_with_the_overrides_they_record(tmp_path):
    for job, scale in (("0", 1), ("1", 2), ("10", 4)):  # unclip-eval -m: out_dir/N/report.json, no .hydra folder
        (tmp_path / job).mkdir()
        overrides = ["num_samples=4", f"decoder.guidance_scale={scale}"]
        (tmp_path / job / "report.json").write_text(json.dumps({"fd_clip": 10.0 / scale, "overrides": overrides}))
    columns, rows = collect_runs.collect(tmp_path)
    assert columns == ["job", "status", "decoder.guidance_scale", "num_samples", "report.fd_clip"]
    assert [(r["job"], r["decoder.guidance_scale"], r["report.fd_clip"]) for r in rows] == [
        ("0", "1", 10.0), ("1", "2", 5.0), ("10", "4", 2.5)]


def test_each_unclip_eval_multirun_job_gets_its_own_out_dir_and_records_its_overrides(tmp_path):
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from unclip.evaluate import use_job_out_dir

    cfg = OmegaConf.create({"out_dir": str(tmp_path)})
    OmegaConf.set_struct(cfg, True)
    job = SimpleNamespace(mode=RunMode.MULTIRUN, runtime=SimpleNamespace(output_dir=str(tmp_path / "2")),
                          overrides=SimpleNamespace(task=[f"out_dir={tmp_path}", "decoder.guidance_scale=4"]))
    use_job_out_dir(cfg, job)
    assert cfg.out_dir == str(tmp_path / "2") and list(cfg.overrides) == job.overrides.task
    single = OmegaConf.create({"out_dir": "runs/eval"})
    use_job_out_dir(single, SimpleNamespace(mode=RunMode.RUN, overrides=SimpleNamespace(task=["seed=1"])))
    assert single.out_dir == "runs/eval" and list(single.overrides) == ["seed=1"]


@pytest.mark.slow
def test_a_guidance_sweep_through_unclip_eval_gives_one_row_per_job(tmp_path, tiny_chain):
    from unclip.data.demo_shapes import DemoShapesConfig, ensure_demo_shards

    val = ensure_demo_shards(DemoShapesConfig())["val"]
    sweep = tmp_path / "guidance"
    cmd = [sys.executable, "-m", "unclip.evaluate", "-m", f"clip_ckpt={tiny_chain['clip']}",
           f"prior_ckpt={tiny_chain['prior']}", f"decoder_ckpt={tiny_chain['decoder']}",
           f"upsampler_ckpts=[{tiny_chain['upsampler']}]", f"val_shards='{val}'", f"out_dir={sweep}", "device=cpu",
           "feature_extractor=clip", f"cache_dir={tmp_path / 'cache'}", "num_samples=4", "batch_size=4",
           "prior.steps=2", "decoder.steps=2", "upsamplers.steps=2", "kid.subsets=2", "grid_size=0",
           "decoder.guidance_scale=1,2,4"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = {job: json.loads((sweep / job / "report.json").read_text()) for job in ("0", "1", "2")}
    assert [r["guidance"]["decoder"] for r in reports.values()] == [1.0, 2.0, 4.0]
    assert reports["2"]["overrides"][-1] == "decoder.guidance_scale=4"

    out = tmp_path / "t.csv"
    proc = subprocess.run([sys.executable, SCRIPT, str(sweep), "--csv", str(out)], env=env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(out.open()))
    assert [r["job"] for r in rows] == ["0", "1", "2"] and list(rows[0])[:3] == ["job", "status",
                                                                                    "decoder.guidance_scale"]
    assert [r["decoder.guidance_scale"] for r in rows] == ["1", "2", "4"]
    assert [float(r["report.guidance.decoder"]) for r in rows] == [1.0, 2.0, 4.0]
    assert all(float(r["report.fd_clip"]) >= 0 for r in rows) and "report.overrides" not in rows[0]
