"""Config checks that read only metadata, run by ``train`` before anything is built or written.

Each failure is a :class:`ConfigError` naming the config key (and the file it disagrees with): shard specs that
match no files, hard-negative captions outside the clip stage's softmax loss, a global batch that does not split
evenly over devices, and embedding or image sizes that do not chain (the prior's or decoder's CLIP sizes against
``clip_ckpt`` / ``data.embeddings``, an upsampler's ``module.input_size`` against the output size of the stage
before it).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from unclip.config import ConfigError
from unclip.data.embeddings import read_meta, stores_token_encodings
from unclip.data.shards import ShardSpecError, expand_shards
from unclip.diffusion import create_diffusion
from unclip.models.clip_embedder import clip_meta
from unclip.models.hard_negative_loss import SIGLIP_REFUSAL
from unclip.stages import ClipInfo, clip_mismatches, input_size_mismatch, read_stage
from unclip.training.conditioning import recorded_clip_source, refuse_disagreement
from unclip.training.ema import make_ema
from unclip.training.optim import warmup_cosine

log = logging.getLogger(__name__)


def preflight(cfg: DictConfig) -> None:
    """Run every check; ``global_batch_size`` (when set) also fills in ``data.batch_size``."""
    check_shards(cfg)
    check_hard_negatives(cfg)
    apply_global_batch_size(cfg)
    check_chain(cfg)
    check_token_encodings(cfg)


# ---- keys of plain option dicts ----------------------------------------------------------------------------------

# Module arguments given as plain dicts (no _target_) and the function their keys go to, minus what the module
# passes itself. A misspelt key here would otherwise be ignored (ema) or fail only once fit has started (scheduler).
OPTION_GROUPS: dict[str, tuple[Callable[..., Any], set[str]]] = {
    "scheduler": (warmup_cosine, {"optimizer"}), "ema": (make_ema, {"model"}), "diffusion": (create_diffusion, set())}


def check_option_keys(cfg: DictConfig) -> None:
    """Refuse unknown keys in ``module.scheduler``, ``module.ema`` and ``module.diffusion``."""
    module = cfg.get("module") or {}
    for name, (fn, passed) in OPTION_GROUPS.items():
        node = module.get(name)
        if not isinstance(node, DictConfig) or "_target_" in node:
            continue
        accepted = set(inspect.signature(fn).parameters) - passed
        unknown = [k for k in node if k not in accepted]
        if unknown:
            raise ConfigError(f"unknown key 'module.{name}.{unknown[0]!s}' for {fn.__module__}.{fn.__name__}; "
                              f"valid keys: {', '.join(sorted(accepted))}")


# ---- data -------------------------------------------------------------------------------------------------------

def check_shards(cfg: DictConfig) -> None:
    """Expand ``data.train_shards`` / ``data.val_shards``: local files must exist, patterns must match."""
    data = cfg.get("data") or {}
    for key in ("train_shards", "val_shards"):
        spec = data.get(key)
        if spec is None and key == "val_shards":
            continue
        try:
            value = OmegaConf.to_object(spec) if OmegaConf.is_config(spec) else spec
            if not (value is None or isinstance(value, (str, list))):
                raise ConfigError(f"data.{key} must be a shard pattern or a list of them, got {type(value).__name__}")
            expand_shards(value, f"data.{key}")
        except ShardSpecError as exc:
            raise ConfigError(str(exc)) from exc


def check_hard_negatives(cfg: DictConfig) -> None:
    """``data.hard_negatives`` only means something to the clip stage's softmax loss; elsewhere it would be ignored."""
    k = (cfg.get("data") or {}).get("hard_negatives") or 0
    if not k:
        return
    if cfg.get("stage") != "clip":
        raise ConfigError(f"data.hard_negatives={k} is used by stage=clip only (stage={cfg.get('stage')} would "
                          f"tokenize the captions and ignore them): set data.hard_negatives=0")
    if (cfg.get("module") or {}).get("loss") == "siglip":
        raise ConfigError(SIGLIP_REFUSAL)


def device_count(devices: Any, accelerator: Any) -> int:
    """Processes per node that Lightning will start for ``trainer.devices`` (int, "auto", -1, list or "0,1")."""
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices)
    text = str(devices).strip()
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    if text in ("auto", "-1"):
        gpus = torch.cuda.device_count() if accelerator in ("gpu", "cuda", "auto") else 0
        return max(1, gpus)
    try:
        return int(text)
    except ValueError as exc:
        raise ConfigError(f"trainer.devices={devices!r} is not a count, a list or 'auto'") from exc


def apply_global_batch_size(cfg: DictConfig) -> None:
    """With ``global_batch_size`` set, derive the per-rank ``data.batch_size``; refuse one that does not divide."""
    total = cfg.get("global_batch_size")
    if total is None:
        return
    trainer = cfg.trainer
    devices = device_count(trainer.get("devices", 1), trainer.get("accelerator", "auto"))
    nodes = int(trainer.get("num_nodes", 1) or 1)
    accumulate = int(trainer.get("accumulate_grad_batches", 1) or 1)
    split = devices * nodes * accumulate
    if total < 1 or total % split:
        raise ConfigError(f"global_batch_size={total} does not divide across trainer.devices={devices} x "
                          f"trainer.num_nodes={nodes} x trainer.accumulate_grad_batches={accumulate} = {split}: "
                          f"use a multiple of {split}, or change the devices")
    per_rank = total // split
    if per_rank != cfg.data.batch_size:
        log.info("global_batch_size=%d over %d rank-steps: data.batch_size=%d (was %s)", total, split, per_rank,
                 cfg.data.batch_size)
    with open_dict(cfg):
        cfg.data.batch_size = per_rank


# ---- the chain of checkpoints -----------------------------------------------------------------------------------

def _clip_sources(cfg: DictConfig) -> list[tuple[str, ClipInfo]]:
    """(config key=value, the CLIP's facts) of each CLIP source given, refusing two that disagree."""
    sources = []
    clip_ckpt = cfg.get("clip_ckpt")
    if clip_ckpt is not None:
        try:
            sources.append((f"clip_ckpt={clip_ckpt}", ClipInfo.from_meta(clip_meta(clip_ckpt))))
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"clip_ckpt={clip_ckpt}: {exc}") from exc
    embeddings = OmegaConf.select(cfg, "data.embeddings")
    if embeddings is not None:
        try:
            sources.append((f"data.embeddings={embeddings}", ClipInfo.from_meta(read_meta(embeddings))))
        except FileNotFoundError as exc:
            raise ConfigError(f"data.embeddings={embeddings}: {exc}") from exc
    if len(sources) == 2:
        refuse_disagreement(sources[0][1], sources[0][0], sources[1][1], sources[1][0])
    return sources


def check_chain(cfg: DictConfig) -> None:
    """Sizes that must agree with the checkpoints this stage builds on (metadata only, no weights read)."""
    stage = cfg.get("stage")
    if stage in ("prior", "decoder"):
        model = OmegaConf.to_container(cfg.model, resolve=True) if cfg.get("model") is not None else {}
        for source, clip in _clip_sources(cfg):
            for mismatch in clip_mismatches(stage, model, clip):  # type: ignore[arg-type]
                raise ConfigError(mismatch.message("", source))
    elif stage == "upsampler":
        check_upsampler_input(cfg)


def check_token_encodings(cfg: DictConfig) -> None:
    """Embeddings stored with caption ids only need a CLIP text tower: ``clip_ckpt`` or the one meta.json records."""
    stage, embeddings = cfg.get("stage"), OmegaConf.select(cfg, "data.embeddings")
    uses_text = stage == "prior" or (stage == "decoder" and OmegaConf.select(cfg, "model.text") is not None)
    if not uses_text or embeddings is None or cfg.get("clip_ckpt") is not None:
        return
    meta = read_meta(embeddings)
    if not stores_token_encodings(meta):
        recorded_clip_source(str(embeddings), meta)  # raises a ConfigError naming clip_ckpt


def previous_output_size(decoder_ckpt: str | None, upsampler_ckpts: Any) -> tuple[str, str, int] | None:
    """(config key, path, output size) of the last checkpoint of the chain before an upsampler, or None.

    :raises ConfigError: naming the key of a checkpoint that cannot be read or is of another stage.
    """
    chain = [("decoder_ckpt", decoder_ckpt, "decoder")]
    chain += [(f"upsampler_ckpts[{i}]", p, "upsampler") for i, p in enumerate(upsampler_ckpts or [])]
    key, path, stage = chain[-1]
    if path is None:
        return None
    try:
        return key, path, read_stage(path, stage).image_size
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise ConfigError(f"{key}={path}: {exc}") from exc


def check_upsampler_input(cfg: DictConfig) -> None:
    """``module.input_size`` must be the output size of the last checkpoint of the chain before it."""
    previous = previous_output_size(cfg.get("decoder_ckpt"), cfg.get("upsampler_ckpts"))
    if previous is None:
        return
    key, path, size = previous
    mismatch = input_size_mismatch(OmegaConf.select(cfg, "module.input_size"), size)
    if mismatch is not None:
        raise ConfigError(mismatch.message("", f"{key}={path}"))
