"""unclip-eval on a random-weights tiny chain and the built-in demo val shards: every report field, the real-feature
cache, the FD-CLIP fallback, and two gloo ranks gathering to the single-process report."""

from __future__ import annotations

import json
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from tests.evaluation.conftest import chain_eval_config
from unclip.evaluation.run import evaluate

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to", "ignore:.*LeafSpec")
DESIGN_FIELDS = ("num_samples", "fid", "kid_mean", "kid_std", "clip_score", "precision", "recall",
                 "feature_extractor", "clip_scorer", "steps", "guidance", "seconds")
FAST = ["num_samples=12", "batch_size=6", "prior.steps=3", "decoder.steps=3", "upsamplers.steps=2", "kid.subsets=5",
        "grid_size=4"]


def eval_config(chain: dict, tmp_path, *overrides: str):
    return chain_eval_config("evaluate", chain, tmp_path / "eval", f"cache_dir={tmp_path / 'cache'}", *FAST,
                             *overrides)


def test_report_has_every_field_finite_and_the_real_features_are_cached(tiny_chain, inception_weights, tmp_path):
    cfg = eval_config(tiny_chain, tmp_path, f"inception_weights={inception_weights}", "feature_extractor=inception")
    report = evaluate(cfg)
    on_disk = json.loads((tmp_path / "eval" / "report.json").read_text())
    for key in DESIGN_FIELDS:
        assert key in on_disk, key
    for key in ("fid", "fd_clip", "kid_mean", "kid_std", "clip_score", "precision", "recall", "seconds"):
        assert isinstance(on_disk[key], float) and math.isfinite(on_disk[key]), key
    assert on_disk["num_samples"] == 12 and on_disk["fid"] > 0 and 0 <= on_disk["precision"] <= 1
    assert on_disk["kid_subset_size"] == 6 and on_disk["kid_std"] > 0, "subsets differ, so their spread is real"
    assert "pt_inception" in on_disk["feature_extractor"] and "clip_scorer_warning" in on_disk
    assert on_disk["steps"] == {"prior": 3, "decoder": 3, "upsamplers": [2]}
    assert on_disk["guidance"]["decoder"] == 1.25 and not on_disk["real_features_cached"]
    acc = on_disk["caption_accuracy"]
    assert acc["seen"]["n"] + acc["held_out"]["n"] == 12 and acc["held_out"]["n"] > 0
    assert acc["all"]["position"] is None, "no demo caption names a position: null (valid JSON), not NaN"
    assert on_disk["caption_accuracy_real"]["all"]["color"] > 0.9, "the checker reads the real val images"
    assert Image.open(tmp_path / "eval" / "grid.png").size == (2 * 34 + 2, 2 * 34 + 2)  # 4 samples of 32px
    assert len((tmp_path / "eval" / "grid.txt").read_text().splitlines()) == 4

    again = evaluate(cfg)
    assert again["real_features_cached"] and again["fid"] == report["fid"] and again["fd_clip"] == report["fd_clip"]


def test_without_inception_weights_auto_reports_fd_clip_and_no_fid(tiny_chain, tmp_path):
    cfg = eval_config(tiny_chain, tmp_path, f"inception_weights={tmp_path / 'missing.pth'}", "num_samples=8",
                      "save_images=true")
    report = evaluate(cfg)
    assert report["fid"] is None and "inception_weights=PATH" in report["fid_note"]
    assert report["feature_extractor"].startswith("clip image embedding")
    assert math.isfinite(report["kid_mean"]) and math.isfinite(report["fd_clip"])
    assert len(list((tmp_path / "eval" / "samples").glob("*.png"))) == 8
    strict = eval_config(tiny_chain, tmp_path, f"inception_weights={tmp_path / 'missing.pth'}",
                         "feature_extractor=inception")
    with pytest.raises(RuntimeError, match="feature_extractor=inception but its weights could not be loaded"):
        evaluate(strict)
    with pytest.raises(ValueError, match="num_samples=100000 but the val shards"):
        evaluate(eval_config(tiny_chain, tmp_path, "feature_extractor=clip", "num_samples=100000"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, cfg, out) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    report = evaluate(cfg)
    torch.distributed.destroy_process_group()
    if rank == 0:
        out.put(report)


def test_two_ranks_gather_features_to_the_single_process_report(tiny_chain, tmp_path):
    # batch_size 1 seeds every caption's sample by its index, so both layouts draw the same images
    single = evaluate(eval_config(tiny_chain, tmp_path / "one", "feature_extractor=clip", "num_samples=6",
                                  "batch_size=1"))
    cfg = eval_config(tiny_chain, tmp_path / "two", "feature_extractor=clip", "num_samples=6", "batch_size=1")
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, cfg, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert all(p.exitcode == 0 for p in procs)
    double = out.get()
    assert double["world_size"] == 2 and single["world_size"] == 1
    for key in ("fd_clip", "kid_mean", "clip_score", "precision", "recall"):
        assert double[key] == pytest.approx(single[key], rel=1e-5, abs=1e-6), key


def test_coco_recipe_captions_file_against_saved_reference_statistics(tiny_chain, tiny_clip_export, inception_weights,
                                                                      tmp_path):
    """The COCO-30k recipe in miniature: the real side saved once as statistics, captions from a COCO-style
    annotation file, no val shards, a named CLIP scorer; report.json names the reference by its fingerprint."""
    from tests.evaluation.test_score import _cfg, _folder
    from unclip.evaluation.reference import load_reference
    from unclip.evaluation.score import score

    weights = f"inception_weights={inception_weights}"
    stats = tmp_path / "coco_ref.npz"
    score(_cfg(weights, f"real={_folder(tmp_path / 'real', 10, 0)}", "fake=null", "image_size=32",
               f"save_reference={stats}", f"out_dir={tmp_path / 'ref'}"))
    captions = tmp_path / "captions_val.json"
    captions.write_text(json.dumps({"annotations": [{"image_id": i, "caption": f"a photo of {i} red circles"}
                                                    for i in range(9)]}))
    cfg = eval_config(tiny_chain, tmp_path, weights, "feature_extractor=inception", f"captions_file={captions}",
                      f"reference={stats}", f"clip_scorer={tiny_clip_export}", "num_samples=8")
    cfg.val_shards = None
    report = evaluate(cfg)
    on_disk = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert on_disk["fid"] > 0 and math.isfinite(on_disk["kid_mean"]) and 0 <= on_disk["precision"] <= 1
    assert on_disk["reference"]["fingerprint"] == load_reference(stats).fingerprint
    assert on_disk["reference"]["num_samples"] == 10 and on_disk["kid_subset_size"] == 4
    assert on_disk["fd_clip"] is None, "no real images, so no real CLIP features"
    assert on_disk["captions_source"] == str(captions) and "clip_scorer_warning" not in on_disk
    assert "caption_accuracy" not in on_disk, "the demo checker does not apply to these captions"
    assert "pt_inception" in on_disk["precision_recall_features"] and "VGG-16" in on_disk["precision_recall_note"]
    assert report["num_samples"] == 8
    cfg.captions_file = None
    with pytest.raises(ValueError, match="without val_shards give captions_file"):
        evaluate(cfg)


def test_max_seconds_stops_sampling_at_a_batch_boundary_and_says_so(tiny_chain, tmp_path):
    """A limit already spent by the set-up still samples one batch (6 of 12 captions), scores it and reports why;
    a generous limit changes nothing."""
    report = evaluate(eval_config(tiny_chain, tmp_path, "feature_extractor=clip", "max_seconds=0.001"))
    assert report["num_samples"] == 6 and report["num_samples_requested"] == 12
    assert report["stopped_by"] == "max_seconds" and math.isfinite(report["fd_clip"])
    assert report["caption_accuracy"]["all"]["n"] == 6
    full = evaluate(eval_config(tiny_chain, tmp_path, "feature_extractor=clip", "max_seconds=3600"))
    assert full["num_samples"] == 12 and full["stopped_by"] == "num_samples"


def test_time_limit_plans_the_next_batch_at_the_slowest_pace():
    from unclip.evaluation.run import TimeLimit, time_limit

    limit = TimeLimit(10.0)
    assert limit.next_fits(9.5), "the first batch always runs"
    limit.batch_done(12.0)  # 2.5 s
    assert not limit.next_fits(12.0)
    limit = TimeLimit(10.0)
    limit.next_fits(1.0)
    limit.batch_done(4.0)  # 3 s
    assert limit.next_fits(4.0) and limit.next_fits(7.0) and not limit.next_fits(7.5)
    limit.batch_done(5.0)  # 1 s: the slowest batch (3 s) still sets the pace
    assert not limit.next_fits(7.5)
    assert time_limit(None, 1) is None
    with pytest.raises(ValueError, match="single-process"):
        time_limit(5, 2)
    with pytest.raises(ValueError, match="max_seconds must be > 0"):
        time_limit(0, 1)
