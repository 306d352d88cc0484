"""Safe checkpoint reading and atomic writing shared by every stage.

Every unclip checkpoint carries ``checkpoint["unclip"] = {"stage", "version", "git_commit", ...}``
(written by ``UnclipModule.on_save_checkpoint``). Loading never unpickles arbitrary objects; writing goes
to a temporary file in the same folder that is renamed over the target, so a kill never leaves half a file.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

CHECKPOINT_KEY = "unclip"
# A writer's temporary file: hidden, named by its pid (a killed writer's leftover is recognisable) and NOT by its
# target: Lightning reads the digits of any name holding "hpc_ckpt_" as a checkpoint version, and globs see no *.ckpt.
_TEMP = re.compile(r"^\.partial-(?P<pid>\d+)-[0-9a-f]{8}$")


def _temp_path(path: Path) -> Path:
    return path.with_name(f".partial-{os.getpid()}-{secrets.token_hex(4)}")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, then ``os.replace`` it over ``path``.

    The one writer of every file unclip replaces in place (checkpoints, embeddings, sidecars, caches). A reader, or a
    run resumed after a kill at any moment, sees the previous file or the new one, never a partial one: rename within
    one folder is atomic on POSIX file systems (unlike a copy from /tmp across devices). The file gets the mode a
    plain ``open(path, "wb")`` gives (0666 less the umask), not ``mkstemp``'s 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_path(path)
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)
    return path


def fsync_folder(folder: str | Path) -> None:
    """Make a rename inside ``folder`` durable (a power cut after it keeps the new name); a no-op where the file
    system refuses fsync on a folder (the rename is still atomic)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` through :func:`atomic_write`."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """``data`` into ``path`` through :func:`atomic_write`."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """``text`` (UTF-8) into ``path`` through :func:`atomic_write`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any, **dumps_kwargs: Any) -> Path:
    """``json.dumps(data, indent=2, sort_keys=True, **dumps_kwargs)`` into ``path`` through :func:`atomic_write`;
    nothing is touched when ``data`` does not serialise."""
    options = {"indent": 2, "sort_keys": True, **dumps_kwargs}
    return atomic_write_text(path, json.dumps(data, **options) + "\n")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that writers killed mid-save left in ``folder`` (their pid is gone).

    :return: the files removed.
    """
    removed: list[Path] = []
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
