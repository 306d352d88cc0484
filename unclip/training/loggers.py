"""Loggers a sweep can compare: the resolved config as every run's hyperparameters, W&B name/group/tags from the
config (a multirun's jobs share a group), the W&B run id kept in the checkpoint so a resume continues that run, and
a CSV log that a resume extends instead of deleting."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment

from unclip.checkpoints import read_checkpoint
from unclip.training.sharded import META_FILE

LOGGER_STATE_KEY = "loggers"  # checkpoint[LOGGER_STATE_KEY] = {"wandb_id": ...}


class CSVLogger(pl.loggers.CSVLogger):
    """Lightning's CSVLogger, except that a resumed run keeps the earlier ``metrics.csv``.

    Lightning deletes ``metrics.csv`` when its folder is not empty. With ``continue_log`` set (the runner sets it
    on a resume) the earlier rows stay and the new ones follow, except rows from the steps the resumed run logs
    again (those logged after the checkpoint was saved and lost with the crash).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.continue_log = False

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None and self.continue_log:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(self.log_dir)
        return super().experiment


class _ContinuedWriter(ExperimentWriter):
    """Lightning's writer, appending to an existing ``metrics.csv`` from the first step it is given."""

    def __init__(self, log_dir: str) -> None:
        self._trimmed = False
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # called by __init__; Lightning's deletes metrics.csv here
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])  # save() appends under this header

    def save(self) -> None:
        if not self._trimmed and self.metrics and self._fs.isfile(self.metrics_file_path):
            first = min(int(m["step"]) for m in self.metrics)
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step") and int(float(r["step"])) < first]
            with self._fs.open(self.metrics_file_path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(rows)
        self._trimmed = self._trimmed or bool(self.metrics)
        super().save()


def logger_state(ckpt_path: str | None) -> dict[str, Any]:
    """What a checkpoint remembers of its run's loggers (``{}`` for none, a remote path, or an older checkpoint):
    ``{"wandb_id": str}``. Reads the file memory-mapped, so the weights are not loaded."""
    if ckpt_path is None or "://" in str(ckpt_path):
        return {}
    path = Path(ckpt_path)
    path = path / META_FILE if path.is_dir() else path  # a sharded FSDP checkpoint keeps non-tensor state there
    return dict(read_checkpoint(path).get(LOGGER_STATE_KEY) or {})


class LoggerState(pl.Callback):
    """Writes the W&B run id into every checkpoint (``checkpoint["loggers"]``), for :func:`logger_state`."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        ids = [lg.version for lg in trainer.loggers if isinstance(lg, WandbLogger) and lg.version]
        if ids:
            checkpoint[LOGGER_STATE_KEY] = {"wandb_id": str(ids[0])}


def is_wandb(node: Any) -> bool:
    """Whether a logger config node builds a WandbLogger."""
    return isinstance(node, DictConfig) and str(node.get("_target_", "")).endswith("WandbLogger")


def name_sweep_job(cfg: DictConfig, hydra_cfg: Any) -> None:
    """In ``unclip-train -m``: a W&B logger's unset ``group`` becomes the sweep dir (the jobs share it) and its unset
    ``name`` the job's overrides (``module.lr=0.001,seed=1``) or, with none, its number."""
    from hydra.types import RunMode

    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    for node in (cfg.get("logger") or {}).values():
        if is_wandb(node):
            with open_dict(node):
                node.group = node.get("group") or str(hydra_cfg.sweep.dir)
                node.name = node.get("name") or hydra_cfg.job.override_dirname or str(hydra_cfg.job.num)


def logger_kwargs(node: DictConfig, run_dir: str, state: dict[str, Any]) -> dict[str, Any]:
    """Arguments the runner adds when building one logger: a W&B run's name (run_dir's folder when unset) and, on a
    resume, its earlier id; nothing for other loggers."""
    if not is_wandb(node):
        return {}
    kwargs: dict[str, Any] = {}
    if node.get("name") is None:
        kwargs["name"] = Path(run_dir).name
    if state.get("wandb_id") and node.get("id") is None and node.get("version") is None:
        kwargs["id"] = state["wandb_id"]  # WandbLogger passes resume="allow": wandb continues this run
    return kwargs


def prepare_loggers(loggers: list, cfg: DictConfig, resuming: bool) -> None:
    """Before fit: every logger receives the resolved config as hyperparameters; a resumed run's CSV keeps its
    earlier rows. (Lightning then adds the module's own ``hparams`` on top.)"""
    params = OmegaConf.to_container(cfg, resolve=True)
    for lg in loggers:
        if resuming and isinstance(lg, CSVLogger):
            lg.continue_log = True
        lg.log_hyperparams(params)
