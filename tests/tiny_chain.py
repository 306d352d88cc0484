"""A complete random-weights checkpoint chain (CLIP → prior → decoder → upsampler) in seconds, without training.

Each stage module is built from the real composed configs (shrunk through ordinary overrides) and its checkpoint
written exactly as Lightning would hold it: ``state_dict`` (network + EMA) and ``checkpoint["unclip"]`` from the
module's own ``checkpoint_metadata()``. The chain fits together: 128-d tiny CLIP, 16px decoder, 16 → 32 upsampler.
"""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.conftest import compose_train
from unclip.checkpoints import CHECKPOINT_KEY

PRIOR = ["experiment=emoji_prior_tiny", "model.width=32", "model.depth=2", "model.heads=2"]
DECODER = ["stage=decoder", "data=emoji", "model.image_size=16", "model.model_channels=16", "model.channel_mult=[1,2]",
           "model.num_res_blocks=1", "model.attention_resolutions=[8]", "model.num_head_channels=8",
           "model.num_groups=8", "model.context_width=32", "model.text.heads=2", "module.sampling.sampler=dpmpp_2m",
           "module.sampling.steps=4", "module.sampling.spacing=logsnr"]
UPSAMPLER = ["stage=upsampler", "data=emoji", "model.image_size=32", "module.input_size=16",
             "model.model_channels=16", "model.channel_mult=[1,2]", "model.num_res_blocks=1", "model.num_groups=8",
             "module.sampling.steps=3"]


def _save(module, path: Path) -> Path:
    module.setup("fit")
    if hasattr(module, "configure_model"):
        module.configure_model()  # the prior builds its EMA there
    checkpoint = {"state_dict": module.state_dict(),
                  CHECKPOINT_KEY: {"stage": module.stage, **module.checkpoint_metadata()}}
    torch.save(checkpoint, path)
    return path


def _module(overrides: list[str]):
    cfg = compose_train(["run_dir=null", "data.num_workers=0", *overrides])
    OmegaConf.resolve(cfg)
    return instantiate(cfg.module, _recursive_=False)


def make_tiny_chain(directory: Path, clip: Path, seed: int = 0) -> dict[str, Path]:
    """Write prior, decoder and upsampler checkpoints chained to the CLIP export ``clip``.

    :return: ``{"clip", "prior", "decoder", "upsampler"}`` paths.
    """
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    prior = _save(_module([*PRIOR, f"clip_ckpt={clip}"]), directory / "prior.ckpt")
    decoder = _save(_module([*DECODER, f"clip_ckpt={clip}"]), directory / "decoder.ckpt")
    upsampler = _save(_module([*UPSAMPLER, f"decoder_ckpt={decoder}"]), directory / "upsampler.ckpt")
    return {"clip": clip, "prior": prior, "decoder": decoder, "upsampler": upsampler}
