"""Config validation before any compute: each mistake fails in ``train`` with a ConfigError naming the key, before
the run folder is even created."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from tests.conftest import compose_train
from tests.golden.formats import format_0_meta, metadata_checkpoint
from unclip.config import ConfigError
from unclip.data.embeddings import META_FILE
from unclip.training.preflight import preflight
from unclip.training.runner import train


def refused(tmp_path, overrides: list[str], match: str) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=match):
        train(compose_train([*overrides, f"run_dir={run_dir}", "logger=none"]))
    assert not run_dir.exists(), "nothing is written before the checks pass"


@pytest.mark.parametrize("override, match", [
    ("model.embed_dim=64", r"model.embed_dim=64 must be equal to the embed_dim=128 of clip_ckpt=.*clip_export"),
    ("model.text_width=96", r"model.text_width=96 must be equal to the text_width=128 of clip_ckpt="),
    ("model.context_length=16", r"model.context_length=16 must be at least the context_length=32 of clip_ckpt="),
])
def test_prior_sizes_must_match_the_clip(override, match, tiny_clip_export, emoji_root, tmp_path):
    refused(tmp_path, ["experiment=emoji_prior_tiny", f"clip_ckpt={tiny_clip_export}", override], match)


@pytest.mark.parametrize("override, match", [
    ("model.clip_embed_dim=64", r"model.clip_embed_dim=64 must be equal to the embed_dim=128 of clip_ckpt="),
    ("model.text.input_width=64", r"model.text.input_width=64 must be equal to the text_width=128 of clip_ckpt="),
    ("model.text.context_length=77", r"model.text.context_length=77 must be equal to the context_length=32 of clip"),
])
def test_decoder_sizes_must_match_the_clip(override, match, tiny_clip_export, emoji_root, tmp_path):
    refused(tmp_path, ["experiment=emoji_decoder_tiny", f"clip_ckpt={tiny_clip_export}", override], match)


def test_precomputed_embeddings_must_come_from_the_same_clip(tiny_clip_export, emoji_root, tmp_path):
    emb = tmp_path / "emb"
    emb.mkdir()
    (emb / META_FILE).write_text(json.dumps({"embed_dim": 64, "text_width": 128, "context_length": 32,
                                             "clip_hash": "another"}))
    refused(tmp_path, ["experiment=emoji_prior_tiny", f"clip_ckpt={tiny_clip_export}", f"data.embeddings={emb}"],
            r"data.embeddings=.*emb was made with embed_dim=64 but clip_ckpt=.* has embed_dim=128")
    refused(tmp_path, ["experiment=emoji_prior_tiny", f"data.embeddings={emb}", "model.embed_dim=128"],
            r"model.embed_dim=128 must be equal to the embed_dim=64 of data.embeddings=")


def test_upsampler_input_must_be_the_previous_stage_output(emoji_root, tmp_path):
    decoder, first = tmp_path / "decoder.ckpt", tmp_path / "up.ckpt"
    metadata_checkpoint(decoder, format_0_meta("decoder", image_size=32))
    metadata_checkpoint(first, format_0_meta("upsampler", image_size=128))
    base = ["experiment=emoji_upsampler_tiny", f"decoder_ckpt={decoder}"]
    refused(tmp_path, [*base, "module.input_size=16"],
            r"module.input_size=16 must be equal to the output size=32 of decoder_ckpt=.*decoder.ckpt")
    refused(tmp_path, [*base, f"upsampler_ckpts=[{first}]", "module.input_size=32"],
            r"module.input_size=32 must be equal to the output size=128 of upsampler_ckpts\[0\]=.*up.ckpt")
    refused(tmp_path, ["experiment=emoji_upsampler_tiny", f"decoder_ckpt={first}"],
            r"decoder_ckpt=.*up.ckpt: .* is a 'upsampler' stage checkpoint; a 'decoder' checkpoint is needed")


@pytest.mark.parametrize("key, spec, match", [
    ("data.train_shards", "'{tmp}/missing/{{00000..00003}}.tar'", r"data.train_shards: 4 shard\(s\) not found"),
    ("data.train_shards", "'{tmp}/*.tar'", r"data.train_shards: 1 shard\(s\) not found: .*\*.tar"),
    ("data.val_shards", "{tmp}/val.tar", r"data.val_shards: 1 shard\(s\) not found"),
])
def test_shard_specs_that_match_no_files(key, spec, match, emoji_root, tmp_path):
    refused(tmp_path, ["experiment=emoji_clip_tiny", f"{key}={spec.format(tmp=tmp_path)}"], match)


@pytest.mark.parametrize("overrides, match", [
    (["experiment=emoji_prior_tiny", "data.hard_negatives=2"], r"data.hard_negatives=2 is used by stage=clip only"),
    (["experiment=emoji_clip_tiny", "data.hard_negatives=2", "module.loss=siglip", "model.init_logit_bias=-10"],
     r"data.hard_negatives > 0 works with module.loss=clip only"),
])
def test_hard_negatives_only_where_a_loss_uses_them(overrides, match, emoji_root, tmp_path):
    refused(tmp_path, overrides, match)


def test_global_batch_must_divide_across_devices(emoji_root, tmp_path):
    refused(tmp_path, ["experiment=emoji_clip_tiny", "trainer=ddp_cpu", "trainer.accumulate_grad_batches=3",
                       "global_batch_size=32"],
            r"global_batch_size=32 does not divide across trainer.devices=2 x trainer.num_nodes=1 x "
            r"trainer.accumulate_grad_batches=3 = 6")
    cfg = compose_train(["experiment=emoji_clip_tiny", "trainer=ddp_cpu", "trainer.accumulate_grad_batches=3",
                         "global_batch_size=30", "+trainer.num_nodes=2"])
    OmegaConf.resolve(cfg)
    refused_cfg = cfg.copy()
    with pytest.raises(ConfigError, match=r"global_batch_size=30 does not divide .* = 12"):
        preflight(refused_cfg)
    cfg.trainer.num_nodes = 1
    preflight(cfg)
    assert cfg.data.batch_size == 5  # 30 = 5 per rank x 2 devices x 3 accumulated batches


@pytest.mark.parametrize("override, match", [
    ("+callbacks.nonfinite_guard.max_nonfinite=3",
     r"unknown key 'callbacks.nonfinite_guard.max_nonfinite' for .*NonFiniteGuard; valid keys: max_nonfinite_steps"),
    ("+module.ema.deacy=0.5", r"unknown key 'module.ema.deacy' for unclip.training.ema.make_ema; valid keys: decay"),
    ("+module.scheduler.warmup=5",
     r"unknown key 'module.scheduler.warmup' for .*warmup_cosine; valid keys: .*warmup_steps"),
    ("+data.bacth_size=4", r"unknown key 'data.bacth_size' for .*ShardDataModule"),
])
def test_unknown_keys_are_named(override, match, emoji_root, tmp_path):
    refused(tmp_path, ["experiment=emoji_prior_tiny", override], match)
