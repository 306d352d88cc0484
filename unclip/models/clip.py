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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import open_clip
from open_clip.loss import ClipLoss, SigLipLoss
import torch
from torch import nn

from unclip.checkpoints import read_checkpoint, stage_metadata

STAGE = "clip"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
# Top-level keys of conf/model/clip/*.yaml; anything else is a typo and is refused.
MODEL_KEYS = ("arch", "pretrained", "embed_dim", "quick_gelu", "init_logit_scale", "init_logit_bias",
              "image_mean", "image_std", "vision", "text")


class LossKind(enum.Enum):
    CLIP = "clip"      # symmetric InfoNCE over the batch (Radford et al. 2021), open_clip ClipLoss
    SIGLIP = "siglip"  # pairwise sigmoid loss (Zhai et al. 2023), open_clip SigLipLoss

    @classmethod
    def parse(cls, name: str) -> "LossKind":
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
    # Weights only ever come from a local file: never let a timm/HF tower download its own.
    if "timm_model_name" in cfg["vision_cfg"]:
        cfg["vision_cfg"]["timm_model_pretrained"] = False
    if "hf_model_name" in cfg["text_cfg"]:
        cfg["text_cfg"]["hf_model_pretrained"] = False
    return cfg


def create_clip(oc_cfg: Mapping[str, Any]) -> nn.Module:
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


def build_clip(model_cfg: Mapping[str, Any]) -> tuple[nn.Module, dict]:
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
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    return model, oc_cfg


def make_tokenizer(arch: str | None, context_length: int):
    """The open_clip tokenizer for ``arch`` (or the CLIP BPE tokenizer when None), padding/truncating
    captions to ``context_length``. Picklable, so it runs in data-loader workers.

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
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def clip_metadata(model: nn.Module, model_cfg: Mapping[str, Any], oc_cfg: Mapping[str, Any]) -> dict:
    """What a checkpoint or export records about a CLIP (the chain check reads it).

    :return: ``{"embed_dim", "image_size", "context_length", "arch", "image_mean", "image_std",
        "model_config" (ours), "open_clip_config", "clip_hash"}``.
    """
    return {"embed_dim": int(oc_cfg["embed_dim"]), "image_size": oc_cfg["vision_cfg"].get("image_size", 224),
            "context_length": int(model.context_length), "arch": model_cfg.get("arch"),
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


def _checkpoint_meta(checkpoint: dict, path: Path) -> tuple[dict, dict]:
    meta = stage_metadata(checkpoint, path, STAGE)
    prefix = "model."  # CLIPModule keeps the open_clip network as self.model
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    return meta, state


def load_clip(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Any, dict]:
    """Load a trained CLIP for the later stages, in eval mode.

    :param path: an export directory (``open_clip_config.json`` + weights) or a Lightning checkpoint
        of the clip stage (e.g. ``run_dir/checkpoints/last.ckpt``).
    :return: ``(model, tokenizer, meta)``; ``meta`` has ``embed_dim``, ``image_size``, ``context_length``,
        ``image_mean``, ``image_std``, ``model_config``, ``open_clip_config`` and ``clip_hash``
        (recomputed from the loaded weights and checked against the recorded one).
    """
    path = Path(path)
    if path.is_dir():
        config = json.loads((path / CONFIG_FILE).read_text())
        meta = dict(config.get("unclip") or {})
        if meta.get("stage", STAGE) != STAGE:
            raise ValueError(f"{path} holds a '{meta['stage']}' export, not a CLIP")
        meta["open_clip_config"] = config["model_cfg"]
        model = create_clip(meta["open_clip_config"])
        weights = [p for p in (path / WEIGHTS_FILE, path / "open_clip_pytorch_model.bin") if p.is_file()]
        if not weights:
            raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE} or open_clip_pytorch_model.bin")
        open_clip.load_checkpoint(model, str(weights[0]), strict=True, weights_only=True)
    elif path.is_file():
        meta, state = _checkpoint_meta(read_checkpoint(path), path)
        model = create_clip(meta["open_clip_config"])
        model.load_state_dict(state, strict=True)
    else:
        raise FileNotFoundError(f"no CLIP export or checkpoint at {path}")
    loaded_hash = clip_hash(model.state_dict())
    if meta.get("clip_hash") not in (None, loaded_hash):
        raise ValueError(f"{path}: weights hash {loaded_hash[:12]} differs from the recorded {meta['clip_hash'][:12]}")
    meta.update(clip_hash=loaded_hash, stage=STAGE, embed_dim=int(meta["open_clip_config"]["embed_dim"]),
                context_length=int(model.context_length))
    meta.setdefault("image_mean", list(open_clip.OPENAI_DATASET_MEAN))
    meta.setdefault("image_std", list(open_clip.OPENAI_DATASET_STD))
    tokenizer = make_tokenizer(meta.get("arch"), meta["context_length"])
    return model.to(device).eval(), tokenizer, meta


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
