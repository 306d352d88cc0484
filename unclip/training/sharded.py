"""Sharded (FSDP) checkpoints: written to a new step folder and swapped in, read without running code, and
consolidated into one file a single process loads.

A sharded checkpoint ``last.ckpt`` is a symbolic link to a complete step folder ``.last.ckpt.steps/<step>-<id>/``
(``__<rank>_0.distcp`` shards, the ``.metadata`` index, ``meta.pt`` with everything that is not a tensor). A save
writes a NEW step folder and, once every rank has finished, replaces the link in one ``rename``; only then is the
previous folder deleted. A crash at any moment leaves ``last.ckpt`` pointing at a complete checkpoint (torchtitan
keeps its ``step-N`` folders for the same reason). See docs/reliability.md.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, ClassVar

import torch
from pytorch_lightning.strategies import FSDPStrategy

from unclip.checkpoints import atomic_save, fsync_folder, read_checkpoint, safe_torch_load

META_FILE = "meta.pt"  # Lightning's name for the non-tensor part
STEPS_SUFFIX = ".steps"


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A folder (or a link to one) written by FSDPStrategy(state_dict_type="sharded"): shards + .metadata + meta.pt."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file() and (path / META_FILE).is_file()


# ---- reading without running code ----------------------------------------------------------------------------

def _allowed_globals() -> dict[tuple[str, str], Any]:
    """What a torch.distributed.checkpoint ``.metadata`` pickle names: its own dataclasses, torch.Size, dtypes,
    layouts and paths. Nothing here runs code when called with pickled arguments."""
    import pathlib

    import torch.distributed.checkpoint.filesystem as dcp_fs
    import torch.distributed.checkpoint.metadata as dcp_meta

    allowed: dict[tuple[str, str], Any] = {}
    for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                 "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"):
        if hasattr(dcp_meta, name):
            allowed[(dcp_meta.__name__, name)] = getattr(dcp_meta, name)
    if hasattr(dcp_fs, "_StorageInfo"):
        allowed[(dcp_fs.__name__, "_StorageInfo")] = dcp_fs._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    for name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
        allowed[("pathlib", name)] = getattr(pathlib, name)
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a ``.metadata`` index, refusing every global outside :func:`_allowed_globals` and torch dtypes."""

    allowed: ClassVar[dict[tuple[str, str], Any]] = {}

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get((module, name))
        if found is not None:
            return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a torch.distributed.checkpoint index")


def read_sharded_metadata(stream: Any, path: str | os.PathLike[str]) -> Any:
    """The ``Metadata`` pickled in a sharded checkpoint's ``.metadata``, read without running any code.

    :param stream: the open ``.metadata`` file (binary).
    :raises ValueError: naming ``path`` and the refused global when the pickle names anything else (a crafted file).
    """
    if not _MetadataUnpickler.allowed:
        _MetadataUnpickler.allowed = _allowed_globals()
    try:
        return _MetadataUnpickler(stream).load()
    except (pickle.UnpicklingError, AttributeError, EOFError, TypeError) as exc:
        raise ValueError(f"refusing to read {path}: it is not a plain torch.distributed.checkpoint index "
                         f"({exc}); nothing in it was run") from exc


def _safe_reader(folder: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        """torch's reader with the ``.metadata`` pickle read by :func:`read_sharded_metadata`."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as f:
                metadata = read_sharded_metadata(f, path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(folder)


def _safe_planner(keys: list[str] | None = None) -> Any:
    from torch.distributed.checkpoint._nested_dict import set_element
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner

    class SafeLoadPlanner(_EmptyStateDictLoadPlanner):
        """Rebuilds the state dict from the index; non-tensor entries load with ``weights_only=True`` (torch's
        own planner unpickles them with ``weights_only=False``)."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            obj = safe_torch_load(value, f"entry {read_item.dest_index.fqn!r} of a sharded checkpoint")
            fqn = read_item.dest_index.fqn  # placed as DefaultLoadPlanner.load_bytes places it
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    return SafeLoadPlanner(keys=keys)


def _load_sharded(folder: Path, keys: list[str] | None = None) -> dict[str, Any]:
    from torch.distributed.checkpoint import CheckpointException
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    with open(folder / ".metadata", "rb") as f:  # torch's loader swallows a refusal inside read_metadata
        read_sharded_metadata(f, folder / ".metadata")
    state: dict[str, Any] = {}
    try:
        _load_state_dict(state, storage_reader=_safe_reader(folder), planner=_safe_planner(keys), no_dist=True)
    except CheckpointException as exc:  # torch wraps what the reader raised; a refusal is re-raised as itself
        refused = [e for e, _ in exc.failures.values() if isinstance(e, ValueError)]
        if refused:
            raise refused[0] from None
        raise
    return state


def verify_sharded_checkpoint(path: str | Path) -> None:
    """Read everything of a sharded checkpoint that is pickled (the index, every non-tensor entry, ``meta.pt``)
    the safe way, so that Lightning's own loader, which unpickles them freely, then meets only plain data.

    :raises ValueError: for a crafted folder, naming the file and what was refused.
    """
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    path = Path(path)
    with open(path / ".metadata", "rb") as f:
        metadata = read_sharded_metadata(f, path / ".metadata")
    byte_keys = [k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
    if byte_keys:
        _load_sharded(path, byte_keys)
    read_checkpoint(path / META_FILE)


def consolidate_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a sharded FSDP checkpoint in ONE process into Lightning's single-file layout, running no pickled code.

    The tensors are gathered from the shards (``torch.distributed.checkpoint``, no process group needed), and
    ``meta.pt`` supplies everything else (``unclip`` metadata, hyper-parameters, loop state), read with
    ``weights_only=True``. The result has ``state_dict`` (full, unsharded tensors) and ``optimizer_states``.

    :raises ValueError: if ``path`` is not a sharded checkpoint folder, or holds pickled code.
    """
    if not is_sharded_checkpoint(path):
        raise ValueError(f"{path} is not a sharded checkpoint folder (no .metadata and meta.pt)")
    path = Path(path)
    state = _load_sharded(path)
    checkpoint = read_checkpoint(path / META_FILE)
    checkpoint["state_dict"] = state.pop("model")
    optimizers = sorted((k for k in state if re.fullmatch(r"optimizer_\d+", k)), key=lambda k: int(k.split("_")[1]))
    checkpoint["optimizer_states"] = [state.pop(k) for k in optimizers]
    checkpoint.update(state)
    return checkpoint


def save_consolidated(path: str | Path, out: str | Path, weights_only: bool = False) -> Path:
    """Write :func:`consolidate_checkpoint` of ``path`` to the file ``out`` (the layout every loader reads).

    :param weights_only: drop optimizer states (a sampling-only file, a third of the size with AdamW).
    """
    checkpoint = consolidate_checkpoint(path)
    if weights_only:
        checkpoint.pop("optimizer_states", None)
    return atomic_save(checkpoint, out)


# ---- writing: a new step folder, then one rename -------------------------------------------------------------

def steps_folder(path: Path) -> Path:
    """Where the step folders behind the link ``path`` live: ``.<name>.steps`` beside it."""
    return path.parent / f".{path.name}{STEPS_SUFFIX}"


def point_link(path: Path, target: Path) -> None:
    """Make ``path`` a relative symbolic link to ``target`` in one ``rename`` (atomic on POSIX file systems)."""
    if path.is_dir() and not path.is_symlink():  # written in place by an older unclip: kept as a step folder
        os.replace(path, steps_folder(path) / f"previous-{secrets.token_hex(4)}")
    temp = path.with_name(f".link-{os.getpid()}-{secrets.token_hex(4)}")
    os.symlink(os.path.relpath(target, path.parent), temp)
    try:
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def prune_steps(path: Path) -> list[Path]:
    """Delete the step folders of ``path`` that it does not point at: older saves and killed ones. With no link
    (a crash before the first swap), only incomplete folders go.

    :return: the folders removed.
    """
    store = steps_folder(path)
    if not store.is_dir():
        return []
    current = path.resolve() if path.is_symlink() and path.exists() else None
    removed = []
    for entry in store.iterdir():
        if entry.resolve() == current or (current is None and is_sharded_checkpoint(entry)):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def prune_all_steps(folder: str | Path) -> list[Path]:
    """:func:`prune_steps` for every sharded checkpoint in ``folder`` (at the start of a run: nothing is saving)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for store in folder.glob(f".*{STEPS_SUFFIX}"):
        link = folder / store.name[1:-len(STEPS_SUFFIX)]
        removed += prune_steps(link)
        if not link.exists() and not link.is_symlink() and not any(store.iterdir()):
            store.rmdir()
    return removed


class SafeFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy whose sharded checkpoints are swapped in whole and whose loads run no pickled code.

    * Saving (``state_dict_type="sharded"``): every rank writes into a new step folder; after a barrier rank 0
      points the checkpoint's link at it and deletes the previous folder (Lightning overwrites the folder in place,
      so a crash mid-save left new shards under the old index).
    * Loading: the index, the non-tensor entries and ``meta.pt`` of a sharded folder, or a whole single-file
      checkpoint, are first read with the restricted readers above (Lightning's own loaders unpickle freely).
    * Removing (ModelCheckpoint's rotation): the link and its step folders.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if self._state_dict_type != "sharded" or storage_options is not None:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        from lightning_fabric.strategies.fsdp import _distributed_checkpoint_save

        path = Path(self.broadcast(str(filepath)))
        name = self.broadcast(f"step{int(checkpoint.get('global_step', 0)):08d}-{time.time_ns():x}")
        target = steps_folder(path) / name
        if self.global_rank == 0:
            prune_steps(path)  # folders of saves killed before their swap
            target.mkdir(parents=True)
        self.barrier("unclip_sharded_save_start")
        converted = {"model": checkpoint.pop("state_dict")}
        converted.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        _distributed_checkpoint_save(converted, target)
        if self.global_rank == 0:
            atomic_save(checkpoint, target / META_FILE)
        self.barrier("unclip_sharded_save_written")  # every rank's shard is on disk before the link moves
        if self.global_rank == 0:
            point_link(path, target)
            prune_steps(path)
        self.barrier("unclip_sharded_save_done")

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(str(checkpoint_path)))
        if is_sharded_checkpoint(path):
            verify_sharded_checkpoint(path)
        elif path.is_file():
            read_checkpoint(path)  # memory-mapped, weights_only: refuses pickled objects before Lightning's loader
        return super().load_checkpoint(path, weights_only=True)

    def remove_checkpoint(self, filepath: Any) -> None:
        path = Path(filepath)
        if not path.is_symlink() and not steps_folder(path).exists():
            super().remove_checkpoint(filepath)
            return
        if self.is_global_zero:
            path.unlink(missing_ok=True)
            shutil.rmtree(steps_folder(path), ignore_errors=True)
