"""unclip-eval --config-name evaluate_score: a folder of images from any model against a real folder, shards or
saved reference statistics (ours, or pytorch-fid's mu/sigma-only .npz)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import CONF_DIR


def _folder(path, n: int, seed: int, shift: int = 0):
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    for i in range(n):
        pixels = np.clip(rng.normal(128 + shift, 50, size=(40, 48, 3)), 0, 255).astype(np.uint8)  # not square
        Image.fromarray(pixels).save(path / f"{i:04d}.png")
    (path / "notes.txt").write_text("not an image")
    return path


def _cfg(*overrides: str):
    from hydra import compose, initialize_config_dir

    from unclip.config import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="evaluate_score", overrides=["device=cpu", "image_size=32", "kid.subsets=4",
                                                                 "batch_size=5", *overrides])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    return {"real": _folder(root / "real", 12, 0), "fake": _folder(root / "fake", 10, 1, shift=40), "root": root}


def test_reference_statistics_round_trip_and_score_a_folder(folders, tiny_clip_export, tmp_path):
    from unclip.evaluation.reference import load_reference
    from unclip.evaluation.score import score

    # the tiny CLIP's image features (fast on a CPU); Inception takes the same path (test_inception_scores_a_folder)
    weights = f"clip_scorer={tiny_clip_export}"
    extra = "feature_extractor=clip"
    stats = tmp_path / "ref.npz"
    only_ref = score(_cfg(weights, extra, f"real={folders['real']}", "fake=null", f"save_reference={stats}",
                          f"out_dir={tmp_path / 'ref'}"))
    assert "fid" not in only_ref and only_ref["reference"]["num_samples"] == 12
    with np.load(stats, allow_pickle=False) as f:  # what pytorch-fid reads: mu [2048], sigma [2048, 2048]
        d = f["mu"].shape[0]
        assert f["sigma"].shape == (d, d) and f["features"].shape == (12, d) and f["mu"].dtype == np.float64
    ref = load_reference(stats)
    assert ref.fingerprint == only_ref["reference"]["fingerprint"] and "clip image embedding" in ref.meta["extractor"]

    direct = score(_cfg(weights, extra, f"real={folders['real']}", f"fake={folders['fake']}",
                        f"out_dir={tmp_path / 'a'}"))
    saved = score(_cfg(weights, extra, f"real={stats}", f"fake={folders['fake']}", f"out_dir={tmp_path / 'b'}"))
    on_disk = json.loads((tmp_path / "b" / "report.json").read_text())
    for key in ("fid", "kid_mean", "kid_std", "precision", "recall"):
        assert saved[key] == pytest.approx(direct[key], rel=1e-6, abs=1e-9), key
        assert on_disk[key] == pytest.approx(saved[key])
    assert saved["fid"] > 0 and saved["num_samples"] == 10 and saved["kid_subset_size"] == 5
    assert on_disk["reference"]["fingerprint"] == ref.fingerprint and on_disk["reference"]["path"] == str(stats)
    assert "VGG-16" in on_disk["precision_recall_note"] and "2.5" in on_disk["clip_score_formula"]
    assert on_disk["precision_recall_features"] == on_disk["feature_extractor"]
    assert on_disk["image_size"] == 32 and "bicubic" in on_disk["resize"]["to_image_size"]

    # a pytorch-fid file (mu and sigma only): the same FID, and KID / precision-recall null with a reason
    plain = tmp_path / "pytorch_fid.npz"
    np.savez(plain, mu=ref.mu, sigma=ref.sigma)
    fid_only = score(_cfg(weights, extra, f"real={plain}", f"fake={folders['fake']}", f"out_dir={tmp_path / 'c'}"))
    assert fid_only["fid"] == pytest.approx(saved["fid"], rel=1e-9)
    assert fid_only["kid_mean"] is None and fid_only["precision"] is None
    assert "mu/sigma only" in fid_only["metrics_note"]


def test_inception_scores_a_folder_and_bad_inputs_are_named(folders, inception_weights, tmp_path):
    from unclip.evaluation.reference import Reference, load_reference, save_reference
    from unclip.evaluation.score import score

    weights = f"inception_weights={inception_weights}"
    report = score(_cfg(weights, f"real={folders['real']}", f"fake={folders['fake']}", "num_samples=6", "num_real=8",
                        f"save_reference={tmp_path / 'inception.npz'}", f"out_dir={tmp_path}"))
    assert report["fid"] > 0 and report["num_samples"] == 6 and "pt_inception" in report["feature_extractor"]
    with np.load(tmp_path / "inception.npz", allow_pickle=False) as f:  # pytorch-fid's keys and shapes
        assert f["mu"].shape == (2048,) and f["sigma"].shape == (2048, 2048) and f["features"].shape == (8, 2048)
    with pytest.raises(ValueError, match="holds only 10 readable images"):
        score(_cfg(weights, f"real={folders['real']}", f"fake={folders['fake']}", "num_samples=11",
                   f"out_dir={tmp_path}"))
    other = save_reference(tmp_path / "clip.npz", Reference(np.zeros(4), np.eye(4), meta={"extractor": "clip x"}))
    with pytest.raises(ValueError, match="computed with 'clip x'"):
        load_reference(other, "inception")
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match=r"lack \['mu', 'sigma'\]"):
        load_reference(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        score(_cfg(weights, f"real={folders['real']}", f"fake={tmp_path / 'nowhere'}", f"out_dir={tmp_path}"))
