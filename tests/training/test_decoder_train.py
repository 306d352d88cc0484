"""Slow end-to-end checks of the decoder cascade on real emoji (run with ``pytest -m slow``; minutes on 2 cores).

* A small base decoder overfits 8 emoji: the training loss falls to a small fraction of its start and samples
  decoded from the 8 embeddings land on their own targets.
* The ``emoji_upsampler_tiny`` preset, trained briefly, restores blurred, downsampled val emoji better than
  bicubic upsampling does (PSNR), at the size it trains on crops of.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.conftest import compose_train
from unclip.data.decode import SampleDecoder
from unclip.data.embeddings import write_meta
from unclip.data.pipeline import ShardDataset
from unclip.data.shards import expand_shards
from unclip.decoder_sampling import load_upsampler, sample_decoder, sample_upsampler
from unclip.models.degradations import GaussianBlur, downsample, upsample
from unclip.training.decoder_module import psnr
from unclip.training.runner import train

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:.*LeafSpec", "ignore:.*val_dataloader")]


def val_images(root: Path, n: int, size: int) -> dict:
    """The first n val emoji at ``size`` px in [-1, 1], with captions."""
    decoder = SampleDecoder(require=("image", "caption"), max_pixels=10**8, min_side=1, draft_size=size,
                            decode_images=True)
    ds = ShardDataset(expand_shards(str(root / "val" / "00000.tar"), "val"), batch_size=n, image_size=size,
                      mode="epoch", rank=0, world_size=1, seed=0, shuffle_buffer=0, crop="center", tokenizer=None,
                      drop_last=False, decoder=decoder, embeddings=None)
    batch = next(iter(ds))
    return {"image": batch["image"], "caption": batch["caption"]}


class Repeat(torch.utils.data.IterableDataset):
    def __init__(self, batch: dict):
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


def test_base_decoder_overfits_a_handful_of_emoji(emoji_root, tmp_path):
    # Distinct unit embeddings stand in for a trained CLIP's (a random-weights CLIP puts all emoji within cosine
    # 0.9-0.99 of each other); they arrive as precomputed embeddings, as from unclip-embed.
    write_meta(tmp_path, {"clip_hash": "random", "embed_dim": 128, "text_width": 128, "context_length": 32})
    cfg = compose_train(["stage=decoder", "data=emoji", "clip_ckpt=null", f"data.embeddings={tmp_path}",
                         "run_dir=null", "model.model_channels=32", "model.num_res_blocks=1",
                         "model.attention_resolutions=[8]", "model.num_head_channels=16", "model.context_width=64",
                         "model.text=null", "model.dropout=0.0", "module.diffusion.mean_type=v",
                         "module.optimizer.lr=1e-3", "module.scheduler.warmup_steps=20", "module.ema.decay=0.99",
                         "module.ema.warmup=true"])
    OmegaConf.resolve(cfg)
    batch = val_images(emoji_root, 8, 64)  # CLIP-sized images; the 32px decoder's targets are downsampled
    z = torch.nn.functional.normalize(torch.randn(8, 128, generator=torch.Generator().manual_seed(0)), dim=-1)
    batch.update(image_embed=z, text_embed=z)
    torch.manual_seed(0)
    module = instantiate(cfg.module, _recursive_=False)
    losses: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    steps = 800
    start = time.perf_counter()
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                         callbacks=[Record()])
    trainer.fit(module, torch.utils.data.DataLoader(Repeat(batch), batch_size=None))
    seconds = time.perf_counter() - start
    first, last = sum(losses[:10]) / 10, sum(losses[-50:]) / 50

    target = downsample(batch["image"], 32)
    samples = sample_decoder(module.ema_net, module.checkpoint_metadata(), z, guidance_scale=1.0,
                             generator=torch.Generator().manual_seed(0))
    quality = psnr(samples, target)
    nearest = torch.cdist(samples.flatten(1), target.flatten(1)).argmin(dim=1)
    print(f"\noverfit: {steps} steps in {seconds:.0f}s, loss {first:.3f} -> {last:.4f}, "
          f"sample PSNR mean {quality.mean():.1f} dB min {quality.min():.1f} dB")
    assert last < 0.15 * first and last < 0.12, (first, last)
    assert torch.equal(nearest, torch.arange(8)), "each embedding decodes to its own emoji"
    assert quality.mean() > 20 and quality.min() > 15, quality


def test_upsampler_restores_blurred_downsampled_emoji_better_than_bicubic(emoji_root, tmp_path, monkeypatch):
    monkeypatch.setenv("UNCLIP_EMOJI_ROOT", str(emoji_root))
    steps = 800
    start = time.perf_counter()
    out = train(compose_train(["stage=upsampler", "experiment=emoji_upsampler_tiny", f"run_dir={tmp_path}",
                               f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
                               f"callbacks.checkpoint.every_n_train_steps={steps}", "data.num_workers=0",
                               "trainer.enable_progress_bar=false"]))
    seconds = time.perf_counter() - start
    net, meta = load_upsampler(out["last_checkpoint"])
    image = val_images(emoji_root, 32, 64)["image"]
    low = GaussianBlur(3, 0.6)(downsample(image, 32))  # the corruption it trains with, on held-out images
    restored = sample_upsampler(net, meta, low, generator=torch.Generator().manual_seed(0))
    ours, bicubic = float(psnr(restored, image).mean()), float(psnr(upsample(low, 64), image).mean())
    print(f"\nupsampler: {steps} steps in {seconds:.0f}s; PSNR {ours:.2f} dB vs bicubic {bicubic:.2f} dB")
    assert ours > bicubic + 0.5
