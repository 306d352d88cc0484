"""The diffusion-stage base shared by prior, decoder, upsampler and inpainting: one set of attribute names, old prior
checkpoints (``model.*`` keys) converted on load and resumed, per-quartile metrics, the same hyperparameters, an
explicit dry-run flag, and the callbacks that write what modules hand over (metrics.json, sample grids)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from tests.conftest import compose_train
from tests.golden.formats import assert_close_to_golden, golden_outputs, read_format, rebuild_checkpoint
from tests.training.test_prior_module import fit, micro_module, synthetic_batches
from unclip.stages import upgrade_module_keys
from unclip.training.base import SampleGrid, UnclipModule
from unclip.training.callbacks import MetricsFile, SampleGrids
from unclip.training.diffusion_stage import DiffusionStageModule, quartile_metrics, quartile_sums

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to", "ignore:.*does not have many workers",
                                        "ignore:.*LeafSpec", "ignore:.*val_dataloader")
# The decoder shrunk as in tests/training/test_decoder_module.py (16px, the tiny CLIP's sizes).
DECODER = ["stage=decoder", "data=emoji", "run_dir=null", "model.image_size=16", "model.model_channels=16",
           "model.channel_mult=[1,2]", "model.num_res_blocks=1", "model.attention_resolutions=[8]",
           "model.num_head_channels=8", "model.num_groups=8", "model.context_width=32", "model.text.heads=2"]


def to_old_format(state_dict: dict) -> dict:
    """A state dict as priors wrote it before the shared base: the network under ``model.``."""
    return {"model." + k.removeprefix("net.") if k.startswith("net.") else k: v for k, v in state_dict.items()}


def test_old_prior_checkpoints_resume_into_the_shared_base(tiny_clip_export, tmp_path):
    module = micro_module(tiny_clip_export)
    trainer = fit(module, synthetic_batches(tiny_clip_export, 2), steps=2, tmp_path=tmp_path)
    logged = trainer.callback_metrics.keys()  # the prior logs its losses the decoder's way: per term, per quartile
    assert {"train/loss", "train/mse"} <= logged and any(k.startswith("train/loss_q") for k in logged)
    assert any(k.startswith("train/mse_q") for k in logged)
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=True)
    checkpoint["state_dict"] = to_old_format(checkpoint["state_dict"])
    # It is the recorded format of today's priors (tests/golden/prior.json): every key, shape and dtype.
    recorded = read_format("prior")["state_dict"]
    assert {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in checkpoint["state_dict"].items()} == recorded
    torch.save(checkpoint, tmp_path / "old.ckpt")

    resumed = micro_module(tiny_clip_export)
    loader = DataLoader(synthetic_batches(tiny_clip_export, 1), batch_size=None)
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(resumed, train_dataloaders=loader, ckpt_path=tmp_path / "old.ckpt")
    assert trainer.global_step == 3 and int(resumed.ema.n_averaged) == 3  # EMA and loop state carried over
    assert trainer.optimizers[0].state_dict()["state"][0]["step"] == 3  # so did AdamW's moments

    # The weights themselves: a strict load of the converted keys gives the trained network back exactly.
    fresh = micro_module(tiny_clip_export)
    fresh.configure_model()
    old = torch.load(tmp_path / "old.ckpt", weights_only=True)
    fresh.on_load_checkpoint(old)
    fresh.load_state_dict(old["state_dict"])
    for (name, a), b in zip(fresh.net.state_dict().items(), module.net.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_the_golden_prior_checkpoint_loads_into_the_module_and_computes_the_golden_numbers(tiny_clip_export,
                                                                                           tmp_path):
    module = micro_module(tiny_clip_export, "model.mlp_ratio=4.0", "model.embed_scale=17.2")
    module.configure_model()
    checkpoint = torch.load(rebuild_checkpoint("prior", tmp_path / "prior.ckpt"), weights_only=True)
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])  # strict: "model.*" became "net.*", "ema.*" as they were
    net = module.ema_net.eval()
    assert_close_to_golden(golden_outputs("prior", net, {"diffusion": module.diffusion_config}),
                           read_format("prior")["golden"])


def test_upgrade_leaves_new_keys_and_the_ema_alone():
    w = torch.zeros(1)
    assert upgrade_module_keys({"model.a": w, "ema.module.a": w, "ema.n_averaged": w}).keys() == {
        "net.a", "ema.module.a", "ema.n_averaged"}
    assert upgrade_module_keys({"net.a": w, "model.b": w}).keys() == {"net.a", "model.b"}


def test_quartile_metrics_average_each_quarter_of_the_chain():
    t = torch.tensor([0, 100, 300, 999, 260])
    sums = quartile_sums({"loss": torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])}, t, 1000)
    assert sums["count"].tolist() == [2, 2, 0, 1]
    metrics = quartile_metrics("val", sums)
    assert metrics == {"val/loss": 3.0, "val/loss_q0": 1.5, "val/loss_q1": 4.0, "val/loss_q3": 4.0}


def test_every_stage_shares_the_attribute_names_hyperparameters_and_stored_sampling(tiny_clip_export):
    prior = micro_module(tiny_clip_export, "module.sampling.steps=12")
    cfg = compose_train([*DECODER, f"clip_ckpt={tiny_clip_export}", "module.sampling.steps=7"])
    OmegaConf.resolve(cfg)
    decoder = instantiate(cfg.module, _recursive_=False)
    shared = {"model", "diffusion", "sampling", "optimizer", "no_decay_keywords", "scheduler", "ema",
              "grad_checkpointing", "compile"}
    for module, steps in ((prior, 12), (decoder, 7)):
        assert isinstance(module, DiffusionStageModule) and module.ema is None
        assert shared <= set(module.hparams) and module.hparams["sampling"]["steps"] == steps
        assert module.checkpoint_metadata()["sampling"]["steps"] == steps  # the prior's too, from its config
        module.configure_model()  # the one hook that builds the EMA
        assert module.ema is not None and module.ema_net is module.ema.module
        keys = module.state_dict().keys()
        assert any(k.startswith("net.") for k in keys) and any(k.startswith("ema.module.") for k in keys)
        assert not any(k.startswith("model.") for k in keys)


def test_the_prior_reads_no_clip_in_a_dry_run_only_when_told(tmp_path):
    sizes = ["experiment=emoji_prior_tiny", "run_dir=null", f"clip_ckpt={tmp_path / 'missing'}",
             "model.width=32", "model.depth=1", "model.heads=2"]
    cfg = compose_train([*sizes, "dry_run=true"])
    assert instantiate(cfg.module, _recursive_=False).model_config["embed_dim"] == 128
    cfg = compose_train(sizes)
    with pytest.raises(InstantiationException, match="missing"):
        instantiate(cfg.module, _recursive_=False)


def _trainer(tmp_path, step: int, sanity: bool = False):
    return SimpleNamespace(sanity_checking=sanity, is_global_zero=True, global_step=step, loggers=[])


def test_metrics_file_merges_what_the_module_hands_over(tmp_path):
    module, callback = UnclipModule(), MetricsFile(str(tmp_path))
    module.validation_metrics = {"val/loss": torch.tensor(0.5), "val/num_samples": 4.0}
    callback.on_validation_end(_trainer(tmp_path, 5), module)
    assert module.validation_metrics == {}
    module.validation_metrics = {"val/psnr": 20.0}
    callback.on_validation_end(_trainer(tmp_path, 9), module)
    module.validation_metrics = {"val/loss": 9.0}
    callback.on_validation_end(_trainer(tmp_path, 10, sanity=True), module)  # the sanity check writes nothing
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics == {"val/loss": 0.5, "val/num_samples": 4.0, "val/psnr": 20.0, "global_step": 9}


def test_sample_grids_are_written_by_the_callback(tmp_path):
    module, callback = UnclipModule(), SampleGrids(str(tmp_path))
    rows = torch.linspace(-1, 1, 6 * 3 * 4 * 4).view(6, 3, 4, 4)
    module.sample_grid = SampleGrid(rows, columns=3, captions=["a", "b", "c"])
    callback.on_validation_end(_trainer(tmp_path, 7), module)
    assert module.sample_grid is None
    grid = Image.open(tmp_path / "samples" / "step00000007.png")
    assert grid.size == (3 * 5 + 1, 2 * 5 + 1)  # 3 columns, 2 rows of 4px images, 1px padding
    assert (tmp_path / "samples" / "step00000007.txt").read_text().splitlines() == ["a", "b", "c"]
