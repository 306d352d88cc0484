"""``unclip-train``: train one stage of unCLIP. ``unclip-train stage=clip experiment=emoji_clip_tiny``."""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from unclip.config import conf_dir, register_resolvers
from unclip.training.loggers import name_sweep_job
from unclip.training.runner import train, use_hydra_job_dir

register_resolvers()
CONF_DIR = conf_dir()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    use_hydra_job_dir(cfg, HydraConfig.get())  # a sweep's jobs (and DDP ranks) each in their own run_dir
    name_sweep_job(cfg, HydraConfig.get())  # ... and one W&B group
    train(cfg)


if __name__ == "__main__":
    main()
