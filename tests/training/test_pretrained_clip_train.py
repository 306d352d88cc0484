"""A pretrained open_clip CLIP as the frozen CLIP of the later stages: a folder written by open_clip's own
``save_for_hf`` is embedded by ``unclip-embed`` and trains a prior and a decoder (on the fly and from the
embeddings); the ``clip=openai_vit_l14`` preset dry-runs the paper prior and decoder and trains a step on a shrunk
ViT-L/14 (its CLIP-facing sizes, one narrow block per tower)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import compose_train
from tests.data.shard_helpers import write_clean_shards
from tests.models.open_clip_folders import shrunk_vit_l14_cfg, write_open_clip_folder
from unclip.checkpoints import read_checkpoint
from unclip.config import ConfigError
from unclip.data.embeddings import embedding_path, load_shard_embeddings
from unclip.embed import run_embed
from unclip.models.clip import load_clip
from unclip.pipeline import UnCLIPPipeline
from unclip.training.conditioning import ClipConditioner
from unclip.training.runner import train

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers", "ignore:.*LeafSpec",
                                        "ignore:.*val_dataloader")
STEPS = 2


@pytest.fixture(autouse=True)
def hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNCLIP_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return write_clean_shards(tmp_path_factory.mktemp("shards"), n_shards=2, per_shard=8, size=(40, 40))


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory) -> Path:
    """A tiny CLIP (32px, 16 tokens, 32-d) as open_clip writes it, with its own mean/std."""
    return write_open_clip_folder(tmp_path_factory.mktemp("hub") / "tiny", mean=[0.5, 0.5, 0.5], std=[0.3, 0.3, 0.3])


def short_run(tmp_path: Path, shards: list[str]) -> list[str]:
    return [f"run_dir={tmp_path / 'run'}", "logger=none", "trainer=cpu", "trainer.enable_progress_bar=false",
            f"trainer.max_steps={STEPS}", f"trainer.val_check_interval={STEPS}", "trainer.limit_val_batches=1",
            f"callbacks.checkpoint.every_n_train_steps={STEPS}", "data=webdataset", f"data.train_shards={shards[0]}",
            f"data.val_shards={shards[1]}", "data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=0"]


def small_decoder(text_width: int, context: int, embed_dim: int) -> list[str]:
    return ["model.model_channels=16", "model.num_groups=8", "model.num_res_blocks=1",
            "model.attention_resolutions=[8]", "model.channel_mult=[1,2]", "model.num_head_channels=16",
            "model.context_width=32", "model.dropout=0.0",
            f"model.clip_embed_dim={embed_dim}", f"model.text.input_width={text_width}",
            f"model.text.context_length={context}", "model.text.layers=1", "model.text.heads=2",
            "module.sampling.steps=2", "module.val_samples.num=2"]


def embed(folder: Path, shards: list[str], out_dir: Path) -> dict:
    return run_embed(str(folder), shards, str(out_dir), batch_size=4, num_workers=0, rank=None, world_size=None,
                     device="cpu", progress=False)


def test_unclip_embed_reads_an_open_clip_folder(hub_folder, shards, tmp_path):
    clip_hash = load_clip(hub_folder)[2]["clip_hash"]
    assert embed(hub_folder, shards, tmp_path / "emb")["samples"] == 16
    meta = json.loads((tmp_path / "emb" / "meta.json").read_text())
    assert (meta["clip_hash"], meta["embed_dim"], meta["context_length"], meta["image_size"]) == (clip_hash, 32, 16, 32)
    arrays = load_shard_embeddings(embedding_path(tmp_path / "emb", shards[0]))
    assert arrays["image_embed"].shape == (8, 32) and arrays["text_ids"].shape == (8, 16)  # ids, not encodings
    assert meta["clip_source"] == str(Path(hub_folder).resolve()) and meta["store_token_encodings"] is False


def test_stages_take_the_clip_sizes_and_tokenizer_from_an_open_clip_folder(hub_folder, shards, tmp_path):
    cfg = compose_train(["stage=prior", f"clip_ckpt={hub_folder}", *short_run(tmp_path, shards)])
    module = instantiate(cfg.module, _recursive_=False)
    assert {k: module.model_config[k] for k in ("embed_dim", "text_width", "context_length")} == \
        {"embed_dim": 32, "text_width": 32, "context_length": 16}
    tokens = instantiate(cfg.data.tokenizer)(["a red square", "b"])
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    cond = ClipConditioner(str(hub_folder), None, need_text_tokens=True)({"image": images, "tokens": tokens})
    assert cond["image_embed"].shape == (2, 32) and cond["text_tokens"].shape == (2, 16, 32)
    assert cond["text_mask"].sum(1).tolist() == [5, 3]


@pytest.mark.slow
def test_open_clip_folder_trains_a_prior_and_a_decoder_that_chain_in_the_pipeline(hub_folder, shards, tmp_path):
    """The issue's acceptance: an open_clip folder embeds, trains a prior (on the fly and from its embeddings) and
    a decoder for a few steps, and the three load as one pipeline that samples."""
    clip_hash = load_clip(hub_folder)[2]["clip_hash"]
    embed(hub_folder, shards, tmp_path / "emb")
    out = train(compose_train(["stage=prior", f"clip_ckpt={hub_folder}", "module.val_sampling.steps=2",
                               *short_run(tmp_path / "fly", shards)]))
    prior = read_checkpoint(out["last_checkpoint"])
    assert prior["global_step"] == STEPS and prior["unclip"]["clip_hash"] == clip_hash
    assert prior["unclip"]["embed_dim"] == 32  # taken from the folder's model_cfg

    prior_ckpt = train(compose_train(["stage=prior", f"clip_ckpt={hub_folder}", f"data.embeddings={tmp_path / 'emb'}",
                                      "data.decode_images=false", "module.val_sampling.steps=2",
                                      *short_run(tmp_path / "emb_run", shards)]))["last_checkpoint"]
    assert read_checkpoint(prior_ckpt)["unclip"]["clip_hash"] == clip_hash

    decoder_ckpt = train(compose_train(["stage=decoder", f"clip_ckpt={hub_folder}", "model.image_size=16",
                                        "data.image_size=32", *small_decoder(32, 16, 32),
                                        *short_run(tmp_path / "decoder", shards)]))["last_checkpoint"]
    decoder = read_checkpoint(decoder_ckpt)
    assert decoder["global_step"] == STEPS and decoder["unclip"]["clip_hash"] == clip_hash

    pipe = UnCLIPPipeline.from_checkpoints(clip=f"local-dir:{hub_folder}", prior=prior_ckpt, decoder=decoder_ckpt,
                                           device="cpu")
    images = pipe("a red square", prior={"steps": 2}, decoder={"steps": 2}, seed=0, output_type="pt").images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_embeddings_of_another_clip_are_refused(hub_folder, shards, tmp_path):
    other = write_open_clip_folder(tmp_path / "other", seed=1)
    embed(other, shards[:1], tmp_path / "emb")
    load_clip(hub_folder)  # its hash is now known without loading: preflight compares it
    with pytest.raises(ConfigError, match="was made with clip_hash="):
        train(compose_train(["stage=prior", f"clip_ckpt={hub_folder}", f"data.embeddings={tmp_path / 'emb'}",
                             "data.decode_images=false", *short_run(tmp_path, shards)]))


@pytest.mark.parametrize("experiment, params, sizes", [
    ("paper_prior", 1_022_456_576, {"embed_dim": 768, "text_width": 768}),
    ("paper_decoder", 3_456_532_742, {"clip_embed_dim": 768}),
])
def test_paper_presets_dry_run_with_the_openai_vit_l14_preset(experiment, params, sizes, tmp_path, capsys):
    cfg = compose_train([f"experiment={experiment}", "clip=openai_vit_l14", f"run_dir={tmp_path}", "dry_run=true",
                         "data.train_shards=unused.tar"])
    assert cfg.clip_ckpt == "hf-hub:timm/vit_large_patch14_clip_224.openai" and cfg.data.image_size == 224
    assert {k: cfg.model[k] for k in sizes} == sizes
    assert train(cfg)["params"] == params  # 768-wide inputs: 2.1M / 3.1M fewer than with the paper's 1024-d CLIP


def test_clip_preset_is_inert_without_it(tmp_path):
    cfg = compose_train(["experiment=paper_prior", f"run_dir={tmp_path}", "data.train_shards=unused.tar"])
    assert cfg.clip_ckpt is None and cfg.model.embed_dim == 1024


PAPER_CPU = ["trainer.precision=32", "data.mode=epoch", "data.decode_images=true", "data.pin_memory=false",
             "data.persistent_workers=false", "module.compile=false"]


@pytest.mark.slow
def test_paper_prior_and_decoder_train_a_step_on_a_shrunk_vit_l14(shards, tmp_path):
    folder = write_open_clip_folder(tmp_path / "l14", shrunk_vit_l14_cfg())
    prior = train(compose_train(["experiment=paper_prior", "clip=openai_vit_l14", f"clip_ckpt={folder}",
                                 "model.width=64", "model.depth=1", "model.heads=2", "module.val_sampling.steps=2",
                                 "module.val_sampling.candidates=1", *short_run(tmp_path / "prior", shards),
                                 *PAPER_CPU]))
    ckpt = read_checkpoint(prior["last_checkpoint"])
    assert ckpt["global_step"] == STEPS and ckpt["hyper_parameters"]["model"]["embed_dim"] == 768
    decoder = train(compose_train(["experiment=paper_decoder", "clip=openai_vit_l14", f"clip_ckpt={folder}",
                                   "module.grad_checkpointing=false", *small_decoder(768, 77, 768),
                                   "model.image_size=16", *short_run(tmp_path / "decoder", shards), *PAPER_CPU]))
    ckpt = read_checkpoint(decoder["last_checkpoint"])
    assert ckpt["global_step"] == STEPS and ckpt["unclip"]["clip_hash"] == load_clip(folder)[2]["clip_hash"]
    assert ckpt["unclip"]["embed_dim"] == 768
