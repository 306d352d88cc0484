"""Build everything a training run needs from a composed config, check it, then fit."""

from __future__ import annotations

import inspect
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, DictKeyType, ListConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue

from unclip.checkpoints import remove_stale_temporaries
from unclip.config import ConfigError
from unclip.runtime import configure_cpu_runtime
from unclip.training.callbacks import REQUEUE_CHECKPOINT, DataFingerprint, RequeueOnSignal, SafeCheckpointIO
from unclip.training.loggers import LoggerState, is_wandb, logger_kwargs, logger_state, prepare_loggers
from unclip.training.preflight import check_option_keys, preflight
from unclip.training.sharded import is_sharded_checkpoint, prune_all_steps

log = logging.getLogger(__name__)


def _accepted_keys(target: Any) -> set[str] | None:
    """Keyword arguments a callable accepts, or None when it takes **kwargs (anything goes)."""
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_keys(node: Any, path: str) -> None:
    """Refuse keys that the ``_target_`` of a config node (or of any node inside it) does not accept.

    :raises ConfigError: naming the full dotted key and listing the valid ones.
    """
    if isinstance(node, ListConfig):
        for i, item in enumerate(node):
            check_keys(item, f"{path}[{i}]")
    if not isinstance(node, DictConfig):
        return
    if "_target_" in node:
        try:
            target = get_object(node._target_)
        except Exception as exc:  # noqa: BLE001 - hydra raises several kinds for an unimportable target
            raise ConfigError(f"{path}._target_: cannot import {node._target_!r}: {exc}") from exc
        accepted = _accepted_keys(target)
        if accepted is not None:
            unknown = [k for k in node if not str(k).startswith("_") and k not in accepted]
            if unknown:
                raise ConfigError(f"unknown key '{path}.{unknown[0]!s}' for {node._target_}; "
                                  f"valid keys: {', '.join(sorted(accepted))}")
    for key in node:
        if not str(key).startswith("_"):
            check_keys(node._get_node(key), f"{path}.{key!s}")


def check_config(cfg: DictConfig) -> None:
    """Everything that can be checked without compute: keys of every group and of the Trainer."""
    for group in ("data", "module"):
        check_keys(cfg[group], group)
    for group in ("logger", "callbacks"):
        for name, node in (cfg.get(group) or {}).items():
            check_keys(node, f"{group}.{name}")
    accepted = _accepted_keys(pl.Trainer) or set()
    unknown = [k for k in cfg.trainer if k not in accepted]
    if unknown:
        raise ConfigError(f"unknown key 'trainer.{unknown[0]}': not an argument of pytorch_lightning.Trainer")
    for key in cfg.trainer:
        check_keys(cfg.trainer._get_node(key), f"trainer.{key}")
    check_option_keys(cfg)


def _build(cfg: DictConfig, key: DictKeyType, **kwargs: Any) -> Any:
    """Instantiate ``cfg[key]``, turning constructor errors into one naming the config group."""
    try:
        return instantiate(cfg[key], **kwargs)
    except (InstantiationException, TypeError) as exc:
        raise ConfigError(f"could not build '{key!s}' ({cfg[key].get('_target_')}): {exc}") from exc


def _build_all(cfg: DictConfig, key: str) -> list:
    node = cfg.get(key) or DictConfig({})
    return [_build(node, name) for name in node if node[name] is not None]


def resolve_or_fail(cfg: DictConfig) -> None:
    """Resolve every interpolation now, so a missing key fails before compute, by name (a dry run builds no data,
    so unset ``data.*`` keys are no error there)."""
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not (cfg.get("dry_run") and k.startswith("data.")))
    if missing:
        raise ConfigError(f"config key '{missing[0]}' must be set (it is '???')")
    try:
        OmegaConf.resolve(cfg)
    except MissingMandatoryValue as exc:
        raise ConfigError(f"config key '{exc.full_key}' must be set (it is '???')") from exc


def use_hydra_job_dir(cfg: DictConfig, hydra_cfg: Any) -> None:
    """Make ``run_dir`` the Hydra job's output dir where the two would otherwise disagree.

    * ``unclip-train -m``: presets fix ``run_dir`` (``runs/demo/prior``) or derive it from the start time, so every
      job of a sweep would write into one folder; each job takes its own ``hydra.sweep.dir/hydra.sweep.subdir``
      instead (unless the sweep is over ``run_dir`` itself).
    * A DDP rank that Lightning starts re-runs the command with ``hydra.run.dir`` set to rank 0's dir; its own
      ``${now:...}`` in ``run_dir`` would name another second, so it takes rank 0's dir too (``resume=true``
      then finds the same ``last.ckpt`` on every rank).

    :param hydra_cfg: ``HydraConfig.get()`` of the running app.
    """
    from hydra.types import RunMode

    if hydra_cfg.mode == RunMode.MULTIRUN:
        if any(o.split("=", 1)[0].lstrip("+~") == "run_dir" for o in hydra_cfg.overrides.task):
            return
    elif not any(o.startswith("hydra.run.dir=") for o in hydra_cfg.overrides.hydra):
        return
    with open_dict(cfg):
        cfg.run_dir = hydra_cfg.runtime.output_dir


HPC_CKPT = re.compile(r"hpc_ckpt_(\d+)\.ckpt$")  # the requeue checkpoint of an older unclip


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint a requeued job continues from: the newest (by modification time) of
    ``checkpoints/requeue.ckpt`` (saved on SLURM's requeue signal), ``checkpoints/last.ckpt`` and an older
    unclip's ``hpc_ckpt_N.ckpt``; None if there is none (the job's first start)."""
    run_dir = Path(run_dir)
    candidates = [p for p in run_dir.glob("hpc_ckpt_*.ckpt") if HPC_CKPT.fullmatch(p.name)]
    hpc = max(candidates, key=lambda p: int(HPC_CKPT.fullmatch(p.name).group(1)), default=None)  # type: ignore[union-attr]
    found = [p for p in (hpc, run_dir / "checkpoints" / REQUEUE_CHECKPOINT, run_dir / "checkpoints" / "last.ckpt")
             if p is not None and p.exists()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def checkpoint_to_resume(cfg: DictConfig) -> str | None:
    """``resume=true`` continues from run_dir/checkpoints/last.ckpt; a path resumes from that file; ``auto`` from
    the newest of last.ckpt and a SLURM requeue's checkpoint if any exists (else starts fresh); ``false`` starts
    fresh, and refuses under SLURM where Lightning would resume an ``hpc_ckpt_N.ckpt`` of run_dir by itself."""
    if cfg.resume == "auto":  # scale-out (latest_checkpoint): a requeued SLURM job continues, a new one starts
        found = latest_checkpoint(cfg.run_dir)
        return None if found is None else str(found)
    if cfg.resume in (False, None):
        refuse_lightning_hpc_resume(Path(cfg.run_dir))
        return None
    path = Path(cfg.run_dir) / "checkpoints" / "last.ckpt" if cfg.resume is True else Path(str(cfg.resume))
    if not (path.is_file() or is_sharded_checkpoint(path)):  # FSDP's sharded checkpoints are folders
        raise ConfigError(f"resume={cfg.resume}: no checkpoint at {path}")
    return str(path)


def refuse_lightning_hpc_resume(run_dir: Path) -> None:
    """Lightning's ``fit(ckpt_path=None)`` under SLURM resumes from run_dir's newest ``hpc_ckpt_N.ckpt`` (its own
    auto-requeue saves, which unclip no longer writes): refuse rather than let ``resume=false`` continue silently.

    :raises ConfigError: naming the files and the two ways on.
    """
    from lightning_fabric.plugins.environments import SLURMEnvironment

    found = sorted(p.name for p in run_dir.glob("*hpc_ckpt_*")) if run_dir.is_dir() else []
    if found and SLURMEnvironment.detect():
        raise ConfigError(f"resume=false but run_dir={run_dir} holds {', '.join(found)}, which Lightning resumes "
                          f"under SLURM whatever it is told: continue it with resume=auto, or start afresh in "
                          f"another run_dir (or move those files away)")


def slurm_requeue(run_dir: Path, plugins: list) -> list:
    """Under SLURM: Lightning's auto-requeue off (it saves inside the signal handler) and :class:`RequeueOnSignal`
    on, which saves at the next step boundary. Adds the cluster environment to ``plugins``; returns the callbacks."""
    from lightning_fabric.plugins.environments import (
        ClusterEnvironment,
        SLURMEnvironment,
    )

    if not SLURMEnvironment.detect():
        return []
    if not any(isinstance(p, ClusterEnvironment) for p in plugins):
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return [RequeueOnSignal(str(run_dir / "checkpoints"))]


def clean_killed_saves(run_dir: Path) -> None:
    """Remove what saves killed mid-write left in run_dir (requeue checkpoints) and run_dir/checkpoints: temporary
    files of dead writers and sharded step folders no checkpoint link points at. Nothing saves at this point."""
    for folder in (run_dir, run_dir / "checkpoints"):
        for stale in remove_stale_temporaries(folder) + prune_all_steps(folder):
            log.info("removed %s, left by a save that was killed", stale)


def _callbacks(cfg: DictConfig, has_logger: bool) -> list:
    callbacks = _build_all(cfg, "callbacks")
    if not has_logger:  # LearningRateMonitor refuses a Trainer without a logger (logger=none)
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.LearningRateMonitor)]
    return [*callbacks, LoggerState()] if has_logger else callbacks


def build_loggers(cfg: DictConfig, ckpt_path: str | None) -> list:
    """The configured loggers; a W&B run is named after run_dir and, on a resume, continues the checkpoint's run."""
    node = cfg.get("logger") or DictConfig({})
    names = [name for name in node if node[name] is not None]
    state = logger_state(ckpt_path) if any(is_wandb(node[name]) for name in names) else {}
    return [_build(node, name, **logger_kwargs(node[name], cfg.run_dir, state)) for name in names]


def _plugins(trainer_kwargs: dict) -> list:
    """The configured plugins plus SafeCheckpointIO (atomic saves, weights-only loads) unless one is given."""
    plugins = trainer_kwargs.pop("plugins", None) or []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, pl.plugins.CheckpointIO) for p in plugins):
        plugins.append(SafeCheckpointIO())
    return plugins


def dry_run(cfg: DictConfig) -> dict:
    """Build the stage's module on the meta device and report its size without allocating weights."""
    with torch.device("meta"):
        module = _build(cfg, "module", _recursive_=False)
    params = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"stage": cfg.stage, "params": params, "trainable_params": trainable,
            "module": type(module).__name__}


def train(cfg: DictConfig) -> dict:
    """Seed, build data, module, loggers, callbacks and Trainer from ``_target_``s, then fit.

    :return: ``{"run_dir", "last_checkpoint", "metrics"}`` (callback metrics at the end of fit).
    """
    resolve_or_fail(cfg)
    check_config(cfg)
    if cfg.dry_run:
        report = dry_run(cfg)
        print(json.dumps(report))
        return report
    preflight(cfg)  # data, batch split and checkpoint-chain checks: still nothing built or written
    ckpt_path = checkpoint_to_resume(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    clean_killed_saves(run_dir)
    if ckpt_path is None and (run_dir / "checkpoints" / "last.ckpt").is_file():
        log.warning("%s already holds checkpoints/last.ckpt; this fresh run will overwrite it (resume=true "
                    "continues it instead)", run_dir)
    if cfg.trainer.get("accelerator") == "cpu":
        log.info("cpu runtime: %s", configure_cpu_runtime(cfg.data.num_workers, cfg.cpu_threads))
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = _build(cfg, "data")
    module = _build(cfg, "module", _recursive_=False)
    trainer_kwargs = instantiate(cfg.trainer, _convert_="partial")  # e.g. a strategy given by _target_
    plugins = _plugins(trainer_kwargs)
    loggers = build_loggers(cfg, ckpt_path)
    callbacks = [*_callbacks(cfg, bool(loggers)), *slurm_requeue(run_dir, plugins),
                 DataFingerprint(allow_change=cfg.resume_allow_data_change)]
    trainer = pl.Trainer(**trainer_kwargs, logger=loggers or False, callbacks=callbacks,
                         plugins=plugins, default_root_dir=str(run_dir))
    prepare_loggers(loggers, cfg, resuming=ckpt_path is not None)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if ckpt_path is not None:
        log.info("resuming from %s", ckpt_path)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    return {"run_dir": str(run_dir), "last_checkpoint": str(last) if last.exists() else None,
            "metrics": metrics}
