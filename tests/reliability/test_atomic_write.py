"""One atomic writer for every file unclip writes in place of another (checkpoints, embeddings, sidecars, feature
caches): the result's permissions follow the umask like a plain open(), a failed write keeps the old file, and a
killed writer's leftover is never mistaken for a checkpoint by its name."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from unclip.checkpoints import (
    atomic_save,
    atomic_write_json,
    read_checkpoint,
    remove_stale_temporaries,
)


def _embed_sidecar(folder: Path) -> Path:
    from unclip.embed import write_sidecar

    path = folder / "train__00000.json"
    write_sidecar(path, {"shard": "x", "samples": 1})
    return path


def _embeddings(folder: Path) -> Path:
    from unclip.data.embeddings import ARRAYS, write_shard_embeddings

    path = folder / "train__00000.npz"
    shapes = {"image_embed": (1, 4), "text_embed": (1, 4), "text_ids": (1, 2), "text_tokens": (1, 2, 3),
              "text_mask": (1, 2)}
    write_shard_embeddings(path, ["k"], {name: np.zeros(shapes[name], np.float16) for name in ARRAYS})
    return path


def _embeddings_meta(folder: Path) -> Path:
    from unclip.data.embeddings import META_FILE, write_meta

    write_meta(folder, {"clip_hash": "abc"})
    return folder / META_FILE


def _feature_cache(folder: Path) -> Path:
    from unclip.evaluation.real_data import store_cached

    store_cached(folder, "key", torch.zeros(2, 3))
    return folder / "key.npy"


def _checkpoint(folder: Path) -> Path:
    atomic_save({"step": torch.tensor(1)}, folder / "last.ckpt")
    return folder / "last.ckpt"


WRITERS: dict[str, Callable[[Path], Path]] = {"checkpoint": _checkpoint, "embeddings": _embeddings,
                                              "embeddings meta.json": _embeddings_meta, "embed sidecar": _embed_sidecar,
                                              "eval feature cache": _feature_cache}


@pytest.mark.parametrize("umask", [0o022, 0o002])
@pytest.mark.parametrize("writer", list(WRITERS))
def test_written_files_get_the_mode_a_plain_open_gives(writer, umask, tmp_path):
    plain = tmp_path / "plain"
    old = os.umask(umask)
    try:
        open(plain, "w").close()
        path = WRITERS[writer](tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~umask, writer
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temporary file is left"


def test_json_writer_replaces_the_file_and_keeps_it_on_failure(tmp_path):
    path = tmp_path / "meta.json"
    atomic_write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_a_killed_writers_leftover_is_not_read_as_a_lightning_hpc_checkpoint_version(tmp_path):
    """Lightning numbers SLURM checkpoints by the digits of every name holding ``hpc_ckpt_`` in the run folder: a
    leftover named after its target (``.hpc_ckpt_1.ckpt.tmp-<pid>``) read as version 1<pid>, so the requeued job
    looked for ``hpc_ckpt_1<pid>.ckpt``. The leftover is also removed once its writer is gone."""
    from pytorch_lightning.trainer.connectors.checkpoint_connector import (
        _CheckpointConnector,
    )

    code = ("import os, sys, torch; from unclip.checkpoints import atomic_save\n"
            "torch.save = lambda obj, f: (f.write(b'half'), f.flush(), os._exit(9))\n"
            "atomic_save({}, sys.argv[1])\n")
    killed = subprocess.run(check=False, args=[sys.executable, "-c", code, str(tmp_path / "hpc_ckpt_1.ckpt")],
                            cwd=Path(__file__).parents[2],
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert killed.returncode == 9
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and not (tmp_path / "hpc_ckpt_1.ckpt").exists(), left
    version = _CheckpointConnector._CheckpointConnector__max_ckpt_version_in_folder  # what Lightning's hpc resume uses
    assert version(tmp_path, "hpc_ckpt_") is None, left
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == left and not any(tmp_path.iterdir())
    atomic_save({"step": torch.tensor(3)}, tmp_path / "hpc_ckpt_1.ckpt")
    assert version(tmp_path, "hpc_ckpt_") == 1 and int(read_checkpoint(tmp_path / "hpc_ckpt_1.ckpt")["step"]) == 3
