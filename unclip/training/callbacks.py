"""What every training run gets besides the module: atomic, never-unpickling checkpoint I/O, RNG state for exact
resumption, a guard that skips optimiser steps on a non-finite loss, SLURM's requeue at a step boundary, the data
fingerprint a resume is checked against (see docs/reliability.md), and the writers of the files a module's
validation results go to (``metrics.json``, ``samples/``): modules compute, these callbacks write."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from unclip.checkpoints import atomic_save, atomic_write_json, atomic_write_text, read_checkpoint
from unclip.config import ConfigError
from unclip.training.base import UnclipModule
from unclip.training.clip_module import CLIPModule

log = logging.getLogger(__name__)
CLIP_EXPORT_DIR = "clip_export"  # the CLIP stage's open_clip export inside run_dir


def _is_remote(path: Any) -> bool:
    return "://" in str(path)


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O, made atomic on local disks and never unpickling code when loading.

    Saving goes through :func:`unclip.checkpoints.atomic_save` (temporary file in the same folder, fsync,
    rename), so a kill during a save leaves the previous ``last.ckpt`` intact. Loading (``resume``) uses
    ``torch.load(weights_only=True)`` whatever the caller asks: a checkpoint is data, never code.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or _is_remote(path):  # object stores: fsspec's own transaction
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if _is_remote(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return read_checkpoint(path)


# ---- RNG state --------------------------------------------------------------------------------------------------

def rng_state() -> dict:
    """This process's torch, numpy, Python (and CUDA) RNG states as tensors and plain containers only, so that a
    checkpoint holding them still loads with ``weights_only=True`` (numpy's own state holds an ndarray)."""
    numpy_state = np.random.get_state()
    if not isinstance(numpy_state, tuple):  # a dict: the global generator was replaced (np.random.set_bit_generator)
        raise TypeError("cannot checkpoint numpy's global RNG: it is not the legacy MT19937 RandomState")
    _, keys, pos, has_gauss, gauss = numpy_state
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                       "gauss": float(gauss)},
             "python": [version, list(internal), gauss_next]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumeState(pl.Callback):
    """Makes a resumed run continue the random streams of the run it resumes.

    Lightning restores weights, optimiser, scheduler, loop counters and (through ``EpochDataLoader``) the data
    position, but not the global RNGs, which draw diffusion timesteps, noise and guidance drops. This callback
    stores every rank's RNG states in each checkpoint and restores them where the interrupted run stood: before
    the first training batch after a resume mid-epoch, before the next epoch starts its data iterator (which
    draws a worker seed) after a resume at an epoch boundary; set-up and the sanity check draw before that.
    Validation runs between its own save and restore of the RNG states, so how often a run validates never
    changes what it trains on.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._trainer: pl.Trainer | None = None
        self._pending: list[dict] | None = None
        self._outside_validation: dict | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Every rank was seeded alike (identical initial weights); from here each rank draws its own diffusion
        # timesteps, noise and guidance drops, else data parallelism would repeat one rank's draws N times.
        if self.seed is not None and trainer.world_size > 1:
            offset = int(self.seed) + 1_000_003 * trainer.global_rank
            random.seed(offset)
            np.random.seed(offset % 2**32)
            torch.manual_seed(offset)

    def state_dict(self) -> dict:
        local = rng_state()
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1 or not torch.distributed.is_initialized():
            return {"ranks": [local]}
        # dump_checkpoint runs on every rank, so this collective is matched; rank 0 writes all ranks' states.
        ranks: list = [None] * trainer.world_size
        torch.distributed.all_gather_object(ranks, local)
        return {"ranks": ranks}

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = list(state_dict.get("ranks") or [])

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A resume at an epoch boundary: before the next epoch's data iterator draws its worker seed.
        self._restore(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # A resume mid-epoch: Lightning calls no on_train_epoch_start for the epoch it re-enters.
        self._restore(trainer)

    def _restore(self, trainer: pl.Trainer) -> None:
        if not self._pending:
            return
        ranks, self._pending = self._pending, None
        if len(ranks) != trainer.world_size:
            log.warning("resuming on %d rank(s) from a checkpoint written by %d: RNG streams start afresh",
                        trainer.world_size, len(ranks))
            return
        set_rng_state(ranks[trainer.global_rank])

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._outside_validation = rng_state()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._outside_validation is not None:
            set_rng_state(self._outside_validation)
            self._outside_validation = None


# ---- non-finite losses ------------------------------------------------------------------------------------------

class NonFiniteLossError(RuntimeError):
    """Too many optimiser steps in a row had a NaN or infinite loss."""


class NonFiniteGuard(pl.Callback):
    """Skips the optimiser step of a batch whose loss is NaN or infinite, counts it, and stops the run after
    ``max_nonfinite_steps`` such steps in a row.

    A skipped step drops the gradients before ``optimizer.step``, so weights and optimiser moments stay as they
    were; the step counter and learning-rate schedule still advance, and the EMA averages the unchanged weights
    once more. Under DDP the decision is reduced over ranks, so every rank skips (or stops) together. The total
    is logged as ``train/nonfinite_skipped`` and kept in checkpoints. Stopping raises
    :class:`NonFiniteLossError`; checkpoints already written (``last.ckpt``) hold the last good weights.

    :param max_nonfinite_steps: consecutive skipped steps that stop the run (>= 1).
    """

    def __init__(self, max_nonfinite_steps: int):
        if max_nonfinite_steps < 1:
            raise ValueError(f"callbacks.nonfinite_guard.max_nonfinite_steps must be >= 1, got {max_nonfinite_steps}")
        self.max_nonfinite_steps = int(max_nonfinite_steps)
        self.skipped = 0
        self.consecutive = 0
        self._bad_loss = False
        self._last_bad = math.nan

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if not bool(torch.isfinite(loss.detach()).all()):  # any micro-batch of an accumulated step
            self._bad_loss = True
            self._last_bad = float(loss.detach().float().flatten()[0])

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        bad, self._bad_loss = self._bad_loss, False
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            self.consecutive = 0
            return
        for group in optimizer.param_groups:  # optimisers skip parameters without a gradient
            for param in group["params"]:
                param.grad = None
        self.skipped += 1
        self.consecutive += 1
        log.warning("step %d: non-finite loss (%s), optimiser step skipped (%d in a row, %d in all)",
                    trainer.global_step, self._last_bad, self.consecutive, self.skipped)
        if self.consecutive >= self.max_nonfinite_steps:
            raise NonFiniteLossError(self._stop_message(trainer))

    def _stop_message(self, trainer: pl.Trainer) -> str:
        last = getattr(trainer.checkpoint_callback, "last_model_path", "") or ""
        kept = (f"the last good checkpoint is {last}" if last else
                "no checkpoint had been written yet")
        return (f"{self.consecutive} consecutive optimiser steps had a non-finite loss (the last at step "
                f"{trainer.global_step}, loss {self._last_bad}); stopping "
                f"(callbacks.nonfinite_guard.max_nonfinite_steps={self.max_nonfinite_steps}). Nothing was saved "
                f"after the bad steps: {kept}. Look for corrupt data or lower the learning rate, then resume.")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        pl_module.log("train/nonfinite_skipped", float(self.skipped), on_step=True, on_epoch=False,
                      sync_dist=False)

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))


# ---- SLURM requeue ----------------------------------------------------------------------------------------------

REQUEUE_CHECKPOINT = "requeue.ckpt"  # in run_dir/checkpoints; never named hpc_ckpt_N (Lightning resumes those itself)


class RequeueOnSignal(pl.Callback):
    """Under SLURM: on the requeue signal (USR1, ``--signal=USR1@120``) save ``checkpoints/requeue.ckpt`` at the
    next step boundary, requeue the job (``scontrol requeue``) and stop.

    The handler only sets a flag. Lightning's own auto-requeue (turned off by the runner) saved inside the signal
    handler, i.e. in the middle of whatever step was running, and named the file ``hpc_ckpt_N``, which any later
    ``fit`` under SLURM resumes even when told to start afresh. Under DDP/FSDP the ranks agree on the flag at every
    step boundary (one boolean all-reduce), so all of them save the same step and stop together.

    :param checkpoint_dir: where ``requeue.ckpt`` goes (``run_dir/checkpoints``).
    """

    def __init__(self, checkpoint_dir: str, signum: int = signal.SIGUSR1) -> None:
        self.checkpoint_dir = checkpoint_dir
        self.signum = signum
        self.requested = False
        self._previous: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            self._previous = signal.signal(self.signum, self._on_signal)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.requested = True  # nothing else here: the step in flight finishes first

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        requested = self.requested
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not requested:
            return
        path = os.path.join(self.checkpoint_dir, REQUEUE_CHECKPOINT)
        log.warning("requeue signal: saving %s at step %d, requeuing the job and stopping", path,
                    trainer.global_step)
        trainer.save_checkpoint(path, weights_only=False)  # the full training state
        if trainer.is_global_zero:
            _scontrol_requeue()
        trainer.should_stop = True
        self.requested = False


def _scontrol_requeue() -> None:
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ.get("SLURM_JOB_ID")
    if not job:
        log.warning("requeue signal outside a SLURM job (no SLURM_JOB_ID): the checkpoint is saved, nothing requeued")
        return
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        log.warning("scontrol not found: job %s saved but not requeued", job)
        return
    if result.returncode != 0:
        log.warning("scontrol requeue %s failed (%d): %s", job, result.returncode, result.stderr.strip())
    else:
        log.info("requeued SLURM job %s", job)


# ---- what a resume assumes about the data ----------------------------------------------------------------------

def data_fingerprint(trainer: pl.Trainer) -> dict:
    """What decides which batches a run trains on beyond the seed: ranks, per-rank batch, accumulation, loader
    workers, data mode, epoch length and the training shard list (count and hash). Plain values only."""
    data = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning's data connector, undeclared
    urls = [str(u) for u in getattr(data, "train_urls", None) or []]
    shards_hash = hashlib.sha256("\n".join(urls).encode()).hexdigest()[:12]
    return {"world_size": int(trainer.world_size), "data.batch_size": getattr(data, "batch_size", None),
            "trainer.accumulate_grad_batches": int(trainer.accumulate_grad_batches),
            "data.num_workers": getattr(data, "num_workers", None), "data.mode": getattr(data, "mode", None),
            "data.batches_per_epoch": getattr(data, "batches_per_epoch", None),
            "data.seed": getattr(data, "seed", None),
            "data.train_shards": f"{len(urls)} shards, sha256 {shards_hash}"}


def data_changes(saved: dict, current: dict) -> list[str]:
    """``"key: saved -> current"`` for every entry of the fingerprint that differs."""
    return [f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in current if saved.get(key) != current[key]]


class DataFingerprint(pl.Callback):
    """Stores :func:`data_fingerprint` in every checkpoint and compares it on resume.

    An exact resume (docs/reliability.md) replays the data stream of the interrupted run; another world size,
    batch size, worker count or shard list gives another stream, silently. A resume that changes any of them is
    refused with a message naming each change, or, with ``resume_allow_data_change=true``, continues with a warning.

    :param allow_change: continue with a warning instead of refusing.
    """

    def __init__(self, allow_change: bool) -> None:
        self.allow_change = bool(allow_change)
        self._current: dict | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._current = data_fingerprint(trainer)  # Lightning restores callback states after setup

    def state_dict(self) -> dict:
        return dict(self._current or {})

    def load_state_dict(self, state_dict: dict) -> None:
        changes = data_changes(state_dict, self._current or {})
        if not changes:
            return
        what = "; ".join(changes)
        if not self.allow_change:
            raise ConfigError(f"resume: the data set-up differs from the checkpoint's ({what}), so the resumed run "
                              f"would not train on the batches the interrupted one would have. Resume with the old "
                              f"values, or set resume_allow_data_change=true to continue anyway")
        log.warning("resuming with a changed data set-up (%s): allowed by resume_allow_data_change, but the run "
                    "no longer replays the interrupted one's batches", what)


# ---- files a validation's results go to ------------------------------------------------------------------------

class MetricsFile(pl.Callback):
    """Merges each validation's summary (``UnclipModule.validation_metrics``, set by the module) into
    ``run_dir/metrics.json`` with the ``global_step``, on rank 0, after every validation but the sanity check.

    :param run_dir: the run's folder (None: write nothing).
    """

    def __init__(self, run_dir: str | None) -> None:
        self.run_dir = run_dir

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not isinstance(pl_module, UnclipModule):
            return
        metrics, pl_module.validation_metrics = pl_module.validation_metrics, {}  # each summary is written once
        if self.run_dir is None or trainer.sanity_checking or not trainer.is_global_zero or not metrics:
            return
        path = Path(self.run_dir) / "metrics.json"
        current = json.loads(path.read_text()) if path.exists() else {}
        current.update({k: float(v) if hasattr(v, "item") else v for k, v in metrics.items()})
        current["global_step"] = int(trainer.global_step)
        atomic_write_json(path, current)


class SampleGrids(pl.Callback):
    """Writes the sample grid a module computed at a validation (``UnclipModule.sample_grid``) to
    ``run_dir/samples/step<global step>.png`` (captions, when any, beside it as ``.txt``) and hands it to the
    loggers that take images (W&B's ``val/samples``); rank 0 only.

    :param run_dir: the run's folder (None: loggers only).
    """

    def __init__(self, run_dir: str | None) -> None:
        self.run_dir = run_dir

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not isinstance(pl_module, UnclipModule) or pl_module.sample_grid is None:
            return
        grid, pl_module.sample_grid = pl_module.sample_grid, None
        if not trainer.is_global_zero:
            return
        from torchvision.utils import make_grid, save_image

        image = make_grid((grid.rows + 1) / 2, nrow=grid.columns, padding=1)  # [3, H, W] in [0, 1]
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="val/samples", images=[image], step=trainer.global_step)
        if self.run_dir is None:
            return
        path = Path(self.run_dir) / "samples" / f"step{trainer.global_step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(image, path)
        if grid.captions:
            atomic_write_text(path.with_suffix(".txt"), "\n".join(grid.captions) + "\n")
        log.info("sample grid written to %s", path)


class ClipExport(pl.Callback):
    """Writes a trained CLIP as an open_clip-loadable export (``CLIPModule.export``: config JSON + safetensors)
    to ``run_dir/clip_export`` at the end of training, on rank 0; other stages write nothing.

    :param run_dir: the run's folder (None: write nothing).
    """

    def __init__(self, run_dir: str | None) -> None:
        self.run_dir = run_dir

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.run_dir is None or not trainer.is_global_zero or not isinstance(pl_module, CLIPModule):
            return
        path = pl_module.export(Path(self.run_dir) / CLIP_EXPORT_DIR)
        log.info("exported CLIP to %s", path)
