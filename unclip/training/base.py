"""What every stage's LightningModule shares: self-describing checkpoints, data-skip logging, and the results a
module hands over to the callbacks that write files (``unclip.training.callbacks``: metrics.json, sample grids)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from unclip.checkpoints import CHECKPOINT_KEY
from unclip.data.stats import DataStats
from unclip.version import version_info


def to_container(cfg: Any) -> Any:
    """A plain (resolved) dict/list from an OmegaConf node; other values pass through."""
    if isinstance(cfg, DictConfig) or OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


@dataclass
class SampleGrid:
    """A sample grid a module computed at a validation, for :class:`~unclip.training.callbacks.SampleGrids` to write.

    :param rows: [R·n, 3, S, S] images in [-1, 1], row after row of ``n`` columns.
    :param columns: n, the images per row.
    :param captions: the n columns' captions (empty: none).
    """

    rows: torch.Tensor
    columns: int
    captions: list[str] = field(default_factory=list)


class UnclipModule(pl.LightningModule):
    """Base of the stage modules.

    Subclasses set ``self.stage`` (clip|prior|decoder|upsampler) and override ``checkpoint_metadata()``
    returning what a later stage needs to validate the chain (embedding dim, image sizes, CLIP hash...).
    Every checkpoint then carries ``checkpoint["unclip"] = {"stage", "model_config", "version",
    "git_commit", ...}``, and batches' data-skip counts are logged as ``data/skipped`` (cumulative).

    Modules compute; callbacks write. After each validation (not the sanity check) a module leaves its summary in
    ``validation_metrics`` (``MetricsFile`` merges it into ``run_dir/metrics.json``) and may leave a
    :class:`SampleGrid` in ``sample_grid`` (``SampleGrids`` writes it to ``run_dir/samples/``).
    """

    stage: str = ""

    def __init__(self) -> None:
        super().__init__()
        self._skipped: Counter = Counter()
        self._data_stats = DataStats()
        self.validation_metrics: dict[str, Any] = {}
        self.sample_grid: SampleGrid | None = None

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
