"""Shared by the reliability tests: micro-sized stage configs, fault-injecting callbacks, and a runner for
``unclip-train`` in a child process that the test can SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from tests.conftest import EMOJI, ROOT

# A CLIP of ~1.7M parameters (most of it the 49408-token embedding) at 32px: a step takes milliseconds.
MICRO_CLIP = ["experiment=emoji_clip_tiny", "model.embed_dim=32", "model.vision.image_size=32",
              "model.vision.width=32", "model.vision.layers=1", "model.vision.head_width=16", "model.text.width=32",
              "model.text.layers=1", "model.text.heads=2"]
# A one-block prior on the tiny CLIP export (fixture tiny_clip_export), embedding 64px emoji on the fly.
MICRO_PRIOR = ["experiment=emoji_prior_tiny", "model.width=32", "model.depth=1", "model.heads=2",
               "module.val_sampling.steps=2", "module.val_sampling.candidates=1"]
QUICK = ["logger=none", "cpu_threads=1", "data.num_workers=0", "data.shuffle_buffer=32",
         "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false", "module.scheduler.warmup_steps=2",
         f"data.train_shards='{EMOJI}/train/{{00000..00003}}.tar'", f"data.val_shards={EMOJI}/val/00000.tar"]


class HangAt(pl.Callback):
    """Before the step after ``step``: touch ``marker`` and wait to be killed (a stand-in for a machine failure
    at a known point)."""

    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            Path(self.marker).touch()
            time.sleep(600)


class CrashAt(pl.Callback):
    """Raise before the step after ``step`` (a crash in-process, cheaper than a child process)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"injected crash at step {self.step}")


class PoisonBatches(pl.Callback):
    """Fill the images of the batches at the given global steps (or from ``from_step`` on) with NaN."""

    def __init__(self, steps: list[int], from_step: int | None):
        self.steps, self.from_step = set(steps), from_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if step in self.steps or (self.from_step is not None and step >= self.from_step):
            batch["image"].fill_(float("nan"))


def child_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), UNCLIP_EMOJI_ROOT=str(EMOJI), OMP_NUM_THREADS="1",
               HYDRA_FULL_ERROR="1")
    return env


def run_until_marker(args: list[str], marker: Path, log: Path, timeout: float = 240) -> None:
    """Start ``python args...`` in the repository, wait for ``marker`` to appear, then SIGKILL the process."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=child_env(), stdout=out,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while not marker.exists():
                if proc.poll() is not None:
                    raise AssertionError(f"child exited ({proc.returncode}) before {marker.name}:\n"
                                         f"{log.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"no {marker.name} after {timeout}s:\n{log.read_text()[-3000:]}")
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


def tensors_equal(a: dict, b: dict, rtol: float = 1e-5, atol: float = 1e-7) -> None:
    """Every tensor of two (nested) state dicts matches within float tolerance."""
    assert a.keys() == b.keys(), set(a) ^ set(b)
    for key in a:
        if isinstance(a[key], dict):
            tensors_equal(a[key], b[key], rtol, atol)
        elif isinstance(a[key], torch.Tensor):
            torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=lambda m, key=key: f"{key}: {m}")
        else:
            assert a[key] == b[key], key


class CrashInShardedSave(pl.Callback):
    """Make the ``nth`` torch.distributed.checkpoint save fail after every shard is written and before its
    ``.metadata`` index: a machine lost in the middle of an FSDP checkpoint."""

    def __init__(self, nth: int):
        self.nth = nth

    def setup(self, trainer, pl_module, stage) -> None:  # patches for the rest of the process
        from torch.distributed.checkpoint.filesystem import _FileSystemWriter

        real, calls = _FileSystemWriter.finish, [0]

        def finish(writer, *args, **kwargs):
            calls[0] += 1
            if calls[0] == self.nth:
                raise RuntimeError(f"injected crash in sharded save {self.nth}")
            return real(writer, *args, **kwargs)

        _FileSystemWriter.finish = finish


def made_shards(root: Path) -> list[str]:
    """Four train shards and one val shard of 32 small images captioned with their keys (no emoji data needed);
    the data overrides of QUICK that point at them."""
    from tests.data.shard_helpers import write_clean_shards

    train = write_clean_shards(root / "train", 4, 32, size=(32, 32))
    val = write_clean_shards(root / "val", 1, 32, size=(32, 32))
    return [o for o in QUICK if not o.startswith(("data.train_shards", "data.val_shards"))] + [
        f"data.train_shards=[{','.join(train)}]", f"data.val_shards=[{val[0]}]"]


class SignalAt(pl.Callback):
    """Send this process ``signum`` (default SIGUSR1, SLURM's requeue signal) before the step after ``step``."""

    def __init__(self, step: int, signum: int = signal.SIGUSR1):
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


SLURM_ENV = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "unclip", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}  # one task of a batch job, as srun sets it


def fake_slurm(monkeypatch, bin_dir: Path) -> Path:
    """SLURM's variables for one task, and an ``scontrol`` on PATH that records its arguments; returns that log."""
    for key, value in SLURM_ENV.items():
        monkeypatch.setenv(key, value)
    bin_dir.mkdir(parents=True, exist_ok=True)
    calls = bin_dir / "scontrol.calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return calls
