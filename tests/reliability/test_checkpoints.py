"""Atomic checkpoints: a run killed while writing last.ckpt leaves the previous last.ckpt loadable (and a resume
cleans up and continues); the temporary-file-and-rename writer and its clean-up on their own."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import compose_train
from tests.reliability.helpers import MICRO_CLIP, QUICK, run_until_marker
from unclip.checkpoints import atomic_save, read_checkpoint, remove_stale_temporaries
from unclip.training.runner import train

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers", "ignore:.*LeafSpec")


def test_kill_while_writing_last_ckpt_leaves_the_previous_one_loadable(emoji_root, tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "in_save"
    overrides = [*MICRO_CLIP, *QUICK, f"run_dir={run_dir}", "data.batch_size=8", "trainer.max_steps=6",
                 "callbacks.checkpoint.every_n_train_steps=2", "trainer.limit_val_batches=0"]
    # Saves at step 2 write step00000002.ckpt then last.ckpt; at step 4 the 4th torch.save (last.ckpt) is cut.
    run_until_marker(["-m", "tests.reliability.hang_in_save", str(marker), "4", *overrides], marker,
                     tmp_path / "child.log")
    checkpoints = run_dir / "checkpoints"
    partial = marker.read_text()
    assert os.path.basename(partial).startswith(".partial-"), partial  # the writer's temporary file
    assert os.path.getsize(partial) > 0
    last = read_checkpoint(checkpoints / "last.ckpt")
    assert last["global_step"] == 2 and last["unclip"]["stage"] == "clip"
    assert read_checkpoint(checkpoints / "step00000004.ckpt")["global_step"] == 4

    out = train(compose_train([*overrides, "resume=true"]))
    assert not os.path.exists(partial), "the resumed run removes the killed writer's temporary file"
    assert read_checkpoint(out["last_checkpoint"])["global_step"] == 6
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step00000006.ckpt"]


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot be saved")


def test_a_failed_save_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_save({"step": torch.tensor(1)}, path)
    with pytest.raises(RuntimeError, match="cannot be saved"):
        atomic_save({"step": torch.tensor(2), "bad": Unpicklable()}, path)
    assert int(read_checkpoint(path)["step"]) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_stale_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    stale = tmp_path / f".partial-{int(dead.stdout)}-0123abcd"
    live = tmp_path / f".partial-{os.getpid()}-0123abcd"
    other = tmp_path / "step00000002.ckpt"
    for p in (stale, live, other):
        p.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])
