"""What each stage adds: the prior replaced by the caption embedding, the upsampler by bicubic, on the same captions
and draws (unclip/evaluation/ablation.py), in unclip-eval's report.json and the demo's report.md."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.evaluation.conftest import chain_eval_config
from unclip.demo_report import write_report
from unclip.evaluation.ablation import ablation_report, enabled_arms, quantised, sample_arms, upsampler_psnr
from unclip.evaluation.metrics import frechet_distance_from_features, psnr
from unclip.evaluation.run import _split_accuracy, evaluate
from unclip.models.degradations import downsample, upsample
from unclip.pipeline import UnCLIPPipeline

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to", "ignore:.*LeafSpec")
CAPTIONS = ["a small red circle on a blue background", "a large green star on a white background"]
KNOBS = {"prior": {"steps": 3}, "decoder": {"steps": 3}, "upsamplers": {"steps": 2}}
OUTPUT_LAYERS = ("out.weight", "out_conv.weight")  # zero-initialised last layers of prior, decoder, upsampler


@pytest.fixture(scope="module")
def live_chain(tiny_chain, tmp_path_factory) -> dict[str, Path]:
    """The tiny chain with random (not zero) output layers, saved: every network's output depends on its inputs,
    so a decoder given another embedding draws another image."""
    out = dict(tiny_chain)
    directory = tmp_path_factory.mktemp("live_chain")
    g = torch.Generator().manual_seed(0)
    for stage in ("prior", "decoder", "upsampler"):
        checkpoint = torch.load(tiny_chain[stage], weights_only=True)
        for key, value in checkpoint["state_dict"].items():
            if key.endswith(OUTPUT_LAYERS):
                value.copy_(torch.randn(value.shape, generator=g) * 0.05)
        out[stage] = directory / f"{stage}.ckpt"
        torch.save(checkpoint, out[stage])
    return out


@pytest.fixture(scope="module")
def pipe(live_chain) -> UnCLIPPipeline:
    return UnCLIPPipeline.from_checkpoints(clip=live_chain["clip"], prior=live_chain["prior"],
                                           decoder=live_chain["decoder"], upsamplers=[live_chain["upsampler"]],
                                           device="cpu")


def test_caption_embedding_option_decodes_z_t_itself(pipe, live_chain):
    text = pipe.encode_text(CAPTIONS)
    out = pipe(CAPTIONS, seed=4, output_type="pt", embedding="caption", **KNOBS)
    torch.testing.assert_close(out.image_embeds, text["text_embed"])
    g = torch.Generator().manual_seed(4)  # no prior draws: the decoder's noise comes first
    by_hand = pipe.decode(text["text_embed"], text, g, KNOBS["decoder"], KNOBS["upsamplers"])
    torch.testing.assert_close(out.images * 2 - 1, quantised(by_hand))
    prior = pipe(CAPTIONS, seed=4, output_type="pt", **KNOBS)
    assert not torch.allclose(prior.image_embeds, out.image_embeds)
    assert (prior.images - out.images).abs().max() > 1 / 255, "the decoder's image depends on the embedding"
    no_prior = UnCLIPPipeline.from_checkpoints(clip=live_chain["clip"], decoder=live_chain["decoder"], device="cpu")
    assert no_prior(CAPTIONS, seed=4, output_type="pt", embedding="caption").images.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="embedding must be one of"):
        pipe(CAPTIONS, embedding="text")


def test_arms_share_the_chains_draws(pipe):
    arms = sample_arms(pipe, CAPTIONS, torch.Generator().manual_seed(7), KNOBS, ["caption_embedding", "bicubic"])
    alone = sample_arms(pipe, CAPTIONS, torch.Generator().manual_seed(7), KNOBS, [])
    plain = pipe(CAPTIONS, generator=torch.Generator().manual_seed(7), output_type="pt", **KNOBS).images * 2 - 1
    torch.testing.assert_close(arms.chain, plain)  # the ablation leaves the chain's own samples as they were
    torch.testing.assert_close(alone.chain, plain)
    assert alone.extra == {} and set(arms.extra) == {"caption_embedding", "bicubic"}

    g = torch.Generator().manual_seed(7)  # the same draws by hand: prior, then the decoder's base samples
    text = pipe.encode_text(CAPTIONS)
    z = pipe.prior_embeddings(text, g, KNOBS["prior"])
    state = g.get_state()
    base = pipe.decode_base(z, text, g, KNOBS["decoder"])  # [2, 3, 16, 16]
    torch.testing.assert_close(arms.extra["bicubic"], quantised(upsample(base, 32)))  # the SAME low-res samples
    torch.testing.assert_close(arms.chain, quantised(pipe.upsample(base, g, KNOBS["upsamplers"])))
    g2 = torch.Generator()
    g2.set_state(state)  # the caption arm's decoder starts from the chain's decoder noise, with z_t for z_i
    caption = pipe.decode(text["text_embed"], text, g2, KNOBS["decoder"], KNOBS["upsamplers"])
    torch.testing.assert_close(arms.extra["caption_embedding"], quantised(caption))
    assert (arms.extra["caption_embedding"] - arms.chain).abs().max() > 1 / 255


def test_upsampler_psnr_restores_the_real_images_from_their_downsample_both_ways(pipe):
    g = torch.Generator().manual_seed(1)
    real = quantised(torch.rand(3, 3, 32, 32, generator=g) * 2 - 1)
    got = upsampler_psnr(pipe, real, torch.Generator().manual_seed(5), KNOBS["upsamplers"], batch_size=2)
    low = downsample(real, 16)
    bicubic = float(psnr(quantised(upsample(low, 32)), real).mean())
    g = torch.Generator().manual_seed(5)  # in the same batches of 2, from one generator
    restored = torch.cat([pipe.upsample(low[:2], g, KNOBS["upsamplers"]),
                          pipe.upsample(low[2:], g, KNOBS["upsamplers"])])
    ours = float(psnr(quantised(restored), real).mean())
    assert got["n"] == 3 and got["bicubic"] == pytest.approx(bicubic) and got["upsampler"] == pytest.approx(ours)
    assert got["margin"] == pytest.approx(ours - bicubic) and got["upsampler"] != got["bicubic"]


def test_enabled_arms_need_an_upsampler_for_bicubic_and_refuse_unknown_keys():
    assert enabled_arms({"caption_embedding": True, "bicubic": True, "psnr_samples": 4}, 1) == [
        "caption_embedding", "bicubic"]
    assert enabled_arms({"caption_embedding": False, "bicubic": True}, 0) == []
    with pytest.raises(ValueError, match="unknown ablation key.*'prior'"):
        enabled_arms({"prior": True}, 1)


def _rows(features: torch.Tensor, shape_right: list[bool]) -> list[dict]:
    return [{"index": i, "clip": f, "inception": None,
             "check": {"shape": ok, "color": True, "all": ok, "held_out": i % 2 == 1}}
            for i, (f, ok) in enumerate(zip(features, shape_right, strict=True))]


def test_margins_are_the_baseline_minus_the_stage_for_fd_and_the_stage_minus_baseline_for_accuracy():
    g = torch.Generator().manual_seed(0)
    real, near, far = (torch.randn(16, 4, generator=g) + shift for shift in (0.0, 0.1, 2.0))
    out = ablation_report({"chain": _rows(near, [True] * 12 + [False] * 4),
                           "caption_embedding": _rows(far, [True] * 4 + [False] * 12)}, real, None, _split_accuracy)
    entry = out["prior_vs_caption_embedding"]
    assert "upsampler_vs_bicubic" not in out, "no bicubic arm sampled: no row"
    assert entry["stage"]["fd_clip"] == pytest.approx(frechet_distance_from_features(real, near))
    assert entry["baseline"]["fd_clip"] == pytest.approx(frechet_distance_from_features(real, far))
    assert entry["margin"]["fd_clip"] == pytest.approx(entry["baseline"]["fd_clip"] - entry["stage"]["fd_clip"])
    assert entry["margin"]["fd_clip"] > 0 and entry["margin"]["fid"] is None
    assert entry["stage"]["caption_accuracy"]["all"]["shape"] == 0.75
    assert entry["margin"]["caption_accuracy_shape"] == pytest.approx(0.75 - 0.25)
    assert entry["margin"]["caption_accuracy_all"] == pytest.approx(0.5)


def test_eval_report_and_demo_page_carry_the_ablation_rows(live_chain, inception_weights, tmp_path):
    cfg = chain_eval_config("evaluate", live_chain, tmp_path / "eval", f"cache_dir={tmp_path / 'cache'}",
                            "num_samples=8", "batch_size=4", "prior.steps=3", "decoder.steps=3", "upsamplers.steps=2",
                            "kid.subsets=5", "grid_size=4", "ablation.caption_embedding=true",
                            f"inception_weights={inception_weights}", "feature_extractor=inception")
    report = evaluate(cfg)
    on_disk = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert set(on_disk["ablation"]) == {"prior_vs_caption_embedding", "upsampler_vs_bicubic"}
    for key, entry in on_disk["ablation"].items():
        stage, baseline = entry["stage"], entry["baseline"]
        # the stage's arm is the chain's own samples, scored exactly as the report's headline numbers
        assert stage["fd_clip"] == pytest.approx(report["fd_clip"]) and stage["fid"] == pytest.approx(report["fid"])
        assert stage["n"] == baseline["n"] == 8
        assert baseline["fd_clip"] != stage["fd_clip"], f"{key}: the baseline's samples differ"
        assert entry["margin"]["fid"] == baseline["fid"] - stage["fid"]  # exactly: a sign error cannot hide
        assert baseline["caption_accuracy"]["seen"]["n"] + baseline["caption_accuracy"]["held_out"]["n"] == 8
        assert math.isfinite(entry["margin"]["caption_accuracy_all"])

    restored = on_disk["ablation"]["upsampler_vs_bicubic"]["psnr_real"]
    assert "psnr_real" not in on_disk["ablation"]["prior_vs_caption_embedding"]
    assert restored["n"] == 8 and restored["margin"] == pytest.approx(restored["upsampler"] - restored["bicubic"])
    assert 5 < restored["bicubic"] < 60, "bicubic restores real demo images to a plausible PSNR"

    stages = {"prior": {"status": "trained", "metrics": {"val/cos_pred": 0.95, "val/cos_text": 0.93}},
              "upsampler": {"status": "trained", "metrics": {"val/psnr": 31.0, "val/psnr_bicubic": 30.5}}}
    page = write_report(tmp_path, {"seconds": 1.0, "stages": stages}, report).read_text()
    assert "### What each stage adds" in page
    assert "| prior vs caption embedding | cos to the true z_i | 0.95 | 0.93 | +0.02 |" in page
    assert "| upsampler vs bicubic | val PSNR (dB) on real low-res images | 31 | 30.5 | +0.5 |" in page
    prior = on_disk["ablation"]["prior_vs_caption_embedding"]
    s, b, margin = prior["stage"]["fd_clip"], prior["baseline"]["fd_clip"], prior["margin"]["fd_clip"]
    row = (f"| prior (z_i sampled from the caption) vs caption embedding z_t decoded directly | FD-CLIP ↓ | "
           f"{s:.4g} | {b:.4g} | {margin:+.4g} |")
    assert row in page
    assert page.count("| upsampler (on the chain's base samples) vs bicubic (the same base samples) |") == 5
    assert f"| PSNR (dB) ↑ on 8 real val images | {restored['upsampler']:.4g} | {restored['bicubic']:.4g} |" in page
