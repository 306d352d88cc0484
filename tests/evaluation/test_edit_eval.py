"""The editing evaluation (unclip-eval --config-name evaluate_edit) on a random-weights tiny chain and the built-in
demo val shards: every report field, exactness outside the mask after compositing (and not before), the FD-CLIP
fallback, own-caption reconstruction, rank splitting, and config errors named before anything loads."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from tests.conftest import CONF_DIR
from tests.evaluation.conftest import chain_eval_config
from unclip.config import ConfigError, register_resolvers
from unclip.evaluation import edit_run
from unclip.evaluation.edit_run import caption_permutation, crop_box, evaluate_edits
from unclip.models.clip_embedder import clip_meta

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to", "ignore:.*LeafSpec")
FIELDS = ("task", "num_samples", "method_used", "new_caption", "outside_error_raw", "outside_error", "clip_score_new",
          "clip_score_original", "clip_score_real", "fd_clip_masked", "fid_masked", "feature_extractor", "crop",
          "masks", "by_mask_kind", "clip_scorer", "steps", "guidance", "repaint", "seconds")
FAST = ["num_samples=8", "prior.steps=2", "decoder.steps=3", "upsamplers.steps=2", "grid_size=4"]


def edit_config(chain: dict, tmp_path, *overrides: str):
    return chain_eval_config("evaluate_edit", chain, tmp_path / "edit", *FAST, *overrides)


def numbers(tree, path=""):
    """Every numeric leaf of a JSON tree as (path, value)."""
    if isinstance(tree, dict):
        return [x for k, v in tree.items() for x in numbers(v, f"{path}.{k}")]
    if isinstance(tree, list):
        return [x for i, v in enumerate(tree) for x in numbers(v, f"{path}[{i}]")]
    return [(path, tree)] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def test_report_fields_exact_outside_after_compositing_not_before(tiny_chain, inception_weights, tmp_path):
    cfg = edit_config(tiny_chain, tmp_path, f"inception_weights={inception_weights}", "feature_extractor=inception",
                      "method=repaint")
    evaluate_edits(cfg)
    report = json.loads((tmp_path / "edit" / "edit_report.json").read_text())
    for key in FIELDS:
        assert key in report, key
    for path, value in numbers(report):
        assert math.isfinite(value), path
    assert report["num_samples"] == 8 and report["method_used"] == "repaint" and report["task"] == "edit"
    after, before = report["outside_error"], report["outside_error_raw"]
    assert after["n"] == before["n"] == 8, "no whole-image masks by default: every edit keeps pixels"
    assert after["mse"] <= 1e-10 and after["mae"] <= 1e-6 and after["max_abs"] <= 1e-5, after
    # RePaint's last step leaves the model's own x̂₀ in the kept region: close to the image, not equal to it
    assert before["mse"] > 1e-6 and before["max_abs"] >= 2 / 255 - 1e-6, before
    for key in ("clip_score_new", "clip_score_original"):
        assert 0 <= report[key] <= 100, key
    assert all(0 <= v <= 100 for v in report["clip_score_real"].values())
    assert isinstance(report["fid_masked"], float) and report["fid_masked"] >= 0 and report["fd_clip_masked"] >= 0
    assert "pt_inception" in report["feature_extractor"] and "clip_scorer_warning" in report
    assert "full" not in report["masks"]["kinds"] and sum(report["masks"]["kinds"].values()) == 8
    assert sum(k["n"] for k in report["by_mask_kind"].values()) == 8 and 0 < report["masks"]["area_mean"] < 1
    assert report["steps"] == {"prior": 2, "decoder": 3, "upsamplers": [2]}
    assert report["crop"] == {"mode": "square", "size": clip_meta(tiny_chain["clip"])["image_size"]}
    assert report["new_caption_same_as_original"] < 8
    # 4 columns of 32px, 3 rows (original, overlay, edit), 2px padding
    assert Image.open(tmp_path / "edit" / "edit_grid.png").size == (4 * 34 + 2, 3 * 34 + 2)
    lines = (tmp_path / "edit" / "edit_grid.txt").read_text().splitlines()
    assert len(lines) == 4 and all(" -> " in line for line in lines)


def test_fd_clip_fallback_and_own_caption_reconstruction(tiny_chain, tmp_path):
    cfg = edit_config(tiny_chain, tmp_path, f"inception_weights={tmp_path / 'missing.pth'}", "new_caption=own",
                      "num_samples=4", "crop=box", "grid_size=0")
    report = evaluate_edits(cfg)
    assert report["fid_masked"] is None and "inception_weights=PATH" in report["fid_masked_note"]
    assert report["feature_extractor"].startswith("clip image embedding") and math.isfinite(report["fd_clip_masked"])
    assert report["new_caption_same_as_original"] == 4
    assert report["clip_score_new"] == pytest.approx(report["clip_score_original"])
    assert report["clip_score_real"]["new"] == pytest.approx(report["clip_score_real"]["original"])
    assert report["outside_error"]["max_abs"] <= 1e-5
    assert not (tmp_path / "edit" / "edit_grid.png").exists()


def test_two_ranks_split_samples_and_gather_to_the_single_process_report(tiny_chain, tmp_path, monkeypatch):
    args = ("feature_extractor=clip", "num_samples=4", "grid_size=2")
    single = evaluate_edits(edit_config(tiny_chain, tmp_path / "one", *args))
    stash: list = []
    edited: dict[int, list[int]] = {}

    def as_rank(rank):
        def gather(rows, world):
            edited[rank] = [r["index"] for r in rows]
            if rank == 1:
                stash.extend(rows)
                return rows
            return rows + stash
        monkeypatch.setattr(edit_run, "distributed", lambda device: (rank, 2, torch.device("cpu")))
        monkeypatch.setattr(edit_run, "gather", gather)
        return evaluate_edits(edit_config(tiny_chain, tmp_path / "two", *args))

    assert as_rank(1) is None and not (tmp_path / "two" / "edit" / "edit_report.json").exists()
    double = as_rank(0)
    assert edited == {0: [0, 2], 1: [1, 3]} and double["world_size"] == 2
    for key in ("fd_clip_masked", "clip_score_new", "clip_score_original"):
        assert double[key] == pytest.approx(single[key], rel=1e-5, abs=1e-6), key
    for key in ("mse", "mae", "max_abs"):
        assert double["outside_error_raw"][key] == pytest.approx(single["outside_error_raw"][key], rel=1e-5), key
    assert double["masks"]["kinds"] == single["masks"]["kinds"]
    assert Image.open(tmp_path / "two" / "edit" / "edit_grid.png").size == (2 * 34 + 2, 3 * 34 + 2)


@pytest.mark.parametrize("override, message", [
    ("new_caption=mine", "new_caption='mine' is not one of"),
    ("method=paint", "method='paint' is not one of"),
    ("crop=circle", "crop='circle' is not one of"),
    ("feature_extractor=vgg", "feature_extractor='vgg' is not one of"),
    ("num_samples=1", "num_samples must be >= 2"),
    ("jump_n_sample=0", "jump_n_sample must be >= 1"),
    ("crop_size=0", "crop_size must be a positive"),
    ("masks.weights.box=-1", "masks: mask weights must be >= 0"),
    ("prior_ckpt=null", "prior_ckpt must be set"),
])
def test_config_errors_name_the_key_before_loading(tmp_path, override, message):
    chain = {k: tmp_path / f"missing_{k}.ckpt" for k in ("clip", "prior", "decoder", "upsampler")}
    with pytest.raises(ConfigError, match=message):
        evaluate_edits(edit_config(chain, tmp_path, override))


def test_inpaint_with_a_base_decoder_and_the_wrong_config_for_the_task_are_refused(tiny_chain, tmp_path):
    with pytest.raises(ConfigError, match="method=inpaint needs an inpainting decoder"):
        evaluate_edits(edit_config(tiny_chain, tmp_path, "method=inpaint"))
    from unclip.evaluate import main

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        generate = compose(config_name="evaluate", overrides=["task=edit"])
    with pytest.raises(ConfigError, match="--config-name evaluate_edit"):
        main.__wrapped__(generate)
    with pytest.raises(ConfigError, match="--config-name evaluate "):
        main.__wrapped__(edit_config(tiny_chain, tmp_path, "task=generate"))


def test_caption_permutation_is_a_seeded_derangement_and_crops_cover_the_mask():
    for n in (2, 3, 10):
        order = caption_permutation(n, "other", seed=5)
        assert sorted(order) == list(range(n)) and all(order[i] != i for i in range(n))
        assert order == caption_permutation(n, "other", seed=5)
    assert caption_permutation(10, "other", 5) != caption_permutation(10, "other", 6)
    assert caption_permutation(4, "own", 0) == [0, 1, 2, 3]
    mask = torch.zeros(1, 16, 16)
    mask[0, 12:16, 1:3] = 1  # 4 x 2 at the bottom edge
    assert crop_box(mask, "box") == (12, 1, 4, 2)
    top, left, h, w = crop_box(mask, "square")
    assert h == w == 4 and top + h <= 16 and top <= 12 and left <= 1 and left + w >= 3
