"""Where an evaluation's captions come from, and the optional caption checker.

Captions come from the val shards (with their real images) or from a file (``captions_file``), e.g. the
COCO-30k list: ``.txt`` (one caption per line), ``.json`` (a list of strings, or of objects with a ``caption``
field; COCO's annotation file ``{"annotations": [{"caption": ...}]}`` also works) or ``.parquet`` (a ``caption``
column). The first N are used, in file order.

A caption checker scores generated images against what their captions ask for (the built-in demo data has one,
``unclip.data.demo_shapes_check``). It is a module named in the config (``caption_checker``), loaded by name, so
the evaluator imports no data set of its own. The module provides ``applies(captions) -> bool``,
``caption_matches(caption, pil_image) -> {attribute: bool | None}`` and ``chance_levels() -> {attribute: p}``.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

CaptionChecker = ModuleType


def read_captions(path: str | Path, n: int | None = None, field: str = "caption") -> list[str]:
    """The first ``n`` (None: all) captions of a .txt / .json / .parquet file.

    :raises ValueError: naming the file when it holds fewer than ``n`` captions, an unknown suffix, or a missing
        field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions_file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        captions = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif suffix == ".json":
        data: Any = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "annotations" in data:
            data = data["annotations"]
        if not isinstance(data, list):
            raise ValueError(f"captions_file {path}: expected a list (or COCO's {{'annotations': [...]}})")
        try:
            captions = [str(x if isinstance(x, str) else x[field]).strip() for x in data]
        except (KeyError, TypeError):
            raise ValueError(f"captions_file {path}: entries must be strings or objects with {field!r}") from None
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if field not in table.column_names:
            raise ValueError(f"captions_file {path} has no {field!r} column (columns: {table.column_names})")
        captions = [str(c).strip() for c in table.column(field).to_pylist()]
    else:
        raise ValueError(f"captions_file {path}: use .txt, .json or .parquet, not {suffix!r}")
    if n is not None:
        if len(captions) < n:
            raise ValueError(f"num_samples={n} but captions_file {path} holds only {len(captions)} captions")
        captions = captions[:n]
    return captions


def load_checker(name: str | None) -> CaptionChecker | None:
    """The caption-checker module ``name`` (None: no checker); raises naming what it lacks."""
    if not name:
        return None
    module = importlib.import_module(name)
    missing = [f for f in ("applies", "caption_matches", "chance_levels") if not hasattr(module, f)]
    if missing:
        raise ValueError(f"caption_checker={name!r} lacks {missing}")
    return module
