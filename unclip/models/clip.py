"""open_clip models for unCLIP: factory from our config, tokenizer, weight hash, export and safe loading.

Our model config (``conf/model/clip/*.yaml``) is translated once into an open_clip ``model_cfg`` dict
(``{"embed_dim", "vision_cfg", "text_cfg", ...}``, the format of open_clip's ``model_configs/*.json``).
That dict builds the network here, is stored in every checkpoint, and is written next to the exported
weights as ``open_clip_config.json``, so plain open_clip loads an export with
``open_clip.create_model("local-dir:" + export_dir)``.

Images reach CLIP in unclip's convention, [-1, 1]; ``to_clip_pixels`` maps them to CLIP's normalisation.
"""

from __future__ import annotations

import copy
import enum
import hashlib
import json
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import open_clip
import torch
from open_clip.loss import ClipLoss, SigLipLoss
from torch import nn

from unclip.checkpoints import UnsafeCheckpointError, read_checkpoint, refused_checkpoint, stage_metadata
from unclip.data.demo_shapes import default_cache_dir
from unclip.models.clip_source import (
    CONFIG_FILE,
    HUB_PREFIX,
    LOCAL_DIR_PREFIX,
    RANDOM,
    STAGE,
    WEIGHTS_FILE,
    ClipSource,
    SourceKind,
    describe_config,
    describe_source,
    parse_clip_source,
)

OPENAI_MEAN, OPENAI_STD = list(open_clip.OPENAI_DATASET_MEAN), list(open_clip.OPENAI_DATASET_STD)
# Top-level keys of conf/model/clip/*.yaml; anything else is a typo and is refused.
MODEL_KEYS = ("arch", "pretrained", "embed_dim", "quick_gelu", "init_logit_scale", "init_logit_bias",
              "image_mean", "image_std", "vision", "text")


class LossKind(enum.Enum):
    CLIP = "clip"      # symmetric InfoNCE over the batch (Radford et al. 2021), open_clip ClipLoss
    SIGLIP = "siglip"  # pairwise sigmoid loss (Zhai et al. 2023), open_clip SigLipLoss

    @classmethod
    def parse(cls, name: str) -> LossKind:
        try:
            return cls(name)
        except ValueError:
            raise ValueError(f"unknown CLIP loss {name!r}; valid: {[k.value for k in cls]}") from None


def open_clip_config(model_cfg: Mapping[str, Any]) -> dict:
    """Translate our model config into an open_clip ``model_cfg`` dict.

    With ``arch`` set, open_clip's registered config of that name is the base and every non-null field
    of ours (top level, ``vision``, ``text``) overrides it; without, the fields are the whole config.

    :param model_cfg: ``conf/model/clip/*.yaml`` as a dict (``arch``, ``embed_dim``, ``vision``, ...).
    :return: ``{"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", ...}``.
    """
    unknown = sorted(set(model_cfg) - set(MODEL_KEYS))
    if unknown:
        raise ValueError(f"unknown model config keys {unknown}; valid: {list(MODEL_KEYS)}")
    arch = model_cfg.get("arch")
    if arch:
        base = open_clip.get_model_config(arch)
        if base is None:
            raise ValueError(f"model.arch={arch!r} is not an open_clip architecture (see open_clip.list_models())")
    else:
        base = {"vision_cfg": {}, "text_cfg": {}}
    if "multimodal_cfg" in base:
        raise ValueError(f"model.arch={arch!r} is a CoCa model; unclip trains contrastive CLIP models only")
    cfg = copy.deepcopy(base)
    for key in ("embed_dim", "quick_gelu", "init_logit_scale", "init_logit_bias"):
        if model_cfg.get(key) is not None:
            cfg[key] = model_cfg[key]
    for ours, theirs in (("vision", "vision_cfg"), ("text", "text_cfg")):
        cfg[theirs].update({k: v for k, v in (model_cfg.get(ours) or {}).items() if v is not None})
    if "embed_dim" not in cfg:
        raise ValueError("model.embed_dim must be set when model.arch is null")
    return without_tower_downloads(cfg)


def without_tower_downloads(oc_cfg: Mapping[str, Any]) -> dict:
    """A copy of an open_clip ``model_cfg`` whose timm / HF towers start from random weights: the CLIP's weights
    come from its own file, so a tower must never download pretrained weights of its own."""
    cfg = copy.deepcopy(dict(oc_cfg))
    if "timm_model_name" in cfg.get("vision_cfg", {}):
        cfg["vision_cfg"]["timm_model_pretrained"] = False
    if "hf_model_name" in cfg.get("text_cfg", {}):
        cfg["text_cfg"]["hf_model_pretrained"] = False
    return cfg


# What create_clip builds. open_clip ships no type information, so mypy reads these classes (and so their
# attributes: logit_scale, visual, set_grad_checkpointing, ...) as Any.
OpenClipModel: TypeAlias = open_clip.CLIP | open_clip.CustomTextCLIP


def create_clip(oc_cfg: Mapping[str, Any]) -> OpenClipModel:
    """Instantiate the open_clip model class an open_clip ``model_cfg`` describes (random weights).

    Mirrors ``open_clip.create_model``'s class choice: ``CustomTextCLIP`` for custom/HF text towers,
    ``CLIP`` otherwise.
    """
    kwargs = copy.deepcopy(dict(oc_cfg))
    custom_text = kwargs.pop("custom_text", False) or "hf_model_name" in kwargs["text_cfg"]
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    try:
        return cls(**kwargs)
    except TypeError as exc:  # open_clip's cfg dataclasses reject unknown fields
        raise ValueError(f"invalid open_clip model config: {exc}") from exc


def build_clip(model_cfg: Mapping[str, Any]) -> tuple[OpenClipModel, dict]:
    """Build the CLIP our config describes and load ``model_cfg["pretrained"]`` if given.

    Weights load through ``open_clip.load_checkpoint`` (safetensors or ``torch.load(weights_only=True)``,
    with open_clip's key conversions and position-embedding resizing).

    :return: ``(model, open_clip model_cfg dict)``.
    """
    oc_cfg = open_clip_config(model_cfg)
    model = create_clip(oc_cfg)
    path = model_cfg.get("pretrained")
    if path and not next(model.parameters()).is_meta:  # nothing to load into on the meta device
        if not Path(path).is_file():
            raise FileNotFoundError(f"model.pretrained={path!r} is not a file (weights are never downloaded)")
        _open_clip_load(model, str(path))
    return model, oc_cfg


def _open_clip_load(model: nn.Module, weights: str) -> None:
    """``open_clip.load_checkpoint`` (safetensors, or ``torch.load(weights_only=True)``; open_clip converts
    third-party key layouts), refusing a file with pickled objects as :func:`unclip.checkpoints.read_checkpoint`
    refuses it."""
    try:
        open_clip.load_checkpoint(model, weights, strict=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise refused_checkpoint(weights, exc) from None


def make_tokenizer(arch: str | None, context_length: int):
    """The open_clip tokenizer for ``arch`` (an architecture, ``local-dir:`` folder or ``hf-hub:`` name; the CLIP
    BPE tokenizer when None), padding/truncating captions to ``context_length``. Picklable, so it runs in
    data-loader workers.

    :return: callable ``list[str] -> LongTensor [B, context_length]``.
    """
    if arch:
        return open_clip.get_tokenizer(arch, context_length=context_length)
    return open_clip.SimpleTokenizer(context_length=context_length)


def to_clip_pixels(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Map unclip images in [-1, 1] to CLIP's input normalisation.

    :param images: [B, 3, H, W] in [-1, 1].
    :param mean, std: [3] per-channel statistics of [0, 1] pixels.
    :return: [B, 3, H, W] ``((images + 1) / 2 - mean) / std``.
    """
    mean = mean.to(images).view(1, -1, 1, 1)
    std = std.to(images).view(1, -1, 1, 1)
    return (images * 0.5 + 0.5 - mean) / std


def clip_hash(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over a CLIP state dict: name, dtype, shape and raw bytes of every tensor, by sorted name.

    Later stages record it to check that they are chained to the CLIP they were trained against.
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def model_context_length(model: nn.Module) -> int:
    """The caption length an open_clip model was built for (a plain int attribute of CLIP and CustomTextCLIP)."""
    length = getattr(model, "context_length", None)
    if not isinstance(length, int):
        raise TypeError(f"{type(model).__name__} has no integer context_length: not an open_clip CLIP model")
    return length


def clip_metadata(model: nn.Module, model_cfg: Mapping[str, Any], oc_cfg: Mapping[str, Any]) -> dict:
    """What a checkpoint or export records about a CLIP (the chain check reads it).

    :return: ``{"embed_dim", "image_size", "context_length", "arch", "image_mean", "image_std",
        "model_config" (ours), "open_clip_config", "clip_hash"}``.
    """
    return {"embed_dim": int(oc_cfg["embed_dim"]), "image_size": oc_cfg["vision_cfg"].get("image_size", 224),
            "context_length": model_context_length(model), "arch": model_cfg.get("arch"),
            "image_mean": list(model_cfg["image_mean"]), "image_std": list(model_cfg["image_std"]),
            "model_config": dict(model_cfg), "open_clip_config": dict(oc_cfg),
            "clip_hash": clip_hash(model.state_dict())}


def export_open_clip(model: nn.Module, meta: Mapping[str, Any], directory: str | Path) -> Path:
    """Write ``directory/{open_clip_config.json, open_clip_model.safetensors}``.

    The JSON has open_clip's hub layout (``model_cfg``, ``preprocess_cfg``) plus our ``unclip`` metadata,
    so ``open_clip.create_model("local-dir:" + directory)`` and ``load_clip(directory)`` both read it.

    :param meta: ``clip_metadata(...)`` (plus anything else to record, e.g. stage and version).
    :return: the directory.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"clip_hash": str(meta["clip_hash"])})
    config = {"model_cfg": meta["open_clip_config"],
              "preprocess_cfg": {"size": meta["image_size"], "mean": meta["image_mean"], "std": meta["image_std"],
                                 "resize_mode": "shortest"},
              "unclip": {"stage": STAGE, **{k: v for k, v in meta.items() if k != "open_clip_config"}}}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return directory


def _cache_key(source: ClipSource, meta: Mapping[str, Any]) -> str | None:
    """Identity of the weights file a source loads (path, size, mtime, config), or None without one."""
    location = meta.get("weights")
    if location is None:  # downloads and ARCH:random: nothing local to key on
        return None
    stat = Path(location).stat()
    ident = {"config": meta["open_clip_config"], "file": str(Path(location).resolve()), "size": stat.st_size,
             "mtime_ns": stat.st_mtime_ns}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def _hash_file(key: str) -> Path:
    return default_cache_dir() / "clip_hash" / f"{key}.txt"


def cached_clip_hash(source: ClipSource, meta: Mapping[str, Any]) -> str | None:
    """The ``clip_hash`` computed on an earlier load of these exact weights (this process or
    ``$UNCLIP_CACHE/clip_hash/``), or None."""
    key = _cache_key(source, meta)
    if key is None:
        return None
    if key not in _HASHES and _hash_file(key).is_file():
        _HASHES[key] = _hash_file(key).read_text().strip()
    return _HASHES.get(key)


def _store_clip_hash(source: ClipSource, meta: Mapping[str, Any], value: str) -> None:
    key = _cache_key(source, meta)
    if key is None:
        return
    _HASHES[key] = value
    try:
        _hash_file(key).parent.mkdir(parents=True, exist_ok=True)
        _hash_file(key).write_text(value)
    except OSError:  # a read-only home: the in-process cache still serves this run
        pass


_HASHES: dict[str, str] = {}


def _checkpoint_meta(checkpoint: dict, path: Path) -> tuple[dict, dict]:
    meta = stage_metadata(checkpoint, path, STAGE)
    prefix = "model."  # CLIPModule keeps the open_clip network as self.model
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    return meta, state


def _describe_checkpoint(recorded: Mapping[str, Any], source: ClipSource) -> dict:
    meta = describe_config(recorded["open_clip_config"], {"mean": recorded.get("image_mean", OPENAI_MEAN),
                                                          "std": recorded.get("image_std", OPENAI_STD)}, source.spec)
    meta.update(stage=STAGE, source=source.spec, arch=recorded.get("arch"), model_config=recorded.get("model_config"),
                clip_hash=recorded.get("clip_hash"), weights=None)
    return meta


def tokenizer_name(source: ClipSource, meta: Mapping[str, Any]) -> str | None:
    """What ``open_clip.get_tokenizer`` is given for this CLIP: the architecture our runs recorded, the open_clip
    folder itself (its ``text_cfg`` picks the tokenizer), the hub repo, or None for the plain CLIP BPE."""
    if meta.get("arch"):
        return str(meta["arch"])
    if source.kind is SourceKind.FOLDER:
        return LOCAL_DIR_PREFIX + str(Path(source.location).resolve())
    if source.kind is SourceKind.DOWNLOAD:
        return HUB_PREFIX + source.location
    return None


def describe_clip(spec: str | Path | Mapping[str, Any] | ClipSource) -> dict:
    """A CLIP's metadata without building it (preflight checks, tokenizers, the prior's sizes).

    :param spec: any ``clip_ckpt`` spelling (``unclip.models.clip_source``).
    :return: ``{"embed_dim", "image_size", "context_length", "text_width", "image_mean", "image_std", "arch",
        "open_clip_config", "model_config", "clip_hash" (None until these weights were loaded once), "stage",
        "source", "weights", "tokenizer"}``.
    """
    source = parse_clip_source(spec)
    if source.kind is SourceKind.CHECKPOINT:
        meta = _describe_checkpoint(stage_metadata(read_checkpoint(source.location), source.location, STAGE), source)
    else:
        meta = describe_source(source)
        meta["clip_hash"] = meta["clip_hash"] or cached_clip_hash(source, meta)
    meta["tokenizer"] = tokenizer_name(source, meta)
    return meta


def _load_weights(model: nn.Module, weights: str, where: str) -> None:
    try:
        _open_clip_load(model, weights)
    except UnsafeCheckpointError:
        raise
    except (RuntimeError, ValueError, OSError, KeyError, AssertionError) as exc:
        raise ValueError(f"{weights}: cannot load it into {where}: {str(exc)[:500]}") from exc


def load_clip(spec: str | Path | Mapping[str, Any] | ClipSource,
              device: str | torch.device = "cpu") -> tuple[OpenClipModel, Any, dict]:
    """Load a CLIP for the later stages, in eval mode, from any ``clip_ckpt`` spelling.

    :param spec: a clip-stage checkpoint, a folder with ``open_clip_config.json`` + weights (our export or
        open_clip's hub layout, optionally ``local-dir:``), ``ARCH:weights_file``, ``ARCH:random``, or a
        download (``hf-hub:org/repo``, ``ARCH:TAG``); see ``unclip.models.clip_source``.
    :return: ``(model, tokenizer, meta)``; ``meta`` has ``describe_clip``'s keys with ``clip_hash`` computed from
        the loaded weights (cached per weights file) and checked against a recorded one.
    """
    source = parse_clip_source(spec)
    if source.kind is SourceKind.CHECKPOINT:
        recorded, state = _checkpoint_meta(read_checkpoint(source.location), Path(source.location))
        meta = _describe_checkpoint(recorded, source)
        model = create_clip(meta["open_clip_config"])
        model.load_state_dict(state, strict=True)
    else:
        meta = describe_source(source)
        if source.kind is SourceKind.DOWNLOAD:
            name = HUB_PREFIX + source.location if source.arch is None else source.arch
            model = open_clip.create_model(name, pretrained=source.tag)
        elif source.tag == RANDOM:  # seeded: every load of ARCH:random is the same CLIP, so chains still check
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = create_clip(without_tower_downloads(meta["open_clip_config"]))
        else:
            model = create_clip(without_tower_downloads(meta["open_clip_config"]))
            _load_weights(model, meta["weights"], f"the CLIP of {source.spec}")
    if meta["clip_hash"] is None:  # a pretrained source: hashed once per weights file, then cached
        loaded_hash = cached_clip_hash(source, meta) or clip_hash(model.state_dict())
        _store_clip_hash(source, meta, loaded_hash)
    else:  # ours records its hash: recompute it to check the weights
        loaded_hash = clip_hash(model.state_dict())
    if meta["clip_hash"] not in (None, loaded_hash):
        raise ValueError(f"{source.spec}: weights hash {loaded_hash[:12]} differs from the recorded "
                         f"{meta['clip_hash'][:12]}")
    meta.update(clip_hash=loaded_hash, context_length=model_context_length(model),
                tokenizer=tokenizer_name(source, meta))
    return model.to(device).eval(), make_tokenizer(meta["tokenizer"], meta["context_length"]), meta


def make_loss(kind: str, local_loss: bool, gather_with_grad: bool, rank: int, world_size: int) -> nn.Module:
    """open_clip's contrastive loss for one rank.

    ``clip`` returns ``ClipLoss``: with ``local_loss`` and ``gather_with_grad`` under DDP, the mean of the
    ranks' losses equals the single-process loss on the concatenated batch, and DDP's gradient average
    equals its gradient. ``siglip`` returns ``SigLipLoss`` (neighbour exchange; needs a logit bias).

    :return: module called as ``loss(image_features [B, D], text_features [B, D], logit_scale.exp(),
        logit_bias=None) -> scalar``.
    """
    if LossKind.parse(kind) is LossKind.SIGLIP:
        return SigLipLoss(rank=rank, world_size=world_size)
    return ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=True,
                              rank=rank, world_size=world_size)


def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    """Image→text and text→image recall@k for paired embeddings (row i of each is one pair).

    Ties count against the model (a collapsed embedding scores chance, not 100%).

    :param image_emb, text_emb: [N, D] L2-normalised.
    :return: ``{"i2t_recall@k": float, "t2i_recall@k": float}`` for each k in ``ks``, in [0, 1].
    """
    sim = image_emb.float() @ text_emb.float().T  # [N images, N texts]
    true = sim.diagonal()
    i2t_rank = (sim >= true[:, None]).sum(1) - 1  # other texts scoring at least the true one
    t2i_rank = (sim >= true[None, :]).sum(0) - 1
    out = {}
    for k in ks:
        out[f"i2t_recall@{k}"] = (i2t_rank < k).float().mean().item()
        out[f"t2i_recall@{k}"] = (t2i_rank < k).float().mean().item()
    return out
