"""FSDP sharded checkpoints are swapped in whole: a save that dies after writing its shards but before its index
leaves ``last.ckpt`` the previous complete checkpoint (Lightning wrote the new shards over the old ones in place,
under the old index), and the next run clears the dead save's folder and continues."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT
from tests.reliability.helpers import MICRO_PRIOR, CrashInShardedSave, child_env, made_shards
from unclip.training.sharded import SafeFSDPStrategy, consolidate_checkpoint, is_sharded_checkpoint, steps_folder

# One process over gloo is enough for the save path (the two-rank run is tests/scaleout/test_distributed.py).
FSDP = ["trainer=fsdp_cpu", "trainer.devices=1", "data.batch_size=8", "trainer.limit_val_batches=0",
        "callbacks.checkpoint.every_n_train_steps=2"]


def run(overrides: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unclip.train", *overrides], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=600, check=False)


class OneRank(SafeFSDPStrategy):
    """The strategy's save path as rank 0 of one, without a Trainer (collectives are no-ops)."""

    global_rank, is_global_zero = 0, True

    def __init__(self) -> None:
        self._state_dict_type = "sharded"

    def broadcast(self, obj, src=0):
        return obj

    def barrier(self, name=None) -> None:
        pass


def _checkpoint(step: int) -> dict:
    return {"state_dict": {"w": torch.full((4, 3), float(step)), "b": torch.full((5,), float(step))},
            "optimizer_states": [], "global_step": step}


@pytest.mark.filterwarnings("ignore:.*torch.distributed is disabled")
def test_a_save_that_dies_before_its_index_keeps_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    from torch.distributed.checkpoint.filesystem import _FileSystemWriter

    path, strategy = tmp_path / "last.ckpt", OneRank()
    strategy.save_checkpoint(_checkpoint(2), path)
    monkeypatch.setattr(_FileSystemWriter, "finish", _FileSystemWriter.finish)  # restored after the test
    CrashInShardedSave(nth=1).setup(None, None, "fit")
    with pytest.raises(BaseException, match="injected crash in sharded save 1"):  # torch's CheckpointException
        strategy.save_checkpoint(_checkpoint(4), path)
    kept = consolidate_checkpoint(path)
    assert kept["global_step"] == 2 and torch.equal(kept["state_dict"]["w"], torch.full((4, 3), 2.0))
    strategy.save_checkpoint(_checkpoint(6), path)  # clears the dead save's folder, then swaps
    assert path.is_symlink() and consolidate_checkpoint(path)["state_dict"]["b"].eq(6).all()
    assert list(steps_folder(path).iterdir()) == [path.resolve()]
    strategy.remove_checkpoint(path)  # ModelCheckpoint's rotation: the link and its folders
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*torch.distributed is disabled")
def test_an_fsdp_run_killed_in_a_sharded_save_resumes_from_the_previous_checkpoint(tmp_path, tiny_clip_export):
    run_dir = tmp_path / "run"
    base = [*MICRO_PRIOR, *made_shards(tmp_path / "shards"), *FSDP, f"run_dir={run_dir}",
            f"clip_ckpt={tiny_clip_export}"]
    # Saves at step 2: step00000002.ckpt, last.ckpt; at step 4: step00000004.ckpt, then last.ckpt dies (4th).
    crashed = run([*base, "trainer.max_steps=4",
                   "+callbacks.crash._target_=tests.reliability.helpers.CrashInShardedSave", "+callbacks.crash.nth=4"])
    assert crashed.returncode != 0 and "injected crash in sharded save 4" in crashed.stdout + crashed.stderr
    checkpoints = run_dir / "checkpoints"
    last = consolidate_checkpoint(checkpoints / "last.ckpt")
    step4 = consolidate_checkpoint(checkpoints / "step00000004.ckpt")
    assert last["global_step"] == 2 and step4["global_step"] == 4
    changed = [k for k, v in step4["state_dict"].items() if not torch.equal(v, last["state_dict"][k])]
    assert changed, "last.ckpt holds the step-2 weights, not step-4 shards under the step-2 index"
    assert len(list(steps_folder(checkpoints / "last.ckpt").iterdir())) == 2, "the dead save's folder is left"

    resumed = run([*base, "trainer.max_steps=6", "resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert is_sharded_checkpoint(checkpoints / "last.ckpt") and (checkpoints / "last.ckpt").is_symlink()
    assert consolidate_checkpoint(checkpoints / "last.ckpt")["global_step"] == 6
    kept = list(steps_folder(checkpoints / "last.ckpt").iterdir())
    assert kept == [(checkpoints / "last.ckpt").resolve()], "only the complete checkpoint last.ckpt points at is kept"
    assert sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith(".")) == ["last.ckpt",
                                                                                           "step00000006.ckpt"]
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith(".")) == [".last.ckpt.steps",
                                                                                       ".step00000006.ckpt.steps"]
