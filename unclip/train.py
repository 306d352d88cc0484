"""``unclip-train``: train one stage of unCLIP. ``unclip-train stage=clip experiment=emoji_clip_tiny``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from unclip.config import register_resolvers
from unclip.training.runner import train

register_resolvers()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
