"""Where a frozen CLIP comes from: the spellings of ``clip_ckpt`` / ``clip_scorer``, and what each source says
about its model, read from configs only (no weights). ``unclip.models.clip.load_clip`` builds the model from it.

Spellings (a string; Python callers may also pass ``{"arch": ..., "pretrained": ...}``):

* ``runs/clip/<run>/checkpoints/last.ckpt``: a clip-stage Lightning checkpoint.
* ``path/to/folder`` or ``local-dir:path/to/folder``: ``open_clip_config.json`` (``model_cfg`` +
  ``preprocess_cfg``) beside ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``: our own
  export, or a folder in the layout open_clip writes (``open_clip.push_to_hf_hub.save_for_hf``) and reads
  (``open_clip.create_model("local-dir:...")``), e.g. a downloaded ``timm/vit_large_patch14_clip_224.openai``.
* ``ARCH:path/to/weights``: a registered open_clip architecture (``open_clip.list_models()``) with a local
  weights file, as ``open_clip.create_model(ARCH, pretrained=path)`` takes it.
* ``ARCH:random``: that architecture with seeded random weights (dry runs and smoke tests only).
* ``hf-hub:org/repo`` or ``ARCH:TAG`` (``open_clip.list_pretrained_tags_by_model(ARCH)``): open_clip downloads.

Every source yields the same metadata: image size from ``model_cfg.vision_cfg.image_size``, mean/std from
``preprocess_cfg`` (open_clip's defaults, OpenAI's statistics, when the source has none), context length and
text width from ``model_cfg.text_cfg`` (open_clip's ``CLIPTextCfg`` defaults when unset).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.model import CLIPTextCfg

STAGE = "clip"
CONFIG_FILE = HF_CONFIG_NAME              # open_clip_config.json
WEIGHTS_FILE = HF_SAFE_WEIGHTS_NAME       # open_clip_model.safetensors (what we export)
FOLDER_WEIGHTS = (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME)  # the weight files open_clip writes into a hub folder
HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
RANDOM = "random"
SPELLINGS = ("a clip-stage .ckpt, a folder (or local-dir:folder) with open_clip_config.json and weights, "
             "ARCH:path/to/weights, ARCH:random, ARCH:<open_clip pretrained tag> or hf-hub:org/repo")


class SourceKind(enum.Enum):
    CHECKPOINT = "checkpoint"  # clip-stage Lightning checkpoint
    FOLDER = "folder"          # open_clip_config.json + weights (our export or open_clip's hub layout)
    ARCH = "arch"              # registered architecture + local weights file, or seeded random weights
    DOWNLOAD = "download"      # hf-hub:org/repo or ARCH:TAG, fetched by open_clip


@dataclass(frozen=True)
class ClipSource:
    """A parsed ``clip_ckpt``: ``location`` is the checkpoint, folder or weights path, or the hub id."""

    spec: str
    kind: SourceKind
    location: str
    arch: str | None = None
    tag: str | None = None     # open_clip pretrained tag (DOWNLOAD) or "random" (ARCH)


def parse_clip_source(spec: str | Path | Mapping[str, Any] | ClipSource) -> ClipSource:
    """Parse a ``clip_ckpt`` / ``clip_scorer`` value (see the module docstring for the spellings).

    :raises FileNotFoundError: a path that does not exist, naming it.
    :raises ValueError: an architecture open_clip does not know, or a bare weights file without one.
    """
    if isinstance(spec, ClipSource):
        return spec
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - {"arch", "pretrained"})
        if unknown or not spec.get("arch") or not spec.get("pretrained"):
            raise ValueError(f"CLIP source {dict(spec)}: give exactly arch and pretrained (a weights file, "
                             f"'random' or a pretrained tag){f'; unknown keys {unknown}' if unknown else ''}")
        spec = f"{spec['arch']}:{spec['pretrained']}"
    text = str(spec)
    if text.startswith(HUB_PREFIX):
        return ClipSource(text, SourceKind.DOWNLOAD, text[len(HUB_PREFIX):])
    if text.startswith(LOCAL_DIR_PREFIX):
        folder = Path(text[len(LOCAL_DIR_PREFIX):])
        if not folder.is_dir():
            raise FileNotFoundError(f"{text}: {folder} is not a folder")
        return ClipSource(text, SourceKind.FOLDER, str(folder))
    path = Path(text)
    if path.is_dir():
        return ClipSource(text, SourceKind.FOLDER, text)
    if path.is_file():
        if path.suffix in (".safetensors", ".bin", ".pth", ".pt", ".npz"):
            raise ValueError(f"{text} is a bare weights file: name its architecture as ARCH:{text} (ARCH from "
                             f"open_clip.list_models()), or use the folder holding it with {CONFIG_FILE}")
        return ClipSource(text, SourceKind.CHECKPOINT, text)
    arch, sep, rest = text.partition(":")
    if not sep:
        if arch in open_clip.list_models():
            raise ValueError(f"{text} is an open_clip architecture without weights: write {text}:path/to/weights, "
                             f"{text}:<pretrained tag> or {text}:{RANDOM}")
        raise FileNotFoundError(f"no CLIP at {text}: expected {SPELLINGS}")
    if open_clip.get_model_config(arch) is None:
        raise ValueError(f"{text}: {arch!r} is not an open_clip architecture (see open_clip.list_models())")
    if rest == RANDOM:
        return ClipSource(text, SourceKind.ARCH, "", arch, RANDOM)
    if Path(rest).is_file():
        return ClipSource(text, SourceKind.ARCH, rest, arch)
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if rest in tags:
        return ClipSource(text, SourceKind.DOWNLOAD, text, arch, rest)
    raise FileNotFoundError(f"{text}: no weights file {rest}, and {rest!r} is not a pretrained tag of {arch} "
                            f"(tags: {tags})")


def read_folder_config(folder: str | Path) -> dict:
    """``open_clip_config.json`` of a CLIP folder, checked to hold a ``model_cfg``.

    :raises FileNotFoundError / ValueError: naming the file and the missing or broken field.
    """
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG_FILE} (a CLIP folder holds {CONFIG_FILE} and "
                                f"{' or '.join(FOLDER_WEIGHTS)})")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise ValueError(f"{path}: no 'model_cfg' object (open_clip's model config)")
    return config


def folder_weights(folder: str | Path) -> Path:
    """The weights file of a CLIP folder (safetensors preferred, as open_clip does).

    :raises FileNotFoundError: naming the folder and the file names looked for.
    """
    for name in FOLDER_WEIGHTS:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise FileNotFoundError(f"{folder}: {CONFIG_FILE} but no weights ({' or '.join(FOLDER_WEIGHTS)})")


def _statistic(preprocess: Mapping[str, Any], key: str, default: tuple[float, ...], where: str) -> list[float]:
    value = preprocess.get(key, default)
    if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)):
        raise ValueError(f"{where}: preprocess_cfg.{key} must be 3 numbers (one per RGB channel), got {value!r}")
    return [float(v) for v in value]


def describe_config(model_cfg: Mapping[str, Any], preprocess_cfg: Mapping[str, Any], where: str) -> dict:
    """Sizes and normalisation of a CLIP from open_clip's ``model_cfg`` and ``preprocess_cfg``.

    :param where: the file or name for error messages.
    :return: ``{"embed_dim", "image_size", "context_length", "text_width", "image_mean", "image_std",
        "open_clip_config"}``.
    :raises ValueError: naming ``where`` and the missing field.
    """
    vision = model_cfg.get("vision_cfg")
    if not isinstance(vision, Mapping):
        raise ValueError(f"{where}: model_cfg.vision_cfg is missing")
    size = vision.get("image_size")
    if isinstance(size, (list, tuple)) and len(set(size)) == 1:
        size = size[0]
    if not isinstance(size, int):
        raise ValueError(f"{where}: model_cfg.vision_cfg.image_size must be one int (the CLIP's square input "
                         f"side), got {size!r}")
    if not isinstance(model_cfg.get("embed_dim"), int):
        raise ValueError(f"{where}: model_cfg.embed_dim must be an int, got {model_cfg.get('embed_dim')!r}")
    text = model_cfg.get("text_cfg") or {}
    for field, present in (("text_cfg.hf_model_name", "hf_model_name" in text),
                           ("custom_text", bool(model_cfg.get("custom_text"))),
                           ("multimodal_cfg", "multimodal_cfg" in model_cfg)):
        if present:  # CustomTextCLIP / CoCa: no open_clip causal text transformer to read token encodings from
            raise ValueError(f"{where}: model_cfg.{field} is set; the prior and decoder read per-token caption "
                             f"encodings from open_clip's own text transformer (the CLIP class), which this model "
                             f"does not have")
    defaults = CLIPTextCfg()
    return {"embed_dim": int(model_cfg["embed_dim"]), "image_size": size,
            "context_length": int(text.get("context_length", defaults.context_length)),
            "text_width": int(text.get("width", defaults.width)),
            "image_mean": _statistic(preprocess_cfg, "mean", open_clip.OPENAI_DATASET_MEAN, where),
            "image_std": _statistic(preprocess_cfg, "std", open_clip.OPENAI_DATASET_STD, where),
            "open_clip_config": dict(model_cfg)}


def describe_source(source: ClipSource) -> dict:
    """What a folder, architecture or hub name says about its CLIP, from configs only (checkpoints: see
    ``clip_embedder.clip_meta``).

    :return: ``describe_config``'s keys plus ``stage``, ``source``, ``arch``, ``model_config`` (ours, or None),
        ``clip_hash`` (recorded by our exports, else None) and ``weights`` (the local file, or None).
    """
    recorded: dict = {}
    weights: str | None  # a local weights file; None: downloaded, or the architecture's random init
    if source.kind is SourceKind.FOLDER:
        config = read_folder_config(source.location)
        recorded = dict(config.get("unclip") or {})
        if recorded.get("stage", STAGE) != STAGE:
            raise ValueError(f"{source.location} holds a '{recorded['stage']}' export, not a CLIP")
        where = str(Path(source.location) / CONFIG_FILE)
        meta = describe_config(config["model_cfg"], config.get("preprocess_cfg") or {}, where)
        weights = str(folder_weights(source.location))
    elif source.kind is SourceKind.ARCH:
        meta = describe_config(open_clip.get_model_config(source.arch), {}, f"open_clip architecture {source.arch}")
        weights = source.location or None
    elif source.kind is SourceKind.DOWNLOAD and source.arch is None:  # the hub repo's config (downloaded)
        config_file = open_clip.pretrained.download_pretrained_from_hf(source.location, filename=CONFIG_FILE)
        config = read_folder_config(Path(config_file).parent)
        meta = describe_config(config["model_cfg"], config.get("preprocess_cfg") or {}, source.spec)
        weights = None
    elif source.kind is SourceKind.DOWNLOAD:  # a registered architecture with its pretrained tag's statistics
        preprocess = open_clip.get_pretrained_cfg(source.arch, source.tag)
        meta = describe_config(open_clip.get_model_config(source.arch), preprocess, source.spec)
        weights = None
    else:
        raise ValueError(f"{source.spec}: a checkpoint is described by its own metadata, not by describe_source")
    meta.update(stage=STAGE, source=source.spec, arch=recorded.get("arch", source.arch),
                model_config=recorded.get("model_config"), clip_hash=recorded.get("clip_hash"), weights=weights)
    return meta
