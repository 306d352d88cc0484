"""unclip-demo, the README's main job: every built stage trains on the demo data and chains."""

from __future__ import annotations

import json
import math

from unclip.demo import STAGES, main


def test_demo_runs_every_built_stage_and_reuses_them(tmp_path, capsys):
    out = tmp_path / "demo"
    fast = ["data.num_workers=0", "trainer.enable_progress_bar=false", "trainer.limit_val_batches=1"]
    assert main(["--out", str(out), "--steps", "3", *fast]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["val_check"]["samples"] > 0 and summary["data"]["val_check"]["skipped"] == {}
    trained = [s for s, _, _ in STAGES if summary["stages"][s]["status"] == "trained"]
    assert trained[:2] == ["clip", "prior"], "clip and prior exist and train in order"
    for stage in trained:
        entry = summary["stages"][stage]
        assert (out / stage / "checkpoints" / "last.ckpt").is_file()
        assert (out / stage / "config.yaml").is_file()
        numbers = [v for k, v in entry["metrics"].items() if k.startswith("val/")]
        assert numbers and all(math.isfinite(v) for v in numbers), f"{stage} validated"
    # the prior was trained against the demo CLIP: the chain's checkpoint is in its resolved config
    assert str(out / "clip" / "checkpoints" / "last.ckpt") in (out / "prior" / "config.yaml").read_text()
    main(["--out", str(out), "--steps", "3", *fast])
    again = json.loads((out / "summary.json").read_text())
    assert all(again["stages"][s]["status"] == "reused" for s in trained)
