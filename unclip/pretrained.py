"""Pretrained folders: trained stages and whole chains shared without pickles or Lightning.

A stage folder (written by ``unclip-export`` or :meth:`UnCLIPPipeline.save_pretrained`)::

    config.json         the stage description (``StageInfo.to_meta()``) + ``export_format``, ``dtype``, ``trained``
    model.safetensors   the network's EMA weights; the same config JSON in the file's metadata (``"unclip"``),
                        so a weight file describes itself
    README.md           model card

A pipeline folder holds ``pipeline.json`` (which sub-folder is which part) beside ``clip/`` (our open_clip export:
``open_clip_config.json`` + ``open_clip_model.safetensors``, ``unclip.models.clip.export_open_clip``), ``prior/``,
``decoder/`` and ``upsampler_0/`` … (stage folders). Reading uses ``json`` and ``safetensors`` only: no
``torch.load``, no pickle, no Lightning. The CLIP is stored in its own dtype whatever ``dtype`` says: the stages
check it by the hash of its weights.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from unclip.stages import STAGES, ClipInfo, ContractError, StageInfo

if TYPE_CHECKING:  # the chain module loads open_clip; imported where used
    from unclip.chain import Chain, Stage

EXPORT_FORMAT = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
PIPELINE_FILE = "pipeline.json"
PIPELINE_FORMAT = "unclip-pipeline"
METADATA_KEY = "unclip"  # the safetensors metadata entry holding config.json
CLIP_DIR, PRIOR_DIR, DECODER_DIR = "clip", "prior", "decoder"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


class PretrainedError(ContractError):
    """A folder that is not what it should be; the message names the file and the field."""


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``"fp32" | "fp16" | "bf16"`` (or the torch names) → torch dtype; None stays None."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if str(name) not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[str(name)]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def upsampler_dir(k: int) -> str:
    return f"upsampler_{k}"


# ---- one stage ----------------------------------------------------------------------------------------------------

def stage_config(info: StageInfo, dtype: torch.dtype, trained: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``config.json`` of a stage folder: the stage description plus the folder format, weights dtype and the
    training facts of the model card (``trained``: steps, data, metrics; nothing reads them back)."""
    return {**info.to_meta(), "export_format": EXPORT_FORMAT, "dtype": dtype_name(dtype),
            "trained": dict(trained or {})}


def save_stage(weights: Mapping[str, Tensor], info: StageInfo, directory: str | Path,
               dtype: torch.dtype | str | None = None, trained: Mapping[str, Any] | None = None,
               card: str | None = None) -> Path:
    """Write a stage folder: ``model.safetensors`` (``weights`` cast to ``dtype``), ``config.json``, ``README.md``.

    :param weights: the network's state dict (EMA weights: ``stages.network_weights``).
    :param dtype: floating-point weights are stored in it (None: as given).
    :param trained: facts for the card and config (``steps``, ``data``, ``metrics``, ``source``).
    :param card: the model card text (None: :func:`unclip.model_card.stage_card`).
    :raises PretrainedError: weights that do not build ``info``'s network (checked before anything is written).
    """
    from safetensors.torch import save_file

    from unclip.model_card import stage_card

    dtype = parse_dtype(dtype)
    tensors = {k: _cast(v.detach().to("cpu"), dtype).contiguous() for k, v in weights.items()}
    _check_weights(info, tensors, "the weights being exported")
    stored = dtype or next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
    config = stage_config(info, stored, trained)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={METADATA_KEY: json.dumps(config), "format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    (directory / CARD_FILE).write_text(card if card is not None else stage_card(config, tensors))
    return directory


def _cast(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _check_weights(info: StageInfo, tensors: Mapping[str, Tensor], where: str) -> nn.Module:
    """The network of ``info`` holding ``tensors`` (built on the meta device: nothing allocated or initialised)."""
    with torch.device("meta"):
        net = info.build()
    try:
        net.load_state_dict(dict(tensors), strict=True, assign=True)
    except RuntimeError as exc:
        raise PretrainedError(f"{where} do not fit the {info.stage} network its config describes: "
                              f"{str(exc).splitlines()[0]} {_key_summary(exc)}") from None
    return net


def _key_summary(exc: RuntimeError) -> str:
    lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
    return " ".join(lines)[:400]


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; a missing file or broken JSON is an error naming the file."""
    if not path.is_file():
        raise PretrainedError(f"{path.parent}: no {path.name} ({what})")
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PretrainedError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise PretrainedError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_stage(directory: str | Path, stage: str) -> tuple[StageInfo, dict[str, Any]]:
    """(description, config.json) of the ``stage`` folder at ``directory``; nothing is built.

    :raises PretrainedError: not a folder, no config.json, another stage's export, a newer folder format or a
        missing field (naming config.json and the field).
    """
    directory = Path(directory)
    if not directory.is_dir():
        hint = " (a training checkpoint: turn it into a folder with unclip-export)" if directory.is_file() else ""
        raise PretrainedError(f"{directory} is not a {stage} folder{hint}")
    path = directory / CONFIG_FILE
    config = read_json(path, f"an unclip stage folder holds {CONFIG_FILE}, {WEIGHTS_FILE} and {CARD_FILE}; "
                             f"write one with unclip-export")
    for key in ("stage", "export_format", "dtype"):
        if key not in config:
            raise PretrainedError(f"{path}: no '{key}' field (is this an unclip stage folder?)")
    if config["stage"] != stage:
        raise PretrainedError(f"{path}: stage='{config['stage']}', but a '{stage}' folder is needed here")
    if int(config["export_format"]) > EXPORT_FORMAT:
        raise PretrainedError(f"{path}: export_format={config['export_format']} is newer than the {EXPORT_FORMAT} "
                              f"this unclip reads: upgrade unclip to load it")
    parse_dtype(config["dtype"])
    try:
        info = STAGES[stage].from_meta(config, str(path))
    except ContractError as exc:
        raise PretrainedError(str(exc)) from None
    return info, config


def load_stage(directory: str | Path, stage: str, device: str | torch.device = "cpu",
               dtype: torch.dtype | str | None = torch.float32) -> tuple[nn.Module, StageInfo]:
    """(network in eval mode and frozen, on ``device``; its description) from a stage folder.

    Reads ``config.json`` and ``model.safetensors`` only (no pickle).

    :param dtype: floating-point weights are loaded in it (None: as stored). Default float32.
    :raises PretrainedError: see :func:`read_stage`; missing weights, weights of another stage or that do not fit.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    directory = Path(directory)
    info, _ = read_stage(directory, stage)
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise PretrainedError(f"{directory}: {CONFIG_FILE} but no {WEIGHTS_FILE} (the {stage} weights)")
    with safe_open(str(path), framework="pt") as f:
        recorded = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
    if recorded.get("stage", stage) != stage:
        raise PretrainedError(f"{path} holds '{recorded['stage']}' weights, but {directory / CONFIG_FILE} says "
                              f"stage='{stage}'")
    dtype = parse_dtype(dtype)
    tensors = {k: _cast(v, dtype) for k, v in load_file(str(path), device="cpu").items()}
    net = _check_weights(info, tensors, str(path))
    return net.to(device).eval().requires_grad_(False), info


# ---- a chain ------------------------------------------------------------------------------------------------------

def clip_export_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """A loaded CLIP's meta (``load_clip``) as ``export_open_clip`` records it: without where it was read from
    (``source``, ``weights``, ``tokenizer`` name the old location; the tokenizer is found again on load)."""
    return {k: v for k, v in meta.items() if k not in ("source", "weights", "tokenizer", "stage")}


def save_pipeline(chain: Chain, directory: str | Path, dtype: torch.dtype | str | None = None,
                  trained: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Write a pipeline folder from a loaded, validated :class:`~unclip.chain.Chain`.

    :param dtype: the stages' weights dtype (None: as loaded); the CLIP keeps its own.
    :param trained: card facts per part name (``prior``, ``decoder``, ``upsampler_0``, ...).
    """
    from unclip.models.clip import export_open_clip

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    trained = dict(trained or {})
    clip = chain.clip
    export_open_clip(clip.model, clip_export_meta(clip.meta), directory / CLIP_DIR)
    parts: dict[str, Any] = {"clip": CLIP_DIR, "prior": None, "decoder": DECODER_DIR, "upsamplers": []}
    stages: list[tuple[str, Stage[Any]]] = [(DECODER_DIR, chain.decoder)]
    if chain.prior is not None:
        parts["prior"] = PRIOR_DIR
        stages.append((PRIOR_DIR, chain.prior))
    for k, upsampler in enumerate(chain.upsamplers):
        parts["upsamplers"].append(upsampler_dir(k))
        stages.append((upsampler_dir(k), upsampler))
    for name, part in stages:
        save_stage(part.net.state_dict(), part.info, directory / name, dtype,
                   trained.get(name, stage_trained(part.path)))
    stored = parse_dtype(dtype)
    manifest = {"format": PIPELINE_FORMAT, "export_format": EXPORT_FORMAT, **parts,
                "dtype": None if stored is None else dtype_name(stored)}
    (directory / PIPELINE_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return directory


def stage_trained(path: str | Path) -> dict[str, Any]:
    """The card facts of where a stage was loaded from: a stage folder's ``trained``, else the checkpoint's."""
    path = Path(path)
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        return dict(read_json(path / CONFIG_FILE, "").get("trained") or {})
    if path.is_file():
        from unclip.model_card import checkpoint_facts

        return checkpoint_facts(path)
    return {}


def read_pipeline(directory: str | Path) -> dict[str, Any]:
    """``pipeline.json`` of a pipeline folder, checked field by field."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PretrainedError(f"{directory} is not a pipeline folder")
    path = directory / PIPELINE_FILE
    if not path.is_file() and (directory / CONFIG_FILE).is_file():
        stage = read_json(directory / CONFIG_FILE, "").get("stage")
        raise PretrainedError(f"{directory} is a '{stage}' stage folder, not a pipeline folder (no {PIPELINE_FILE}; "
                              f"write one with unclip-export --chain or UnCLIPPipeline.save_pretrained)")
    manifest = read_json(path, "a pipeline folder lists its parts there; write one with unclip-export --chain")
    if manifest.get("format") != PIPELINE_FORMAT:
        raise PretrainedError(f"{path}: format={manifest.get('format')!r}, expected '{PIPELINE_FORMAT}'")
    if int(manifest.get("export_format", 0)) > EXPORT_FORMAT:
        raise PretrainedError(f"{path}: export_format={manifest['export_format']} is newer than the {EXPORT_FORMAT} "
                              f"this unclip reads: upgrade unclip to load it")
    for key, kind in (("clip", str), ("decoder", str), ("upsamplers", list)):
        if not isinstance(manifest.get(key), kind):
            raise PretrainedError(f"{path}: field '{key}' must be a {kind.__name__}, got {manifest.get(key)!r}")
    if manifest.get("prior") is not None and not isinstance(manifest["prior"], str):
        raise PretrainedError(f"{path}: field 'prior' must be a folder name or null, got {manifest['prior']!r}")
    return manifest


def load_pipeline(directory: str | Path, device: str | torch.device = "cpu",
                  dtype: torch.dtype | str | None = torch.float32) -> Chain:
    """Load and validate the chain of a pipeline folder with the checks of ``unclip.chain.load_chain``.

    :return: a :class:`~unclip.chain.Chain` whose stage paths are the sub-folders.
    :raises unclip.chain.ChainError: parts that do not fit, with the message ``from_checkpoints`` gives.
    """
    from unclip.chain import Chain, Stage, check_chain
    from unclip.models.clip_embedder import FrozenCLIP

    directory = Path(directory)
    manifest = read_pipeline(directory)
    clip_path = directory / manifest["clip"]
    frozen = FrozenCLIP.from_path(clip_path, device)

    def stage(name: str, kind: str) -> Stage:
        path = directory / name
        return Stage(*load_stage(path, kind, device, dtype), path=str(path))

    decoder = stage(manifest["decoder"], "decoder")
    prior = stage(manifest["prior"], "prior") if manifest.get("prior") else None
    upsamplers = [stage(name, "upsampler") for name in manifest["upsamplers"]]
    check_chain(ClipInfo.of(frozen), str(clip_path), decoder.info, decoder.path,
                prior.info if prior else None, prior.path if prior else None,
                [(s.info, s.path) for s in upsamplers])
    return Chain(clip=frozen, clip_path=str(clip_path), decoder=decoder, prior=prior, upsamplers=upsamplers)


def export_chain(clip: str | Path, decoder: str | Path, directory: str | Path, prior: str | Path | None = None,
                 upsamplers: Sequence[str | Path] = (), dtype: torch.dtype | str | None = None) -> Path:
    """Stage checkpoints (a CLIP checkpoint or folder) → a pipeline folder, refusing a chain that does not fit
    (``load_chain``'s checks and messages)."""
    from unclip.chain import load_chain

    chain = load_chain(clip, decoder, prior, upsamplers, "cpu")
    return save_pipeline(chain, directory, dtype)
