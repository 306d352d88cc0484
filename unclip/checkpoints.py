"""Safe checkpoint reading and atomic writing shared by every stage.

Every unclip checkpoint carries ``checkpoint["unclip"] = {"stage", "version", "git_commit", ...}``
(written by ``UnclipModule.on_save_checkpoint``). Loading never unpickles arbitrary objects; writing goes
to a temporary file in the same folder that is renamed over the target, so a kill never leaves half a file.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_KEY = "unclip"
_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")


def _temp_path(path: Path) -> Path:
    # Hidden, and named by writer pid: a crashed writer's leftover is recognisable and never globbed as *.ckpt.
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync it, then ``os.replace`` it over ``path``.

    A reader, or a run resumed after a kill at any moment, sees the previous file or the new one, never a partial
    one: rename within one folder is atomic on POSIX file systems (unlike a copy from /tmp across devices).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_path(path)
    try:
        with open(temp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable (a power cut after it keeps the new name)
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename is still atomic
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that writers killed mid-save left in ``folder`` (their pid is gone).

    :return: the files removed.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TEMP.match(entry.name)
        if match is None or not entry.is_file() or _pid_alive(int(match["pid"])):
            continue
        entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def read_checkpoint(path: str | Path) -> dict:
    """``torch.load(path, weights_only=True)`` on the CPU, refusing files that hold pickled objects.

    :raises ValueError: for a file with pickled Python objects, or that is not a dict.
    """
    try:
        try:  # mmap: a multi-GB checkpoint is paged in as read, not copied up front
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) format cannot be mapped; plain loading is as safe
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"refusing to load {path}: it contains pickled Python objects, not only tensors and "
                         f"plain containers (unclip only loads with torch.load(weights_only=True)). "
                         f"Detail: {str(exc).splitlines()[0]}") from exc
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a checkpoint dict, got {type(checkpoint).__name__}")
    return checkpoint


def stage_metadata(checkpoint: dict, path: str | Path, expected_stage: str) -> dict:
    """The checkpoint's unclip metadata, refusing another stage's checkpoint with a message naming both."""
    meta = checkpoint.get(CHECKPOINT_KEY)
    if not isinstance(meta, dict) or "stage" not in meta:
        raise ValueError(f"{path} is not an unclip checkpoint (no checkpoint['{CHECKPOINT_KEY}']['stage'])")
    check_stage(meta["stage"], path, expected_stage)
    return meta


def check_stage(stage: str | None, path: str | Path, expected_stage: str) -> None:
    """Refuse another stage's checkpoint, naming both stages."""
    if stage != expected_stage:
        raise ValueError(f"{path} is a '{stage}' stage checkpoint; a '{expected_stage}' checkpoint is needed here")
