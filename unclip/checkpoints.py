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


class UnsafeCheckpointError(ValueError):
    """A file refused because reading it would unpickle Python objects (run code from the file)."""


# torch's weights-only unpickler names what it refused ("GLOBAL module.name"); its own advice around it (re-run
# unsafely, allowlist the global) is never passed on.
_GLOBAL = re.compile(r"GLOBAL (?P<name>[\w.]+)")
_TORCH_ADVICE = ("weights_only", "Weights only", "safe_globals", "Check the documentation", "WeightsUnpickler")


def _refusal_reason(message: str) -> str:
    """The line of torch's message that says what was refused, without its advice."""
    lines = [line.strip() for line in message.splitlines()]
    marker = "WeightsUnpickler error:"
    lines += [line.split(marker, 1)[1].strip() for line in lines if marker in line]
    reasons = [line for line in lines if line and not any(advice in line for advice in _TORCH_ADVICE)]
    return reasons[0][:200] if reasons else "unreadable"


def _what_it_may_be(name: str) -> str:
    if name.startswith("torch.nn.") or ".models." in name or name.endswith(("Model", "Module", "Net")):
        return ("a whole pickled model (torch.save(model)) rather than its weights, which needs that program's "
                "classes to be imported and run")
    if name.startswith("numpy."):
        return "a checkpoint saved by another program that stored numpy arrays or scalars (RNG state, metrics)"
    kind = name.rsplit(".", 1)[-1]
    example = f" (e.g. hyper-parameters as a {kind})" if kind[:1].isupper() else ""
    return f"a checkpoint saved by another program or an older tool, holding its own objects{example} beside weights"


def refused_checkpoint(path: str | Path, exc: pickle.UnpicklingError) -> ValueError:
    """The error for a file ``torch.load(weights_only=True)`` refused: the file, the global it would have had to
    unpickle, what the file may be and how to convert it safely. Raise it ``from None``: torch's own message (kept
    out on purpose) suggests disabling the safe loader."""
    found = _GLOBAL.search(str(exc))
    if found is None:  # not a refused global: an unreadable or foreign file
        reason = _refusal_reason(str(exc))
        return ValueError(f"refusing to load {path}: it is not a PyTorch checkpoint of tensors and plain containers "
                          f"that unclip can read ({reason})")
    name = found["name"]
    return UnsafeCheckpointError(
        f"refusing to load {path}: it holds pickled Python objects (the first: {name}), and unpickling them would "
        f"run code from the file; unclip reads checkpoints as data only (tensors, numbers, strings, lists, dicts). "
        f"It may be "
        f"{_what_it_may_be(name)}. To use it, convert it in the program that wrote it, and only if you trust the "
        f"file: save the weights alone, e.g. torch.save({{'state_dict': model.state_dict()}}, 'weights.pt') (or "
        f"safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')); an unclip stage checkpoint from "
        f"an older unclip exports to safetensors with unclip-export CKPT OUT_DIR.")


def safe_torch_load(source: str | Path | BinaryIO, name: str | Path | None = None, mmap: bool = False) -> Any:
    """``torch.load(source, weights_only=True)`` on the CPU: the one place unclip reads a torch file.

    :param name: how the refusal names the file (default: ``source``).
    :param mmap: map a zip-format file instead of reading it (a legacy file falls back to a plain read).
    :raises UnsafeCheckpointError: the file holds pickled Python objects (see :func:`refused_checkpoint`).
    :raises ValueError: the file is not a torch file at all.
    """
    try:
        if mmap:
            try:  # a multi-GB checkpoint is paged in as read, not copied up front
                return torch.load(source, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format cannot be mapped; plain loading is as safe
                pass
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise refused_checkpoint(name if name is not None else str(source), exc) from None


def read_checkpoint(path: str | Path) -> dict:
    """``torch.load(path, weights_only=True)`` on the CPU (memory-mapped), refusing files that hold pickled objects.

    :raises UnsafeCheckpointError: for a file with pickled Python objects (naming the first and the way out).
    :raises ValueError: for a file that is not a torch file, or not a dict.
    """
    checkpoint = safe_torch_load(path, mmap=True)
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
