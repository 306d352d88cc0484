"""PriorModule built from the real composed configs: optimiser, EMA, checkpoint metadata, CLIP checks."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from tests.conftest import compose_train, make_tiny_clip_export
from unclip.config import ConfigError
from unclip.data.embeddings import write_meta
from unclip.models.clip_embedder import FrozenCLIP
from unclip.models.prior_sampling import load_prior
from unclip.stages import ClipInfo, PriorInfo
from unclip.training.prior_module import PriorModule
from unclip.training.runner import dry_run

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to", "ignore:.*does not have many workers")
MICRO = ["model.width=32", "model.depth=2", "model.heads=2", "module.val_sampling.steps=3"]


def micro_module(clip: str | None, *overrides: str) -> PriorModule:
    cfg = compose_train(["experiment=emoji_prior_tiny", "run_dir=null", f"clip_ckpt={clip or 'null'}", *MICRO,
                         *overrides])
    torch.manual_seed(0)
    try:
        return instantiate(cfg.module, _recursive_=False)
    except InstantiationException as exc:  # the module's own error, not Hydra's wrapper
        raise exc.__cause__ from None


def synthetic_batches(clip_dir, n: int, b: int = 6) -> list[dict]:
    tokenizer = FrozenCLIP.from_path(clip_dir).tokenizer
    g = torch.Generator().manual_seed(0)
    captions = ["a red circle", "a green square on a blue background", "smiling face", "a cat", "x", "two dogs"]
    return [{"image": torch.rand(b, 3, 64, 64, generator=g) * 2 - 1, "tokens": tokenizer(captions[:b]),
             "caption": captions[:b]} for _ in range(n)]


def fit(module: PriorModule, batches: list[dict], steps: int, tmp_path) -> pl.Trainer:
    loader = DataLoader(batches, batch_size=None)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, val_check_interval=steps,
                         limit_val_batches=1, num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=DataLoader(batches[:1], batch_size=None))
    return trainer


def test_optimiser_follows_table_3_and_keeps_decay_off_embeddings(tiny_clip_export):
    module = micro_module(tiny_clip_export, "module.optimizer.lr=1.1e-4")
    optimizer = module.configure_optimizers()["optimizer"]
    decayed, undecayed = optimizer.param_groups
    assert optimizer.defaults["betas"] == (0.9, 0.96) and optimizer.defaults["eps"] == 1e-6
    assert decayed["weight_decay"] == 6e-2 and undecayed["weight_decay"] == 0.0
    for name in ("pos_embed", "query", "null_text_token", "null_text_embed", "blocks.0.ln_1.weight", "out.bias"):
        assert name in undecayed["names"], name
    assert "blocks.0.qkv.weight" in decayed["names"] and "text_proj.weight" in decayed["names"]
    assert module.net.embed_scale == 17.2 and module.process.mean_type.value == "x0"
    assert module.model_config["embed_dim"] == 128 and module.model_config["context_length"] == 32


def test_training_updates_ema_and_the_checkpoint_describes_the_prior(tiny_clip_export, tmp_path):
    module = micro_module(tiny_clip_export, "module.ema.decay=0.5", "module.ema.warmup=false")
    trainer = fit(module, synthetic_batches(tiny_clip_export, 3), steps=3, tmp_path=tmp_path)
    assert int(module.ema.n_averaged) == 3
    ema_w, w = module.ema.module.out.weight, module.net.out.weight
    assert not torch.equal(ema_w, w) and ema_w.abs().sum() > 0
    metrics = trainer.callback_metrics
    assert {"val/cos_pred", "val/cos_text", "val/cos_shuffled", "val/mse_ema"} <= metrics.keys()
    assert metrics["val/num_samples"] == 6 and -1 <= metrics["val/cos_pred"] <= 1

    path = tmp_path / "prior.ckpt"
    trainer.save_checkpoint(path)
    model, info = load_prior(path)
    clip = FrozenCLIP.from_path(tiny_clip_export)
    assert info.stage == "prior" and info.clip == ClipInfo.of(clip) and info.embed_dim == 128
    assert info.embed_scale == 17.2 and info.model["text_width"] == 128 and info.model["context_length"] == 32
    assert info.model["width"] == 32 and info.diffusion["mean_type"] == "x0" and info.sampling["steps"] == 64
    for (name, loaded), ema in zip(model.state_dict().items(), module.ema.module.state_dict().values(), strict=True):
        assert torch.equal(loaded, ema), name
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_resume_restores_the_ema(tiny_clip_export, tmp_path):
    module = micro_module(tiny_clip_export)
    trainer = fit(module, synthetic_batches(tiny_clip_export, 2), steps=2, tmp_path=tmp_path)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    resumed = micro_module(tiny_clip_export)
    loader = DataLoader(synthetic_batches(tiny_clip_export, 1), batch_size=None)
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(resumed, train_dataloaders=loader, ckpt_path=tmp_path / "a.ckpt")
    assert int(resumed.ema.n_averaged) == 3


def test_clip_sizes_that_disagree_are_refused_naming_both(tiny_clip_export, tmp_path):
    with pytest.raises(ConfigError, match="model.embed_dim=64 must be equal to the embed_dim=128 of clip_ckpt="):
        micro_module(tiny_clip_export, "model.embed_dim=64")
    with pytest.raises(ConfigError, match="model.context_length=16 must be at least the context_length=32 of clip"):
        micro_module(tiny_clip_export, "model.context_length=16")
    with pytest.raises(ConfigError, match="model.embed_dim is null and there is no CLIP"):
        micro_module(None, "model.embed_dim=null")
    module = micro_module(None)  # no CLIP at all: the preset's sizes build the network (dry runs)...
    with pytest.raises(ConfigError, match="set clip_ckpt .* or data.embeddings"):  # ...is refused before fitting
        module.setup("fit")
    # Precomputed embeddings from another CLIP than clip_ckpt: both hashes named.
    other = make_tiny_clip_export(tmp_path / "other", seed=1)
    theirs = FrozenCLIP.from_path(other)
    write_meta(tmp_path / "emb", {"clip_hash": theirs.clip_hash, "embed_dim": 128, "text_width": 128,
                                  "context_length": 32})
    module = micro_module(tiny_clip_export, f"data.embeddings={tmp_path / 'emb'}")
    with pytest.raises(ConfigError, match=f"made with clip_hash={theirs.clip_hash} but clip_ckpt=.* has clip_hash="):
        module.setup("fit")


def test_paper_preset_is_the_1b_prior_of_table_3(tmp_path):
    cfg = compose_train(["experiment=paper_prior", f"run_dir={tmp_path}", "dry_run=true", "data=emoji"])
    report = dry_run(cfg)
    assert abs(report["params"] / 1e9 - 1.0) < 0.1, report
    assert cfg.model.width == 2048 and cfg.model.depth == 24 and cfg.model.context_length == 256
    opt = cfg.module.optimizer
    assert (opt.lr, list(opt.betas), opt.eps, opt.weight_decay) == (1.1e-4, [0.9, 0.96], 1e-6, 6e-2)
    assert cfg.module.ema.decay == 0.9999 and cfg.module.diffusion.mean_type == "x0"
    assert cfg.module.diffusion.noise_schedule == "cosine" and cfg.module.diffusion.steps == 1000


def test_the_checkpoint_carries_the_configured_sampling_defaults(tiny_clip_export):
    module = micro_module(tiny_clip_export, "module.sampling.steps=12", "module.sampling.candidates=3")
    meta = module.checkpoint_metadata()
    assert meta["sampling"]["steps"] == 12 and meta["sampling"]["candidates"] == 3
    assert PriorInfo.from_meta({**meta, "stage": "prior"}).sampling == module.stage_info().sampling
