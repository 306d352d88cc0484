"""unclip-demo's time budget (unclip/demo_budget.py): the share and step arithmetic, and that a run stopped by time
(Lightning's max_time, or the probe's own stop) still validates and writes last.ckpt and metrics.json."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import compose_train
from unclip.config import ConfigError
from unclip.demo import CONF_DIR, STAGES
from unclip.demo_budget import (
    BudgetSettings,
    Timing,
    allotment,
    clock,
    clock_overrides,
    plan_steps,
    progress_line,
    read_timing,
)
from unclip.demo_report import write_report
from unclip.training.runner import train


def test_shipped_shares_cover_every_part_and_sum_to_one():
    settings = BudgetSettings.load(CONF_DIR / "demo.yaml")
    assert list(settings.shares) == [s for s, _, _ in STAGES] + ["eval"], "one share per part, in running order"
    assert sum(settings.shares.values()) == pytest.approx(1.0)
    assert 0 < settings.budget_minutes < 20, "the README's promise: the demo under 20 minutes"


def test_bad_settings_are_refused_by_name(tmp_path):
    text = (CONF_DIR / "demo.yaml").read_text()
    bad = tmp_path / "demo.yaml"
    bad.write_text(re.sub(r"(?m)^(  prior:) [0-9.]+", r"\1 0", text))
    assert bad.read_text() != text
    with pytest.raises(ConfigError, match="shares.prior"):
        BudgetSettings.load(bad)
    bad.write_text(text.replace("probe_steps: 10", "probe_steps: 1"))
    with pytest.raises(ConfigError, match="probe_steps"):
        BudgetSettings.load(bad)
    bad.write_text(text + "unknown_key: 1\n")
    with pytest.raises(ConfigError, match="unknown_key"):
        BudgetSettings.load(bad)


def test_each_part_gets_its_share_of_what_remains():
    shares = {"a": 1.0, "b": 1.0, "c": 2.0}
    assert allotment(400.0, shares, "a", ["b", "c"]) == pytest.approx(100.0)
    # a used 50 s of its 100: b gets a third of the 350 left, the unused 50 s spread over b and c
    assert allotment(350.0, shares, "b", ["c"]) == pytest.approx(350.0 / 3)
    # b overran: c, the last part, gets whatever is left, and nothing once the budget is spent
    assert allotment(120.0, shares, "c", []) == pytest.approx(120.0)
    assert allotment(-5.0, shares, "c", []) == 0.0


def _timing(step_s: float = 0.5, steps: int = 10) -> Timing:
    # 5 s before training starts, a first step 1.5 s slower than the steady ones, 3 s validating, 1 s saving
    first = 5.0 + 1.5 + step_s
    last = first + (steps - 1) * step_s
    return Timing(call=0.0, train_start=5.0, first_batch_end=first, last_batch_end=last, steps=steps, val_s=3.0,
                  end=last + 3.0 + 1.0)


def test_timing_splits_a_run_into_setup_steps_validation_and_saves():
    t = _timing()
    assert (t.pre_s, t.step_s, t.val_s) == pytest.approx((5.0, 0.5, 3.0))
    assert (t.warm_s, t.after_s) == pytest.approx((1.5, 1.0))
    assert t.as_dict()["seconds"] == pytest.approx(t.end - t.call, abs=0.01)


def test_plan_fills_the_time_left_after_paying_setup_validation_and_saves_again():
    # 100 s left: 5 s set-up, 3 s validation and 1 s saves come off (max_time 91 s); the first step's 1.5 s extra,
    # then 95 % of the 89.5 s at 0.5 s a step: 170 more steps after the probe's 10
    assert plan_steps(100.0, _timing(), done=10, preset_steps=4000, max_step_factor=4,
                      plan_fraction=0.95) == (180, pytest.approx(91.0))
    # a fast machine trains more steps than the preset, but at most max_step_factor times as many (never more time)
    steps, _ = plan_steps(100.0, _timing(step_s=0.01), done=10, preset_steps=20, max_step_factor=4,
                          plan_fraction=0.95)
    assert steps == 80
    # no time for even one more step: the probe is the run
    assert plan_steps(9.0, _timing(), done=10, preset_steps=4000, max_step_factor=4, plan_fraction=0.95) == (10, 0.0)
    # a probe cut to one step measured no steady step: nothing to plan from
    assert plan_steps(100.0, _timing(steps=1), done=1, preset_steps=4000, max_step_factor=4,
                      plan_fraction=0.95)[0] == 1


def test_progress_line_names_the_part_and_the_time_left():
    assert clock(75.4) == "1:15" and clock(-20.0) == "-0:20"
    line = progress_line("decoder", "step 10/100", start=1000.0, budget_s=240.0, now=1075.0)
    assert line == "unclip-demo [1:15 / 4:00, 2:45 left] decoder: step 10/100"
    assert progress_line("clip", "x", start=0.0, budget_s=None, now=61.0) == "unclip-demo [1:01] clip: x"


def _tiny_clip(run_dir: Path, *overrides: str) -> dict:
    """A tiny CLIP on the emoji-layout shards (built by conftest), set to train far longer than it will."""
    never = 100_000
    cfg = compose_train(["experiment=emoji_clip_tiny", f"run_dir={run_dir}", "logger=none",
                         "trainer.enable_progress_bar=false", "data.num_workers=0", "data.batch_size=4",
                         "trainer.limit_val_batches=1", f"trainer.max_steps={never}",
                         f"trainer.val_check_interval={never}", f"callbacks.checkpoint.every_n_train_steps={never}",
                         *overrides])
    return train(cfg)


def _assert_stopped_early_with_final_checkpoint_and_metrics(run_dir: Path, result: dict) -> int:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    step = metrics["global_step"]
    assert 0 < step < 100_000, "stopped by time, long before max_steps"
    assert "val/loss" in metrics, "the stop validated"
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == step, "last.ckpt holds the stopped run's final state"
    assert result["last_checkpoint"] == str(run_dir / "checkpoints" / "last.ckpt")
    return step


def test_max_time_stop_still_validates_and_writes_last_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    record = run_dir / "timing.json"
    clock_args = clock_overrides("clip", budget_start=time.time(), budget_s=None, stage_end=None, every_s=0.0,
                                 record=record)
    result = _tiny_clip(run_dir, "++trainer.max_time={seconds:2}", *clock_args)
    step = _assert_stopped_early_with_final_checkpoint_and_metrics(run_dir, result)
    # the clock timed the real run: its steps (one or more: a loaded machine may take 2 s for the first) and the
    # validation after the stop
    timing = read_timing(record, call=0.0, end=1e12)
    assert timing.steps == step and timing.val_s > 0 and timing.step_s >= 0
    # Lightning's Timer starts its clock in its own on_train_start, a moment before or after ours: 50 ms slack
    assert timing.last_batch_end - timing.train_start >= 2.0 - 0.05, "max_time's clock ran its 2 s of training"
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("unclip-demo [")]
    assert lines[0].endswith(f"clip: training from step 0 to {100_000}")
    assert lines[-1].endswith(f"clip: training stopped at step {step}/{100_000}")


def test_probe_stop_at_validates_writes_last_checkpoint_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    record = run_dir / "timing.json"
    clock_args = clock_overrides("clip", budget_start=0.0, budget_s=None, stage_end=None, every_s=60.0,
                                 record=record, stop_at=time.time() + 3.0)
    result = _tiny_clip(run_dir, *clock_args)
    step = _assert_stopped_early_with_final_checkpoint_and_metrics(run_dir, result)
    # the demo's continuation: resume from the probe's checkpoint to a planned step count (no Timer offset carried)
    resumed = _tiny_clip(run_dir, "resume=true", f"trainer.max_steps={step + 2}",
                         f"trainer.val_check_interval={step + 2}", "++trainer.max_time={seconds:600}",
                         *clock_overrides("clip", 0.0, None, None, 60.0, record))
    assert read_timing(record, call=0.0, end=1e12).steps == 2, "it continued the probe, not a fresh run"
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == step + 2
    assert resumed["last_checkpoint"] == str(run_dir / "checkpoints" / "last.ckpt")


def test_report_states_the_budget_shares_seconds_and_steps(tmp_path):
    stages = {s: {"status": "trained", "share": 0.25, "allotted_s": 50.0, "seconds": 40.0 + i, "steps": 100 + i,
                  "preset_steps": 600, "stopped_by": "steps", "metrics": {}} for i, (s, _, _) in enumerate(STAGES)}
    summary = {"data": {"seconds": 1.5}, "stages": stages, "seconds": 200.0,
               "budget": {"minutes": 4, "seconds": 240.0, "shares": {"clip": 0.25}, "max_step_factor": 4,
                          "within": True}}
    page = write_report(tmp_path, summary, None).read_text()
    assert "| decoder | trained | 0.25 | 50 | 42 | 102 (600) | steps |" in page
    assert "Budget: 4 min (240 s)" in page and "total 200 s, within the budget" in page
    summary["budget"]["within"] = False
    assert "OVER the budget" in write_report(tmp_path, summary, None).read_text()
    summary["budget"] = None
    assert "No time budget" in write_report(tmp_path, summary, None).read_text()
