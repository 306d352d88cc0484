"""A resume whose data set-up differs from the checkpoint's (world size, per-rank batch, workers, shard list, ...)
is refused with a message naming each change, or continues with a warning under resume_allow_data_change=true."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from tests.conftest import compose_train
from tests.reliability.helpers import MICRO_CLIP, made_shards
from unclip.checkpoints import read_checkpoint
from unclip.config import ConfigError
from unclip.training.callbacks import DataFingerprint, data_fingerprint
from unclip.training.runner import train

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers", "ignore:.*LeafSpec")


def _trainer(world_size: int = 2, urls=("/d/0.tar", "/d/1.tar"), **data) -> SimpleNamespace:
    data = {"batch_size": 8, "num_workers": 2, "mode": "epoch", "batches_per_epoch": None, "seed": 0, **data}
    return SimpleNamespace(world_size=world_size, accumulate_grad_batches=1,
                           datamodule=SimpleNamespace(train_urls=list(urls), **data))


def test_each_change_is_named_and_refused_unless_allowed(caplog):
    saved = data_fingerprint(_trainer())
    guard = DataFingerprint(allow_change=False)
    guard.setup(_trainer(), None, "fit")
    guard.load_state_dict(saved)  # the same set-up resumes
    guard.setup(_trainer(world_size=1, urls=("/d/0.tar", "/d/1.tar", "/d/2.tar"), num_workers=4), None, "fit")
    with pytest.raises(ConfigError) as refused:
        guard.load_state_dict(saved)
    message = str(refused.value)
    for change in ("world_size: 2 -> 1", "data.num_workers: 2 -> 4", "data.train_shards: '2 shards",
                   "resume_allow_data_change=true"):
        assert change in message, change
    assert "data.batch_size" not in message and "data.mode" not in message
    allowed = DataFingerprint(allow_change=True)
    allowed.setup(_trainer(batch_size=4), None, "fit")
    with caplog.at_level(logging.WARNING, logger="unclip.training.callbacks"):
        allowed.load_state_dict(saved)
    assert "data.batch_size: 8 -> 4" in caplog.text


def test_a_resume_with_another_batch_size_is_refused_before_training(tmp_path, caplog):
    run_dir = tmp_path / "run"
    base = [*MICRO_CLIP, *made_shards(tmp_path / "shards"), f"run_dir={run_dir}", "trainer.limit_val_batches=0",
            "callbacks.checkpoint.every_n_train_steps=2"]
    train(compose_train([*base, "data.batch_size=8", "trainer.max_steps=2"]))
    last = run_dir / "checkpoints" / "last.ckpt"
    assert read_checkpoint(last)["callbacks"]["DataFingerprint"]["data.batch_size"] == 8
    with pytest.raises(ConfigError, match=r"data.batch_size: 8 -> 4.*resume_allow_data_change"):
        train(compose_train([*base, "data.batch_size=4", "trainer.max_steps=3", "resume=true"]))
    assert read_checkpoint(last)["global_step"] == 2, "nothing was trained"
    with caplog.at_level(logging.WARNING, logger="unclip.training.callbacks"):
        out = train(compose_train([*base, "data.batch_size=4", "trainer.max_steps=3", "resume=true",
                                   "resume_allow_data_change=true"]))
    assert "data.batch_size: 8 -> 4" in caplog.text
    assert read_checkpoint(out["last_checkpoint"])["global_step"] == 3
