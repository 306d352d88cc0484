"""The inpainting decoder presets: fine-tuning from a base decoder checkpoint made here (it starts as exactly the
base), a few CPU training steps through the runner, and init_from refusals that name the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.conftest import compose_train
from tests.golden.formats import format_0_meta
from unclip.config import ConfigError
from unclip.decoder_sampling import edit_decoder, load_decoder
from unclip.training.runner import train

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to", "ignore:.*LeafSpec", "ignore:.*val_dataloader")
# emoji_decoder_tiny shrunk (keeps the tiny CLIP's sizes: embed 128, width 128, ctx 32).
MICRO = ["model.image_size=16", "model.model_channels=16", "model.channel_mult=[1,2]", "model.num_res_blocks=1",
         "model.attention_resolutions=[8]", "model.num_head_channels=8", "model.num_groups=8",
         "model.context_width=32", "model.text.heads=2", "data.batch_size=4", "data.num_workers=0",
         "trainer.enable_progress_bar=false", "logger=csv", "module.sampling.steps=3"]


def steps(n: int, validate: bool) -> list[str]:
    return [f"trainer.max_steps={n}", f"trainer.val_check_interval={n}",
            f"callbacks.checkpoint.every_n_train_steps={n}", f"trainer.limit_val_batches={1 if validate else 0}",
            "module.val_samples.num=2"]


def compose(experiment: str, run_dir, clip: Path, *overrides: str):
    return compose_train(["stage=decoder", f"experiment={experiment}", f"run_dir={run_dir}", f"clip_ckpt={clip}",
                          *MICRO, *overrides])


def fake_decoder(path: Path, model_config: dict, diffusion: dict, stage: str = "decoder") -> Path:
    meta = {**format_0_meta("decoder"), "stage": stage, "model_config": model_config, "diffusion": diffusion,
            "input_size": 8}
    torch.save({"unclip": meta, "state_dict": {}}, path)
    return path


def test_inpainting_preset_fine_tunes_a_base_checkpoint(tiny_clip_export, emoji_root, tmp_path):
    base_out = train(compose("emoji_decoder_tiny", tmp_path / "base", tiny_clip_export, *steps(1, validate=False)))
    base_ckpt = base_out["last_checkpoint"]

    # At initialisation the inpainting decoder is the base decoder (EMA weights) for any mask.
    cfg = compose("emoji_inpaint_decoder_tiny", "null", tiny_clip_export, f"module.init_from={base_ckpt}")
    OmegaConf.resolve(cfg)
    module = instantiate(cfg.module, _recursive_=False)
    module.setup("fit")
    base, meta = load_decoder(base_ckpt)
    base.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 3, 16, 16, generator=g), torch.tensor([0, 300, 600, 999])
    z = torch.nn.functional.normalize(torch.randn(4, 128, generator=g), dim=-1)
    known = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    mask = module.masks(4, 16, g)
    with torch.no_grad():
        ref = base(x, t, z)
        for net in (module.net.eval(), module.ema_net.eval()):
            assert torch.equal(net(x, t, z, inpaint_image=known, inpaint_mask=mask), ref)

    # A few training steps through the runner; the checkpoint loads as an inpainting decoder and edits.
    out = train(compose("emoji_inpaint_decoder_tiny", tmp_path / "inpaint", tiny_clip_export,
                        f"module.init_from={base_ckpt}", *steps(2, validate=True)))
    net, meta = load_decoder(out["last_checkpoint"])
    assert net.inpaint and meta.inpaint and meta.training["init_from"] == base_ckpt
    assert meta.training["masks"]["weights"]
    assert net.inpaint_in.weight.abs().sum() > 0, "the new channels trained"
    metrics = json.loads((tmp_path / "inpaint" / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and "val/loss" in metrics
    assert (tmp_path / "inpaint" / "samples" / "step00000002.png").is_file()
    edit = edit_decoder(net, meta, known[:2], mask[:2], z[:2], generator=torch.Generator().manual_seed(0))
    assert torch.equal(edit.image[~edit.mask.bool().expand_as(edit.image)],
                       known[:2][~edit.mask.bool().expand_as(edit.image)])


def test_init_from_null_is_refused_when_training_not_when_dry_running(tiny_clip_export, tmp_path, capsys):
    cfg = compose_train(["stage=decoder", "experiment=demo_inpaint_decoder_tiny", f"run_dir={tmp_path}",
                         "dry_run=true"])
    assert train(cfg)["params"] > 0 and not any(tmp_path.iterdir())
    cfg = compose("emoji_inpaint_decoder_tiny", "null", tiny_clip_export)
    OmegaConf.resolve(cfg)
    module = instantiate(cfg.module, _recursive_=False)
    with pytest.raises(ConfigError, match="module.init_from is null: the inpainting decoder fine-tunes a base"):
        module.setup("fit")


def test_init_from_refuses_other_stages_and_mismatched_sizes_naming_both(tiny_clip_export, tmp_path, capsys):
    cfg = compose("emoji_inpaint_decoder_tiny", "null", tiny_clip_export)
    OmegaConf.resolve(cfg)
    model = {**OmegaConf.to_container(cfg.model), "inpaint": False}
    diffusion = OmegaConf.to_container(cfg.module.diffusion)

    def dry_run(path: Path, *overrides: str) -> dict:  # refused before compute, through the runner as users meet it
        return train(compose("emoji_inpaint_decoder_tiny", tmp_path / "run", tiny_clip_export, "dry_run=true",
                             f"module.init_from={path}", *overrides))

    with pytest.raises(ConfigError, match="is a 'upsampler' stage checkpoint; a 'decoder' checkpoint is needed"):
        dry_run(fake_decoder(tmp_path / "up.ckpt", model, diffusion, stage="upsampler"))
    with pytest.raises(ConfigError, match="init_from=.*missing.ckpt"):
        dry_run(tmp_path / "missing.ckpt")
    wide = fake_decoder(tmp_path / "wide.ckpt", {**model, "model_channels": 32}, diffusion)
    with pytest.raises(ConfigError, match=r"does not match .* model.model_channels: base 32, here 16"):
        dry_run(wide)
    eps = fake_decoder(tmp_path / "eps.ckpt", model, {**diffusion, "mean_type": "eps"})
    with pytest.raises(ConfigError, match=r"module.diffusion.mean_type: base 'eps', here 'v'"):
        dry_run(eps)
    assert dry_run(fake_decoder(tmp_path / "ok.ckpt", {**model, "dropout": 0.3}, diffusion))["params"] > 0
    with pytest.raises(ConfigError, match="needs model.inpaint=true"):
        dry_run(tmp_path / "ok.ckpt", "model.inpaint=false")
