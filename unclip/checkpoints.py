"""Safe checkpoint reading shared by every stage: tensors and plain containers only, stage checked.

Every unclip checkpoint carries ``checkpoint["unclip"] = {"stage", "version", "git_commit", ...}``
(written by ``UnclipModule.on_save_checkpoint``). Loading never unpickles arbitrary objects.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

CHECKPOINT_KEY = "unclip"


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
    if meta["stage"] != expected_stage:
        raise ValueError(f"{path} is a '{meta['stage']}' stage checkpoint; a '{expected_stage}' checkpoint "
                         f"is needed here")
    return meta
