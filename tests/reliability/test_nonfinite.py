"""Non-finite loss guard: NaN batches skip their optimiser step (weights and optimiser moments untouched) and are
counted as train/nonfinite_skipped; max_nonfinite_steps in a row stop the run with an error naming the last good
checkpoint, which stays loadable."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import compose_train
from tests.reliability.helpers import MICRO_CLIP, QUICK
from unclip.checkpoints import read_checkpoint
from unclip.training.callbacks import NonFiniteLossError
from unclip.training.runner import train

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers", "ignore:.*LeafSpec")


def overrides(run_dir, steps: int, poison: list[int], from_step: int | None, limit: int) -> list[str]:
    return [*MICRO_CLIP, *QUICK, f"run_dir={run_dir}", "data.batch_size=8", f"trainer.max_steps={steps}",
            "callbacks.checkpoint.every_n_train_steps=2", "trainer.limit_val_batches=0",
            f"callbacks.nonfinite_guard.max_nonfinite_steps={limit}",
            "+callbacks.poison._target_=tests.reliability.helpers.PoisonBatches", f"+callbacks.poison.steps={poison}",
            f"+callbacks.poison.from_step={'null' if from_step is None else from_step}"]


def test_nan_steps_are_skipped_and_counted(emoji_root, tmp_path):
    out = train(compose_train(overrides(tmp_path / "run", steps=6, poison=[2, 3], from_step=None, limit=3)))
    assert out["metrics"]["train/nonfinite_skipped"] == 2
    ckpt = read_checkpoint(out["last_checkpoint"])
    assert ckpt["global_step"] == 6 and ckpt["callbacks"]["NonFiniteGuard"] == {"skipped": 2, "consecutive": 0}
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    # AdamW counts the updates it made to each parameter: 6 steps, of which 2 were skipped.
    steps = {float(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()}
    assert steps == {4.0}


def test_too_many_nan_steps_in_a_row_stop_the_run_keeping_the_last_good_checkpoint(emoji_root, tmp_path):
    run_dir = tmp_path / "run"
    # Steps 1-2 train (checkpoint at 2); from the 3rd batch on every loss is NaN; the 3rd in a row stops.
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive optimiser steps had a non-finite loss .*"
                                                 r"max_nonfinite_steps=3.*last good checkpoint is .*last.ckpt"):
        train(compose_train(overrides(run_dir, steps=20, poison=[], from_step=2, limit=3)))
    last = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 4  # saved after step 4: steps 3-4 were skipped, the weights are step 2's
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert {float(s["step"]) for s in last["optimizer_states"][0]["state"].values()} == {2.0}
    assert last["callbacks"]["NonFiniteGuard"]["consecutive"] == 2
