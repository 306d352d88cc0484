"""``unclip-eval``: sample for val captions through a checkpoint chain, write ``report.json`` and ``grid.png``;
with ``--config-name evaluate_edit`` (``task: edit``), edit val images inside generated masks and write
``edit_report.json`` and ``edit_grid.png``; with ``--config-name evaluate_score`` (``task: score``), score a folder
of images from any model against real images or saved reference statistics (docs/evaluation.md).

    unclip-eval clip_ckpt=... prior_ckpt=... decoder_ckpt=... 'upsampler_ckpts=[...]' val_shards=... out_dir=...
    unclip-eval --config-name evaluate_edit clip_ckpt=... prior_ckpt=... decoder_ckpt=... val_shards=... out_dir=...
    unclip-eval --config-name evaluate_score fake=FOLDER real=SHARDS|FOLDER|STATS.npz image_size=256 out_dir=...
"""

from __future__ import annotations

import json
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from unclip.config import ConfigError, conf_dir, register_resolvers, require_keys

register_resolvers()
CONF_DIR = conf_dir()
CONFIG_OF_TASK = {"generate": "evaluate", "edit": "evaluate_edit", "score": "evaluate_score"}  # task -> its config
MARKER = {"generate": "cache_dir", "edit": "new_caption", "score": "fake"}  # a key only that config has


def use_job_out_dir(cfg: DictConfig, hydra_cfg: Any) -> None:
    """Record the command line's overrides (report.json lists them) and, in ``unclip-eval -m``, give each job its
    own ``out_dir``: ``hydra.sweep.dir/hydra.sweep.subdir`` (``out_dir/0``, ``out_dir/1``, ...; a sweep over
    ``out_dir`` itself gives ``<each out_dir>/N``). ``scripts/collect_runs.py out_dir`` makes one table of the jobs."""
    from hydra.types import RunMode

    with open_dict(cfg):
        cfg.overrides = list(hydra_cfg.overrides.task)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            cfg.out_dir = hydra_cfg.runtime.output_dir


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    if HydraConfig.initialized():  # not when a test calls main.__wrapped__ with a composed config
        use_job_out_dir(cfg, HydraConfig.get())
    task = cfg.get("task", "generate")
    if task not in CONFIG_OF_TASK:
        raise ConfigError(f"task={task!r} is not one of {tuple(CONFIG_OF_TASK)}")
    if MARKER[task] not in cfg:
        raise ConfigError(f"task={task} runs with its own config: unclip-eval --config-name {CONFIG_OF_TASK[task]} ...")
    if task == "score":
        from unclip.evaluation.score import score

        require_keys(cfg, "real")
        print(json.dumps(score(cfg), default=float))
        return
    require_keys(cfg, "clip_ckpt", "prior_ckpt", "decoder_ckpt", "val_shards")
    if task == "edit":
        from unclip.evaluation.edit_run import evaluate_edits as evaluate
    else:
        from unclip.evaluation.run import evaluate
    report = evaluate(cfg)
    if report is not None:
        print(json.dumps({k: v for k, v in report.items() if k not in ("sampling", "checkpoints")}, default=float))


if __name__ == "__main__":
    main()
