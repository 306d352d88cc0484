"""Untrusted files never run code: a checkpoint whose pickle would create a marker file is refused wherever unclip
reads checkpoints (resume, the chain, the checkpoint I/O), and a shard with pickled members (.pyd, .pickle, .pth) and
an object-dtype .npy trains and is checked without any of them being unpickled."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import compose_train
from tests.data.shard_helpers import image_bytes, npy_bytes, sample_members, write_tar
from tests.reliability.helpers import MICRO_CLIP, QUICK
from unclip.checkpoints import read_checkpoint
from unclip.config import ConfigError
from unclip.data.inspect import check_shards
from unclip.training.callbacks import SafeCheckpointIO
from unclip.training.runner import train

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers", "ignore:.*LeafSpec")


class Payload:
    """Unpickling this creates ``marker``: the proof that a load ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_the_payload_runs_code_when_unpickled(tmp_path):
    marker = tmp_path / "ran"  # the test's own premise: a plain pickle load does create the marker
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


@pytest.fixture(params=["zip", "legacy"])
def evil_checkpoint(request, tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "code_ran"
    path = tmp_path / f"evil_{request.param}.ckpt"
    checkpoint = {"state_dict": {"w": torch.zeros(2)}, "unclip": {"stage": "clip", "image_size": 32},
                  "callbacks": {"evil": Payload(marker)}, "epoch": 0, "global_step": 1}
    torch.save(checkpoint, path, _use_new_zipfile_serialization=request.param == "zip")
    return path, marker


def test_reading_a_malicious_checkpoint_is_refused(evil_checkpoint):
    path, marker = evil_checkpoint
    with pytest.raises(ValueError, match="refusing to load .* pickled Python objects"):
        read_checkpoint(path)
    with pytest.raises(ValueError, match="refusing to load"):  # whatever Lightning asks for
        SafeCheckpointIO().load_checkpoint(path, weights_only=False)
    assert not marker.exists()


def test_resuming_from_a_malicious_checkpoint_runs_no_code(evil_checkpoint, emoji_root, tmp_path):
    path, marker = evil_checkpoint
    cfg = compose_train([*MICRO_CLIP, *QUICK, f"run_dir={tmp_path / 'run'}", f"resume={path}", "trainer.max_steps=2"])
    with pytest.raises(ValueError, match="refusing to load"):
        train(cfg)
    assert not marker.exists()


@pytest.mark.parametrize("stage_overrides", [
    ["experiment=emoji_prior_tiny", "clip_ckpt={path}"],
    ["experiment=emoji_decoder_tiny", "clip_ckpt={path}"],
    ["experiment=emoji_upsampler_tiny", "decoder_ckpt={path}"],
])
def test_a_malicious_checkpoint_in_the_chain_is_refused_before_compute(stage_overrides, evil_checkpoint, emoji_root,
                                                                       tmp_path):
    path, marker = evil_checkpoint
    overrides = [o.format(path=path) for o in stage_overrides]
    with pytest.raises(ConfigError, match="refusing to load"):
        train(compose_train([*overrides, f"run_dir={tmp_path / 'run'}", "logger=none"]))
    assert not marker.exists() and not (tmp_path / "run").exists()


def malicious_shard(path: Path, marker: Path, samples: int) -> Path:
    torch_file = io.BytesIO()
    torch.save({"evil": Payload(marker)}, torch_file)
    members = []
    for i in range(samples):
        key = f"{i:06d}"
        members += sample_members(key, caption=f"a square number {i}", image=image_bytes((40 * i % 256, 90, 20)))
        members += [(f"{key}.pyd", pickle.dumps(Payload(marker))), (f"{key}.pickle", pickle.dumps(Payload(marker))),
                    (f"{key}.pth", torch_file.getvalue()),
                    (f"{key}.emb.npy", npy_bytes(np.array([Payload(marker)], dtype=object)))]
    return write_tar(path, members)


def test_a_malicious_shard_trains_and_checks_without_unpickling(emoji_root, tmp_path):
    marker = tmp_path / "code_ran"
    shard = malicious_shard(tmp_path / "00000.tar", marker, samples=8)

    report = check_shards([str(shard)], image_size=32, batch_size=4)  # unclip-data-check
    assert report["samples"] == 8
    assert {report["repaired"][f"ignored_member:{ext}"] for ext in ("pyd", "pickle", "pth")} == {8}
    assert report["repaired"]["bad_npy"] == 8

    out = train(compose_train([*MICRO_CLIP, *QUICK, f"run_dir={tmp_path / 'run'}", f"data.train_shards={shard}",
                               f"data.val_shards={shard}", "data.batch_size=4", "data.batches_per_epoch=2",
                               "trainer.max_steps=2", "trainer.limit_val_batches=0"]))
    assert read_checkpoint(out["last_checkpoint"])["global_step"] == 2
    assert not marker.exists()
