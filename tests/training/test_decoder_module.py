"""Stage ``decoder`` built from the real configs: guidance drops, size checks before compute, a short run through
the runner (per-quartile losses, sample grid, self-describing checkpoint), loading, and Table 3 dry-run counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from tests.conftest import compose_train
from unclip.config import ConfigError
from unclip.decoder_sampling import load_decoder, load_upsampler, sample_decoder
from unclip.models.unet import DecoderUNet
from unclip.training.conditioning import ClipConditioner
from unclip.training.runner import train

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to", "ignore:.*LeafSpec")
# The tiny decoder shrunk through ordinary overrides; it keeps the tiny CLIP's sizes (embed 128, width 128, ctx 32).
MICRO = ["model.image_size=16", "model.model_channels=16", "model.channel_mult=[1,2]", "model.num_res_blocks=1",
         "model.attention_resolutions=[8]", "model.num_head_channels=8", "model.num_groups=8",
         "model.context_width=32", "model.text.heads=2"]
SHORT = ["trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "data.batch_size=4",
         "data.num_workers=0", "callbacks.checkpoint.every_n_train_steps=3", "trainer.enable_progress_bar=false",
         "logger=csv", "module.val_samples.num=3", "module.sampling.sampler=dpmpp_2m", "module.sampling.steps=4"]


def micro_module(clip: Path, *overrides: str):
    cfg = compose_train(["stage=decoder", "data=emoji", "run_dir=null", f"clip_ckpt={clip}", *MICRO, *overrides])
    OmegaConf.resolve(cfg)
    torch.manual_seed(0)
    return instantiate(cfg.module, _recursive_=False)


def fake_checkpoint(path: Path, stage: str, **meta) -> Path:
    torch.save({"unclip": {"stage": stage, **meta}, "state_dict": {}}, path)
    return path


def test_training_drops_follow_the_configured_rates_and_reach_the_network(tiny_clip_export):
    module = micro_module(tiny_clip_export, "model.image_drop_prob=0.1", "model.text_drop_prob=0.5")
    module.cond = ClipConditioner(str(tiny_clip_export), None, need_text_tokens=True)
    n = 4000
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(n, 3, 16, 16) * 2 - 1, "text_embed": torch.randn(n, 128),
             "image_embed": torch.randn(n, 128, generator=g), "text_tokens": torch.randn(1, 32, 128).expand(n, 32, 128),
             "text_mask": torch.ones(n, 32, dtype=torch.bool)}
    seen: dict = {}
    module.net.forward = lambda x, t, **kw: seen.update(kw) or torch.zeros(x.shape[0], 6, *x.shape[2:])
    torch.manual_seed(1)
    module.training_step(batch, 0)
    image, text = seen["image_drop"].float(), seen["text_drop"].float()
    assert abs(image.mean() - 0.1) < 0.02 and abs(text.mean() - 0.5) < 0.03
    assert abs((image * text).mean() - 0.05) < 0.015, "the drops are independent"
    # Validation conditions on everything.
    _, kwargs = module.validation_inputs(batch, g)
    assert "image_drop" not in kwargs and "text_drop" not in kwargs


def test_wrong_embedding_size_fails_before_compute_naming_both_sizes(tiny_clip_export, emoji_root, tmp_path):
    cfg = compose_train(["stage=decoder", "data=emoji", f"run_dir={tmp_path}", f"clip_ckpt={tiny_clip_export}",
                         *MICRO, *SHORT, "model.clip_embed_dim=64"])
    with pytest.raises(ConfigError, match=r"model.clip_embed_dim=64 must be equal to the embed_dim=128 of clip_ckpt="):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()
    cfg = compose_train(["stage=decoder", "data=emoji", f"run_dir={tmp_path}", f"clip_ckpt={tiny_clip_export}",
                         *MICRO, *SHORT, "model.text.input_width=96"])
    with pytest.raises(ConfigError, match=r"model.text.input_width=96 must be equal to the text_width=128 of clip"):
        train(cfg)


def test_decoder_trains_samples_and_checkpoints_through_the_runner(tiny_clip_export, emoji_root, tmp_path):
    cfg = compose_train(["stage=decoder", "data=emoji", f"run_dir={tmp_path}", f"clip_ckpt={tiny_clip_export}",
                         "data.image_size=64", *MICRO, *SHORT])
    out = train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["global_step"] == 3 and metrics["val/num_samples"] == 4
    assert {"val/loss", "val/mse", "val/vlb"} <= metrics.keys()
    assert any(k.startswith("val/mse_q") for k in metrics)
    grid = tmp_path / "samples" / "step00000003.png"
    assert grid.is_file() and Image.open(grid).size == (3 * 17 + 1, 2 * 17 + 1)  # 3 columns, targets + samples
    assert len((tmp_path / "samples" / "step00000003.txt").read_text().splitlines()) == 3

    net, meta = load_decoder(out["last_checkpoint"])
    assert isinstance(net, DecoderUNet) and not net.training
    assert meta.stage == "decoder" and meta.embed_dim == 128 and meta.image_size == 16
    assert len(meta.clip.clip_hash) == 64 and meta.model["model_channels"] == 16
    assert meta.diffusion["var_type"] == "learned_range" and meta.sampling["steps"] == 4
    state = torch.load(out["last_checkpoint"], weights_only=True)["state_dict"]
    torch.testing.assert_close(net.out_conv.weight, state["ema.module.out_conv.weight"])
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(2, 128, generator=g), dim=-1)
    images = sample_decoder(net, meta, z, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1
    again = sample_decoder(net, meta, z, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(images, again)


def test_load_decoder_refuses_other_stages(tmp_path):
    for stage in ("prior", "clip", "upsampler"):
        path = fake_checkpoint(tmp_path / f"{stage}.ckpt", stage)
        with pytest.raises(ValueError, match=rf"is a '{stage}' stage checkpoint; a 'decoder' checkpoint is needed"):
            load_decoder(path)
    with pytest.raises(ValueError, match="is a 'decoder' stage checkpoint; a 'upsampler' checkpoint"):
        load_upsampler(fake_checkpoint(tmp_path / "decoder.ckpt", "decoder"))
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="not an unclip checkpoint"):
        load_decoder(tmp_path / "plain.ckpt")


@pytest.mark.parametrize("stage, experiment, table3", [
    ("decoder", "paper_decoder", 3.5e9),
    ("upsampler", "paper_upsampler_256", 700e6),
    ("upsampler", "paper_upsampler_1024", 300e6),
])
def test_paper_presets_dry_run_within_ten_percent_of_table3(stage, experiment, table3, tmp_path, capsys):
    cfg = compose_train([f"stage={stage}", f"experiment={experiment}", f"run_dir={tmp_path}", "dry_run=true",
                         "data=emoji"])
    report = train(cfg)
    assert abs(report["params"] / table3 - 1) < 0.10, report
    assert report["params"] == report["trainable_params"], "the EMA copy is made in setup(), not counted"


@pytest.mark.parametrize("group, name, millions", [("decoder", "tiny", 8.7), ("decoder", "small", 24.3),
                                                   ("upsampler", "tiny", 3.5)])
def test_small_presets_dry_run_at_their_documented_sizes(group, name, millions, tmp_path, capsys):
    cfg = compose_train([f"stage={group}", f"model/{group}={name}", f"run_dir={tmp_path}", "dry_run=true",
                         "data=emoji"])
    assert abs(train(cfg)["params"] / 1e6 - millions) < 0.1
