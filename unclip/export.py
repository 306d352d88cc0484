"""``unclip-export``: training checkpoints → folders of EMA weights that load without pickles or Lightning.

    unclip-export runs/prior/<run>/checkpoints/last.ckpt exports/prior [--dtype bf16]
    unclip-export --chain exports/chain --clip runs/clip/<run>/clip_export --prior PRIOR.ckpt \\
        --decoder DECODER.ckpt --upsamplers UP64.ckpt UP256.ckpt [--dtype bf16]

A stage checkpoint becomes a stage folder (``unclip.pretrained``: ``config.json``, ``model.safetensors``,
``README.md``); a clip-stage checkpoint becomes our open_clip export; ``--chain`` checks the chain exactly as
``UnCLIPPipeline.from_checkpoints`` does and writes a pipeline folder for ``UnCLIPPipeline.from_pretrained``.
Prints one JSON object describing what was written.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from unclip.pretrained import CONFIG_FILE, DTYPES, clip_export_meta, export_chain, parse_dtype, save_stage
from unclip.stages import STAGES, ContractError, network_weights


def export_checkpoint(checkpoint: str | Path, directory: str | Path,
                      dtype: torch.dtype | str | None = None) -> dict[str, Any]:
    """Write the folder of one stage checkpoint (EMA weights in ``dtype``, default as trained).

    :return: ``{"folder", "stage", "parameters", "dtype", "weights_from"}``.
    :raises ValueError: not an unclip checkpoint, an unknown stage, or weights that do not fit its config.
    """
    from unclip.checkpoints import CHECKPOINT_KEY, read_checkpoint
    from unclip.model_card import checkpoint_facts

    path = Path(checkpoint)
    if path.is_dir():
        raise ValueError(f"{path} is a folder: unclip-export takes a training checkpoint (.ckpt); folders are "
                         f"already exported (chain them with --chain)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    ckpt = read_checkpoint(path)
    meta = ckpt.get(CHECKPOINT_KEY)
    if not isinstance(meta, dict) or "stage" not in meta:
        raise ContractError(f"{path} is not an unclip checkpoint (no checkpoint['{CHECKPOINT_KEY}']['stage'])")
    if meta["stage"] == "clip":
        return _export_clip(path, Path(directory), dtype)
    if meta["stage"] not in STAGES:
        raise ContractError(f"{path}: checkpoint['{CHECKPOINT_KEY}']['stage']={meta['stage']!r} is not a stage "
                            f"unclip-export knows; valid: clip, {', '.join(STAGES)}")
    info = STAGES[meta["stage"]].from_checkpoint(ckpt, str(path))
    weights, prefix = network_weights(ckpt.get("state_dict") or {}, str(path))
    save_stage(weights, info, directory, dtype, checkpoint_facts(path, ckpt))
    stored = json.loads((Path(directory) / CONFIG_FILE).read_text())["dtype"]
    return {"folder": str(directory), "stage": info.stage, "parameters": sum(w.numel() for w in weights.values()),
            "dtype": stored, "weights_from": prefix}


def _export_clip(path: Path, directory: Path, dtype: torch.dtype | str | None) -> dict[str, Any]:
    from unclip.models.clip import export_open_clip
    from unclip.models.clip_embedder import FrozenCLIP

    if parse_dtype(dtype) not in (None, torch.float32):
        raise ValueError(f"{path} is a CLIP: it is exported in float32 only (the later stages check its weights "
                         f"by their hash); drop --dtype")
    clip = FrozenCLIP.from_path(path)
    export_open_clip(clip.model, clip_export_meta(clip.meta), directory)
    return {"folder": str(directory), "stage": "clip",
            "parameters": sum(p.numel() for p in clip.model.state_dict().values()), "dtype": "float32"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unclip-export", description="Turn unclip training checkpoints into safetensors folders (EMA weights, "
        "config.json, model card) that load without pickles or Lightning.",
        usage="unclip-export CKPT OUT_DIR [--dtype D]\n       unclip-export --chain OUT_DIR --clip CLIP "
              "--decoder CKPT [--prior CKPT] [--upsamplers CKPT ...] [--dtype D]")
    parser.add_argument("paths", nargs="+", help="CKPT OUT_DIR, or OUT_DIR with --chain")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="store the stages' weights in this dtype (default: as trained); they load as float32")
    parser.add_argument("--chain", action="store_true", help="write a pipeline folder for from_pretrained")
    parser.add_argument("--clip", help="--chain: clip-stage checkpoint or CLIP folder")
    parser.add_argument("--prior", help="--chain: prior checkpoint (optional: image-conditioned modes only)")
    parser.add_argument("--decoder", help="--chain: decoder checkpoint")
    parser.add_argument("--upsamplers", nargs="*", default=[], help="--chain: upsampler checkpoints, cascade order")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    chain_args = [name for name in ("clip", "prior", "decoder") if getattr(args, name)] + (
        ["upsamplers"] if args.upsamplers else [])
    if args.chain:
        if len(args.paths) != 1 or not (args.clip and args.decoder):
            parser.error("--chain takes one OUT_DIR and needs --clip and --decoder")
    elif len(args.paths) != 2 or chain_args:
        parser.error(f"a stage export takes CKPT OUT_DIR{f' (--{chain_args[0]} needs --chain)' if chain_args else ''}")
    try:
        if args.chain:
            out = export_chain(args.clip, args.decoder, args.paths[0], args.prior, args.upsamplers, args.dtype)
            result: dict[str, Any] = {"folder": str(out), **json.loads((out / "pipeline.json").read_text())}
        else:
            result = export_checkpoint(args.paths[0], args.paths[1], args.dtype)
    except (ValueError, FileNotFoundError) as exc:
        print(f"unclip-export: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

