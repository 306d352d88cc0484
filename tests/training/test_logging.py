"""Runs a sweep can compare (unclip/training/loggers.py): the resolved config as hyperparameters, W&B name/group/tags
from config, the W&B run id in the checkpoint so a resume continues that run, a CSV log that survives a resume.

W&B runs offline for real (slow test) and its transaction log is read back record by record."""

from __future__ import annotations

import csv
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from hydra.types import RunMode
from omegaconf import OmegaConf
from pytorch_lightning.loggers import WandbLogger

from tests.conftest import compose_train
from unclip.training.loggers import CSVLogger, LoggerState, logger_kwargs, logger_state, name_sweep_job, prepare_loggers


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _log(logger: CSVLogger, steps: range, key: str) -> None:
    for step in steps:
        logger.log_metrics({key: float(step)}, step=step)
    logger.save()


def test_a_resumed_csv_log_keeps_earlier_rows_and_drops_the_steps_it_redoes(tmp_path):
    first = CSVLogger(tmp_path, name="logs", version="")
    _log(first, range(6), "train/loss")  # steps 4 and 5 were logged after the last checkpoint (step 4)
    path = tmp_path / "logs" / "metrics.csv"
    assert [r["step"] for r in _rows(path)] == ["0", "1", "2", "3", "4", "5"]

    resumed = CSVLogger(tmp_path, name="logs", version="")
    resumed.continue_log = True
    _log(resumed, range(4, 7), "val/loss")  # a new column too: the header grows, old rows stay
    rows = _rows(path)
    assert [r["step"] for r in rows] == ["0", "1", "2", "3", "4", "5", "6"]
    assert [r["train/loss"] for r in rows[:4]] == ["0.0", "1.0", "2.0", "3.0"] and rows[4]["train/loss"] == ""
    assert [r["val/loss"] for r in rows[4:]] == ["4.0", "5.0", "6.0"]

    fresh = CSVLogger(tmp_path, name="logs", version="")  # not a resume: Lightning's behaviour, a new file
    _log(fresh, range(1), "train/loss")
    assert [r["step"] for r in _rows(path)] == ["0"]


def test_every_logger_gets_the_resolved_config_as_hyperparameters(tmp_path):
    cfg = compose_train(["stage=decoder", f"run_dir={tmp_path}", "logger=csv", "clip_ckpt=some/clip"])
    logger = CSVLogger(tmp_path, name="logs", version="")
    prepare_loggers([logger], cfg, resuming=False)
    hparams = yaml.safe_load((tmp_path / "logs" / "hparams.yaml").read_text())
    assert hparams["stage"] == "decoder" and hparams["run_dir"] == str(tmp_path)
    assert hparams["module"]["_target_"].endswith("DecoderModule") and hparams["clip_ckpt"] == "some/clip"
    assert hparams["model"] == OmegaConf.to_container(cfg.model, resolve=True)


def test_the_wandb_run_id_goes_into_the_checkpoint_and_back_into_the_logger(tmp_path):
    wandb = WandbLogger(id="abc123xy", offline=True, save_dir=str(tmp_path))  # no run started: version is the id
    checkpoint = {"state_dict": {}, "global_step": 4}
    LoggerState().on_save_checkpoint(SimpleNamespace(loggers=[wandb]), None, checkpoint)
    torch.save(checkpoint, tmp_path / "last.ckpt")
    state = logger_state(str(tmp_path / "last.ckpt"))
    assert state == {"wandb_id": "abc123xy"}
    node = compose_train([f"run_dir={tmp_path / 'my_run'}", "logger=wandb"]).logger.wandb
    assert logger_kwargs(node, str(tmp_path / "my_run"), state) == {"name": "my_run", "id": "abc123xy"}
    assert logger_kwargs(node, str(tmp_path / "my_run"), {}) == {"name": "my_run"}
    assert OmegaConf.to_container(node, resolve=True)["tags"] == ["clip"]
    torch.save({"state_dict": {}}, tmp_path / "old.ckpt")  # a checkpoint from before: a new run
    assert logger_state(str(tmp_path / "old.ckpt")) == {}


def test_a_multirun_job_is_named_by_its_overrides_and_grouped_by_its_sweep(tmp_path):
    cfg = compose_train([f"run_dir={tmp_path}", "logger=wandb"])
    job = SimpleNamespace(mode=RunMode.MULTIRUN, sweep=SimpleNamespace(dir="multirun/prior/t0"),
                          job=SimpleNamespace(override_dirname="module.lr=0.001,seed=1", num=3))
    name_sweep_job(cfg, job)
    assert (cfg.logger.wandb.group, cfg.logger.wandb.name) == ("multirun/prior/t0", "module.lr=0.001,seed=1")
    single = compose_train([f"run_dir={tmp_path}", "logger=wandb", "logger.wandb.group=mine"])
    name_sweep_job(single, SimpleNamespace(mode=RunMode.RUN))
    assert (single.logger.wandb.group, single.logger.wandb.name) == ("mine", None)


def wandb_records(path: Path) -> list:
    """The protobuf records of a W&B transaction log (``run-<id>.wandb``): a 7-byte file header, then 32 KiB
    blocks of chunks, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, chunk, records = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # no room for a chunk header: the rest of the block is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


@pytest.mark.slow
def test_a_resumed_run_continues_its_wandb_run_and_its_csv_log(tmp_path, monkeypatch):
    import json

    import wandb

    from unclip.training.runner import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"

    def fit(steps: int, *extra: str) -> None:
        train(compose_train(["experiment=demo_clip_tiny", f"run_dir={run_dir}", "logger=[csv,wandb]",
                             f"trainer.max_steps={steps}", "trainer.val_check_interval=2",
                             "trainer.limit_val_batches=1", "callbacks.checkpoint.every_n_train_steps=2",
                             "trainer.log_every_n_steps=1",
                             "data.batch_size=4", "trainer.enable_progress_bar=false", *extra]))
        wandb.finish()

    fit(2)
    wandb_id = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["loggers"]["wandb_id"]
    fit(4, "resume=true")
    logs = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert [p.name for p in logs] == [f"run-{wandb_id}.wandb"] * 2  # two sessions of one W&B run
    for log in logs:
        records = wandb_records(log)
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert run.run_id == wandb_id and run.display_name == "run" and list(run.tags) == ["clip"]
        config = {u.key: json.loads(u.value_json) for r in records if r.WhichOneof("record_type") == "config"
                  for u in r.config.update}
        assert config["stage"] == "clip" and config["run_dir"] == str(run_dir)
        assert config["data"]["batch_size"] == 4 and "optimizer" in config["module"]
    steps = [int(r["step"]) for r in _rows(run_dir / "logs" / "metrics.csv") if r["train/loss"]]
    assert steps == [0, 1, 2, 3]
