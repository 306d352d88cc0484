"""CLIPModule built from the real composed configs: parameter groups, logit-scale clamp, presets."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from unclip.config import ConfigError, register_resolvers
from unclip.models.hard_negative_loss import hard_negative_accuracy
from unclip.training.clip_module import CLIPModule
from unclip.training.runner import dry_run

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to")
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
# The tiny preset shrunk further through ordinary command-line overrides.
MICRO = ["model.embed_dim=16", "model.vision.image_size=16", "model.vision.width=32", "model.vision.layers=1",
         "model.vision.head_width=16", "model.text.context_length=8", "model.text.width=32",
         "model.text.heads=2", "model.text.layers=1"]


def compose_train(overrides: list[str]) -> DictConfig:
    register_resolvers()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    OmegaConf.resolve(cfg)
    return cfg


def micro_module(*overrides: str) -> CLIPModule:
    cfg = compose_train(["experiment=emoji_clip_tiny", "run_dir=null", *MICRO, *overrides])
    torch.manual_seed(0)
    try:
        return instantiate(cfg.module, _recursive_=False)
    except InstantiationException as exc:  # the module's own error, not Hydra's wrapper
        raise exc.__cause__ from None


def synthetic_batch(batch: int = 4, size: int = 16, ctx: int = 8) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(batch, 3, size, size, generator=g) * 2 - 1,
            "tokens": torch.randint(1, 49407, (batch, ctx), generator=g), "caption": [""] * batch}


def fit_steps(module: CLIPModule, steps: int) -> None:
    loader = DataLoader([synthetic_batch() for _ in range(steps)], batch_size=None)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=loader)


def test_no_weight_decay_on_gains_biases_logit_scale_and_embeddings():
    module = micro_module("module.optimizer.weight_decay=0.25")
    optimizer = module.configure_optimizers()["optimizer"]
    decay = {n: g["weight_decay"] for g in optimizer.param_groups for n in g["names"]}
    params = dict(module.model.named_parameters())
    assert sorted(decay) == sorted(params), "every parameter in exactly one group"
    for name, param in params.items():
        expected = 0.0 if param.ndim < 2 or name.endswith(("positional_embedding", "class_embedding")) else 0.25
        assert decay[name] == expected, name
    assert decay["logit_scale"] == 0.0 and decay["visual.ln_pre.weight"] == 0.0 and decay["ln_final.bias"] == 0.0
    assert decay["visual.conv1.weight"] == 0.25 and decay["text_projection"] == 0.25
    assert decay["token_embedding.weight"] == 0.25  # open_clip decays the token table, as we do


def test_logit_scale_is_clamped_after_a_step():
    start = math.log(1000.0)  # above the cap: a small step cannot bring it back under on its own
    module = micro_module(f"model.init_logit_scale={start}", "module.optimizer.lr=1e-3")
    reference = micro_module(f"model.init_logit_scale={start}", "module.optimizer.lr=1e-3")
    opt = reference.configure_optimizers()["optimizer"]
    reference.training_step(synthetic_batch(), 0).backward()
    opt.step()
    assert reference.model.logit_scale.item() > math.log(100) + 1, "the unclamped step stays over the cap"
    fit_steps(module, 1)
    assert module.model.logit_scale.item() == pytest.approx(math.log(100), abs=1e-6)


def test_logit_scale_cap_comes_from_the_config():
    module = micro_module(f"model.init_logit_scale={math.log(1000.0)}", "module.max_logit_scale=50")
    fit_steps(module, 1)
    assert module.model.logit_scale.item() == pytest.approx(math.log(50), abs=1e-6)


def test_training_step_gives_a_finite_loss_and_needs_tokens():
    module = micro_module()
    loss = module.training_step(synthetic_batch(), 0)
    assert loss.ndim == 0 and math.isfinite(loss.item()) and loss.requires_grad
    batch = synthetic_batch()
    del batch["tokens"]
    with pytest.raises(ConfigError, match="data.tokenizer"):
        module.training_step(batch, 0)


def _with_negatives(batch: dict, k: int = 2) -> dict:
    g = torch.Generator().manual_seed(1)
    b, ctx = batch["tokens"].shape
    mask = torch.ones(b, k, dtype=torch.bool)
    mask[0, 1] = False  # one empty slot
    return {**batch, "negative_tokens": torch.randint(1, 49407, (b, k, ctx), generator=g), "negative_mask": mask}


def test_hard_negative_step_uses_one_forward_and_the_negative_loss():
    module = micro_module()
    batch = _with_negatives(synthetic_batch())
    image_f, text_f, scale, bias, negative_f, mask = module.embed_with_negatives(batch)
    assert negative_f.shape == (4, 2, 16) and bias is None
    assert torch.equal(negative_f[0, 1], torch.zeros(16)), "an empty slot is not embedded"
    alone = module.model.encode_text(batch["negative_tokens"][2, 1:2], normalize=True)[0]
    torch.testing.assert_close(negative_f[2, 1], alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(text_f, module.model.encode_text(batch["tokens"], normalize=True), rtol=1e-5, atol=1e-6)
    expected = module.negative_loss_fn(image_f, text_f, scale, negative_f, mask)
    loss = module.training_step(batch, 0)
    torch.testing.assert_close(loss, expected)
    assert loss > module.loss_fn(image_f, text_f, scale), "negatives only add competitors"


def test_validation_reports_hard_negative_accuracy(tmp_path):
    module = micro_module()
    batches = [_with_negatives(synthetic_batch()) for _ in range(2)]
    with torch.no_grad():
        pairs = []
        for batch in batches:
            image_f, text_f, _, _, negative_f, mask = module.embed_with_negatives(batch)
            pairs.append(hard_negative_accuracy(image_f, text_f, negative_f, mask).tolist())
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    metrics = trainer.validate(module, DataLoader(batches, batch_size=None), verbose=False)[0]
    counted = sum(c for _, c in pairs)
    assert counted == 2 * int(batches[0]["negative_mask"].sum())
    assert metrics["val/hard_negative_accuracy"] == pytest.approx(sum(w for w, _ in pairs) / counted)


def test_siglip_refuses_hard_negatives():
    module = micro_module("module.loss=siglip", "model.init_logit_bias=-10.0")
    with pytest.raises(ConfigError, match="module.loss=clip"):
        module.training_step(_with_negatives(synthetic_batch()), 0)


def test_siglip_needs_a_logit_bias():
    with pytest.raises(ConfigError, match="init_logit_bias"):
        micro_module("module.loss=siglip")
    module = micro_module("module.loss=siglip", "model.init_logit_bias=-10.0")
    assert math.isfinite(module.training_step(synthetic_batch(), 0).item())


def test_unknown_loss_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"valid: \['clip', 'siglip'\]"):
        micro_module("module.loss=infonce")


def test_checkpoint_metadata_describes_the_clip():
    module = micro_module()
    meta = module.checkpoint_metadata()
    assert (meta["embed_dim"], meta["image_size"], meta["context_length"]) == (16, 16, 8)
    assert meta["model_config"]["vision"]["width"] == 32 and len(meta["clip_hash"]) == 64
    assert isinstance(module.hparams["model"], dict), "plain containers, loadable with weights_only=True"


@pytest.mark.parametrize("overrides, image_size, ctx", [
    (["experiment=emoji_clip_tiny"], 64, 32),
    (["experiment=emoji_clip_tiny", "model/clip=vit_b32"], 224, 77),
    (["experiment=paper_clip", "data.train_shards='/nowhere/{0..9}.tar'"], 256, 77),
    (["stage=clip", "data=emoji", "model/clip=paper"], 256, 77),
    (["stage=clip", "data=emoji", "model/clip=vit_b32", "model.arch=ViT-B-16", "model.vision.image_size=96"], 96, 77),
])
def test_presets_compose_and_feed_the_stage_sizes_to_the_data(overrides, image_size, ctx):
    cfg = compose_train(overrides + ["logger=csv"])
    assert cfg.stage == "clip" and cfg.data.image_size == image_size == cfg.module.model.vision.image_size
    assert cfg.data.tokenizer.context_length == ctx
    assert instantiate(cfg.data.tokenizer)(["a cat"]).shape == (1, ctx)
    report = dry_run(cfg)
    assert report["stage"] == "clip" and report["module"] == "CLIPModule" and report["params"] > 1e6


def test_paper_experiment_uses_app_c_settings():
    cfg = compose_train(["experiment=paper_clip", "data.train_shards='/nowhere/{0..9}.tar'"])
    assert cfg.module.optimizer.lr == 3e-4 and cfg.data.batch_size == 64
    assert cfg.trainer.precision == "bf16-mixed"
    assert cfg.trainer.strategy._target_ == "pytorch_lightning.strategies.DDPStrategy"
    assert cfg.module.model.vision.width == 1280 and cfg.module.model.text.layers == 24
    assert cfg.trainer.gradient_clip_val == 1.0 and cfg.module.local_loss and cfg.module.gather_with_grad
