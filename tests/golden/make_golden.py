"""Write tests/golden/<stage>.json: today's checkpoint format per stage and the golden outputs of its networks.

Run once, from the code whose behaviour is to be kept (it was run before the stage contract redesign):

    PYTHONPATH=. python3 tests/golden/make_golden.py

Per stage it trains the tiny module of ``tests/tiny_chain.py`` for one step with a real Lightning ``Trainer`` on
random in-memory batches, saves a real checkpoint, and records its top-level keys, ``checkpoint["unclip"]`` and
state-dict keys/shapes/dtypes (temporary paths replaced by ``<tmp>``). Then it rebuilds that format with seeded
weights (``formats.rebuild_checkpoint``), loads it with the loaders of the time and records
``formats.golden_outputs``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pytorch_lightning as pl

from tests.conftest import make_tiny_clip_export
from tests.golden.formats import GOLDEN_DIR, golden_outputs, rebuild_checkpoint
from tests.tiny_chain import DECODER, PRIOR, UPSAMPLER, _module

INPAINT_BASE = ["stage=decoder", "experiment=emoji_decoder_tiny", *DECODER[2:]]
INPAINT = ["stage=decoder", "experiment=emoji_inpaint_decoder_tiny", *DECODER[2:]]


def _batches(stage: str, clip: Path, size: int) -> list[dict]:
    from unclip.models.clip_embedder import tokenizer_for

    g = torch.Generator().manual_seed(0)
    batch: dict = {"image": torch.rand(4, 3, size, size, generator=g) * 2 - 1, "caption": ["a red circle"] * 4}
    if stage != "upsampler":
        batch["tokens"] = tokenizer_for(str(clip))(batch["caption"])
    return [batch]


def _train_one_step(module, batches: list[dict], path: Path) -> dict:
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    trainer.save_checkpoint(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _plain(value, tmp: str):
    return json.loads(json.dumps(value, default=str).replace(tmp, "<tmp>"))


def main() -> None:
    from unclip.decoder_sampling import load_decoder, load_upsampler
    from unclip.models.prior_sampling import load_prior

    loaders = {"prior": load_prior, "decoder": load_decoder, "upsampler": load_upsampler, "inpaint": load_decoder}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        torch.manual_seed(0)
        clip = make_tiny_clip_export(tmp / "clip")
        decoder_ckpt = tmp / "decoder.ckpt"
        specs = {"prior": ([*PRIOR, f"clip_ckpt={clip}"], 32), "decoder": ([*DECODER, f"clip_ckpt={clip}"], 16),
                 "upsampler": ([*UPSAMPLER, f"decoder_ckpt={decoder_ckpt}"], 32),
                 "inpaint": ([*INPAINT, f"clip_ckpt={clip}", f"module.init_from={tmp / 'base.ckpt'}"], 16)}
        for stage, (overrides, size) in specs.items():
            torch.manual_seed(0)
            if stage == "inpaint":  # its base decoder: the emoji preset's diffusion, the tiny network
                _train_one_step(_module([*INPAINT_BASE, f"clip_ckpt={clip}"]), _batches(stage, clip, size),
                                tmp / "base.ckpt")
            path = decoder_ckpt if stage == "decoder" else tmp / f"{stage}.ckpt"
            checkpoint = _train_one_step(_module(overrides), _batches(stage, clip, size), path)
            fmt = {"format_of": "unclip checkpoints before the typed stage contract (format 0)",
                   "top_level_keys": sorted(checkpoint),
                   "meta": _plain(checkpoint["unclip"], tmp_name),
                   "state_dict": {k: {"shape": list(v.shape), "dtype": str(v.dtype)}
                                  for k, v in checkpoint["state_dict"].items()}}
            out = GOLDEN_DIR / f"{stage}.json"
            out.write_text(json.dumps(fmt, indent=1) + "\n")
            net, meta = loaders[stage](rebuild_checkpoint(stage, tmp / f"{stage}_rebuilt.ckpt"))
            fmt["golden"] = golden_outputs(stage, net, meta)
            out.write_text(json.dumps(fmt, indent=1) + "\n")
            print(f"{out}: {len(fmt['state_dict'])} tensors, sample sum {fmt['golden']['sample']['sum']:.6g}")


if __name__ == "__main__":
    main()
