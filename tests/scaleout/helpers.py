"""Running ``python -m unclip.train`` in subprocesses for the scale-out tests (tiny presets, 2 steps)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import EMOJI, ROOT

# Two val shards, so each of two ranks validates one batch (ranks with unequal val batches is another test's case).
VAL = f"data.val_shards=[{EMOJI}/val/00000.tar,{EMOJI}/train/00003.tar]"
TINY = ["trainer.max_steps=2", "trainer.val_check_interval=2", "callbacks.checkpoint.every_n_train_steps=2",
        "data.batch_size=4", "data.num_workers=0", "data.batches_per_epoch=2", "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false", "cpu_threads=1", "logger=csv", VAL]
EXPERIMENTS = {"clip": "emoji_clip_tiny", "prior": "emoji_prior_tiny", "decoder": "emoji_decoder_tiny",
               "upsampler": "emoji_upsampler_tiny"}
STAGE_EXTRA = {"decoder": ["module.val_samples.num=2"], "upsampler": ["module.val_samples.num=2"]}


def env() -> dict[str, str]:
    """The test's environment, with this checkout importable from any working directory."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "UNCLIP_EMOJI_ROOT": str(EMOJI), "OMP_NUM_THREADS": "1"}


def train_cmd(stage: str, run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "unclip.train", f"experiment={EXPERIMENTS[stage]}", f"run_dir={run_dir}", *TINY,
            *STAGE_EXTRA.get(stage, []), *overrides]


def start(cmd: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """Start a command with its output in ``log`` (read back on failure)."""
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=log.open("w"), stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout: float) -> tuple[int, str]:
    """Wait for ``proc`` (killed after ``timeout`` s); return its exit code and the end of its output."""
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    return code, log.read_text()[-4000:]
