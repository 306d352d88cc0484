"""A sharded (FSDP) checkpoint folder from elsewhere runs no code: its ``.metadata`` index and its non-tensor
entries are pickles, read here by restricted readers, through scripts/consolidate_checkpoint.py and before a
resume (SafeFSDPStrategy.load_checkpoint calls verify_sharded_checkpoint)."""

from __future__ import annotations

import importlib.util
import pathlib
import pickle
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import ROOT


class Touch:
    """Unpickling this creates ``marker``: the stand-in for arbitrary code."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def sharded_folder(folder: pathlib.Path, extra: dict | None = None) -> pathlib.Path:
    """A one-process torch.distributed.checkpoint folder in Lightning's layout (shards, .metadata, meta.pt)."""
    import torch.distributed.checkpoint as dcp

    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)},
             "optimizer_0": {"state": {"w": {"step": torch.tensor(2.0)}},
                             "param_groups": [{"lr": 0.1, "params": ["w"]}]},
             **(extra or {})}
    dcp.save(state, checkpoint_id=folder, no_dist=True)
    torch.save({"global_step": 2, "unclip": {"stage": "prior"}}, folder / "meta.pt")
    return folder


def consolidate(folder: pathlib.Path, out: pathlib.Path, capsys) -> SimpleNamespace:
    """scripts/consolidate_checkpoint.py's main, in this process: exit code and stderr."""
    spec = importlib.util.spec_from_file_location("consolidate_checkpoint",
                                                  ROOT / "scripts" / "consolidate_checkpoint.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    code = script.main([str(folder), str(out)])
    return SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)


@pytest.mark.filterwarnings("ignore:.*torch.distributed is disabled")
def test_a_plain_sharded_folder_consolidates(tmp_path, capsys):
    from unclip.checkpoints import read_checkpoint

    folder = sharded_folder(tmp_path / "ok")
    result = consolidate(folder, tmp_path / "full.ckpt", capsys)
    assert result.returncode == 0, result.stderr
    full = read_checkpoint(tmp_path / "full.ckpt")
    assert torch.equal(full["state_dict"]["w"], torch.arange(6.0).reshape(2, 3)) and full["global_step"] == 2
    assert full["optimizer_states"][0]["param_groups"][0]["lr"] == 0.1


@pytest.mark.filterwarnings("ignore:.*torch.distributed is disabled")
def test_a_crafted_metadata_index_is_refused_and_runs_nothing(tmp_path, capsys):
    from unclip.training.sharded import verify_sharded_checkpoint

    folder, marker = sharded_folder(tmp_path / "evil"), tmp_path / "ran"
    (folder / ".metadata").write_bytes(pickle.dumps(Touch(marker)))
    result = consolidate(folder, tmp_path / "full.ckpt", capsys)
    assert not marker.exists(), "unpickling the index ran code"
    assert result.returncode == 1 and "refusing to read" in result.stderr and "pathlib.Path.touch" in result.stderr
    assert not (tmp_path / "full.ckpt").exists()
    with pytest.raises(ValueError, match=r"refusing to read .*\.metadata.*is not part of a torch.distributed"):
        verify_sharded_checkpoint(folder)  # what a resume under trainer=fsdp runs first
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:.*torch.distributed is disabled")
def test_a_crafted_non_tensor_entry_is_refused_and_runs_nothing(tmp_path, capsys):
    from unclip.training.sharded import verify_sharded_checkpoint

    marker = tmp_path / "ran"
    folder = sharded_folder(tmp_path / "evil", {"extra": Touch(marker)})  # stored as a pickled bytes entry
    assert not marker.exists()
    result = consolidate(folder, tmp_path / "full.ckpt", capsys)
    assert not marker.exists(), "loading the entry ran code"
    assert result.returncode == 1 and "refusing to load entry 'extra'" in result.stderr
    with pytest.raises(ValueError, match="refusing to load entry 'extra'"):
        verify_sharded_checkpoint(folder)
    assert not marker.exists()
