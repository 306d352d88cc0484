"""SLURM: the requeue signal saves at the next step boundary (not inside the handler), requeues and stops;
``resume=auto`` continues from that save; ``resume=false`` never lets Lightning resume an ``hpc_ckpt_N.ckpt``."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
from omegaconf import OmegaConf

from tests.conftest import compose_train
from tests.reliability.helpers import MICRO_CLIP, fake_slurm, made_shards
from unclip.checkpoints import read_checkpoint
from unclip.config import ConfigError
from unclip.training.runner import checkpoint_to_resume, train

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers", "ignore:.*LeafSpec",
                                        "ignore:.*srun")


def test_resume_false_under_slurm_refuses_a_run_dir_lightning_would_resume_by_itself(tmp_path, monkeypatch):
    from pytorch_lightning.trainer.states import TrainerFn

    fake_slurm(monkeypatch, tmp_path / "bin")
    (tmp_path / "hpc_ckpt_3.ckpt").write_bytes(b"x")
    # Why: with ckpt_path=None (what resume=false passed) Lightning picks the hpc checkpoint under SLURM.
    trainer = pl.Trainer(default_root_dir=tmp_path, logger=False, accelerator="cpu", devices=1)
    picked = trainer._checkpoint_connector._parse_ckpt_path(TrainerFn.FITTING, None, True, True)
    assert picked == str(tmp_path / "hpc_ckpt_3.ckpt")
    cfg = OmegaConf.create({"resume": False, "run_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"resume=false but run_dir=.* holds hpc_ckpt_3.ckpt.*resume=auto"):
        checkpoint_to_resume(cfg)
    monkeypatch.delenv("SLURM_NTASKS")  # outside SLURM Lightning ignores the file: a fresh start is allowed
    assert checkpoint_to_resume(cfg) is None


def test_requeue_signal_saves_at_the_next_step_boundary_requeues_and_auto_resumes(tmp_path, monkeypatch):
    calls = fake_slurm(monkeypatch, tmp_path / "bin")
    run_dir = tmp_path / "run"
    base = [*MICRO_CLIP, *made_shards(tmp_path / "shards"), f"run_dir={run_dir}", "data.batch_size=8",
            "trainer.limit_val_batches=0", "callbacks.checkpoint.every_n_train_steps=100", "trainer.max_steps=6"]
    train(compose_train([*base, "+callbacks.usr1._target_=tests.reliability.helpers.SignalAt",
                         "+callbacks.usr1.step=2"]))
    checkpoints = run_dir / "checkpoints"
    saved = read_checkpoint(checkpoints / "requeue.ckpt")
    # The signal came before step 3 ran; the handler only flagged it, so step 3 finished and was saved whole.
    assert saved["global_step"] == 3  # Lightning's handler saved step 2, in the middle of step 3
    assert read_checkpoint(checkpoints / "last.ckpt")["global_step"] == 3, "the run stopped after the save"
    assert calls.read_text().split() == ["requeue", "4242"]
    assert not list(run_dir.glob("*hpc_ckpt*")), "nothing Lightning would resume on its own"

    out = train(compose_train([*base, "resume=auto"]))  # the requeued job
    assert read_checkpoint(out["last_checkpoint"])["global_step"] == 6
