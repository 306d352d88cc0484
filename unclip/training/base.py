"""What every stage's LightningModule shares: self-describing checkpoints and data-skip logging."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from unclip.checkpoints import CHECKPOINT_KEY
from unclip.data.stats import DataStats
from unclip.version import version_info


def to_container(cfg: Any) -> Any:
    """A plain (resolved) dict/list from an OmegaConf node; other values pass through."""
    if isinstance(cfg, DictConfig) or OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


class UnclipModule(pl.LightningModule):
    """Base of the stage modules.

    Subclasses set ``self.stage`` (clip|prior|decoder|upsampler) and override ``checkpoint_metadata()``
    returning what a later stage needs to validate the chain (embedding dim, image sizes, CLIP hash...).
    Every checkpoint then carries ``checkpoint["unclip"] = {"stage", "model_config", "version",
    "git_commit", ...}``, and batches' data-skip counts are logged as ``data/skipped`` (cumulative).
    """

    stage: str = ""

    def __init__(self) -> None:
        super().__init__()
        self._skipped: Counter = Counter()
        self._data_stats = DataStats()

    def checkpoint_metadata(self) -> dict:
        """Stage-specific facts stored in every checkpoint; subclasses extend it."""
        return {}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = {"stage": self.stage, **version_info(), **self.checkpoint_metadata()}

    def log_data_stats(self, batch: dict) -> None:
        """Accumulate the skip counts a batch carries and log their running total; every rank's counts by reason
        (``data/skipped/<reason>/rank<r>``, unclip.data.stats) every ``log_every_n_steps`` and at the end of an
        epoch or of the run: a collective, taken at the same step on every rank (DDP ranks step in lockstep)."""
        stats = batch.get("data_stats")
        if not stats:
            return
        self._skipped.update(stats["skipped"])
        self._data_stats.update(stats)
        self.log("data/skipped", float(sum(self._skipped.values())), on_step=True, on_epoch=False,
                 reduce_fx="sum", sync_dist=False)
        trainer = self._trainer
        step = self.global_step + 1
        # Lightning's logger connector sets trainer.log_every_n_steps; the Trainer class does not declare it.
        every = max(1, trainer.log_every_n_steps) if trainer is not None else 1  # type: ignore[attr-defined]
        if trainer is not None and (step % every == 0 or trainer.is_last_batch
                                    or 0 < (trainer.max_steps or -1) <= step):
            for name, value in self._data_stats.report().items():
                self.log(name, value, on_step=True, on_epoch=False, rank_zero_only=True)

    def write_metrics(self, metrics: dict, run_dir: str | None) -> None:
        """Merge ``metrics`` into ``run_dir/metrics.json`` (rank 0 only)."""
        if run_dir is None or not self.trainer.is_global_zero:
            return
        path = Path(run_dir) / "metrics.json"
        current = json.loads(path.read_text()) if path.exists() else {}
        current.update({k: float(v) if hasattr(v, "item") else v for k, v in metrics.items()})
        current["global_step"] = int(self.global_step)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(current, indent=2, sort_keys=True))
