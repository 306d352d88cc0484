"""``unclip-eval``: sample for val captions through a checkpoint chain, write ``report.json`` and ``grid.png``.

    unclip-eval clip_ckpt=... prior_ckpt=... decoder_ckpt=... 'upsampler_ckpts=[...]' val_shards=... out_dir=...
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

from unclip.config import register_resolvers, require_keys

register_resolvers()
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from unclip.evaluation.run import evaluate

    require_keys(cfg, "clip_ckpt", "prior_ckpt", "decoder_ckpt", "val_shards")
    report = evaluate(cfg)
    if report is not None:
        print(json.dumps({k: v for k, v in report.items() if k not in ("sampling", "checkpoints")}, default=float))


if __name__ == "__main__":
    main()
