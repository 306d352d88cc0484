"""Model cards of exported stages: what a stage is, how it was trained and how to load it.

The facts come from the checkpoint (``global_step``, whether an EMA copy existed) and from its run folder when the
checkpoint sits in ``run_dir/checkpoints/``: ``metrics.json`` (the run's validation numbers) and ``config.yaml``
(the data shards). They are stored in the stage folder's ``config.json`` under ``trained`` too, so a pipeline saved
from exported folders keeps them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

ARCHITECTURES = {"prior": "PriorTransformer (decoder-only transformer over [text tokens, z_t, t, noised z_i])",
                 "decoder": "DecoderUNet (ADM U-Net conditioned on z_i and caption tokens)",
                 "upsampler": "SuperResUNet (ADM super-resolution U-Net)"}
DATA_KEYS = ("train_shards", "val_shards", "embeddings")
WEIGHTS_FROM = {"ema.module": "EMA", "net": "training weights (no EMA copy)", "model": "training weights (no EMA copy)"}


def run_files(checkpoint: Path) -> dict[str, Path]:
    """``metrics.json`` / ``config.yaml`` of the run a checkpoint belongs to (beside it or one folder up)."""
    found = {}
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        for name in ("metrics.json", "config.yaml"):
            if name not in found and (folder / name).is_file():
                found[name] = folder / name
    return found


def checkpoint_facts(path: str | Path, checkpoint: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Card facts of a stage checkpoint: ``source``, ``steps``, ``epoch``, ``data`` (shards), ``metrics``.

    :param checkpoint: the checkpoint already read (None: read it from ``path``).
    """
    from unclip.checkpoints import read_checkpoint

    path = Path(path)
    checkpoint = read_checkpoint(path) if checkpoint is None else checkpoint
    from unclip.stages import network_weights

    facts: dict[str, Any] = {"source": path.name}
    if checkpoint.get("state_dict"):  # which copy the export takes: the EMA one when there is one
        facts["weights_from"] = network_weights(checkpoint["state_dict"], str(path))[1]
    for key, name in (("global_step", "steps"), ("epoch", "epoch")):
        if checkpoint.get(key) is not None:
            facts[name] = int(checkpoint[key])
    files = run_files(path)
    if "metrics.json" in files:
        try:
            facts["metrics"] = json.loads(files["metrics.json"].read_text())
        except json.JSONDecodeError:
            facts["metrics_error"] = f"{files['metrics.json'].name} is not valid JSON"
    if "config.yaml" in files:
        import yaml

        config = yaml.safe_load(files["config.yaml"].read_text()) or {}
        data = config.get("data") or {}
        facts["data"] = {k: data[k] for k in DATA_KEYS if data.get(k)}
    return facts


def _value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def stage_card(config: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> str:
    """The README.md of a stage folder from its ``config.json`` and weights."""
    stage, model, trained = config["stage"], config["model_config"], config.get("trained") or {}
    params = sum(t.numel() for t in tensors.values())
    clip = config.get("clip") or {}
    rows = [("stage", stage), ("architecture", ARCHITECTURES.get(stage, stage)), ("parameters", f"{params:,}"),
            ("weights", f"{WEIGHTS_FROM.get(str(trained.get('weights_from')), 'as loaded')}, "
                        f"stored as {config['dtype']}")]
    if stage == "upsampler":
        residual = " (diffuses the residual over the bicubic upsample)" if config.get("residual") else ""
        rows.append(("resolution", f"{config['input_size']} → {model['image_size']}{residual}"))
    elif "image_size" in model:
        rows.append(("resolution", model["image_size"]))
    if clip:
        rows.append(("CLIP", f"embed_dim {clip.get('embed_dim')}, clip_hash `{clip.get('clip_hash')}`"))
    for key, label in (("steps", "trained steps"), ("epoch", "epochs"), ("source", "exported from")):
        if key in trained:
            rows.append((label, trained[key]))
    for key, value in (trained.get("data") or {}).items():
        rows.append((f"data.{key}", f"`{_value(value)}`"))
    rows.append(("unclip", f"{config.get('version')} ({config.get('git_commit') or 'unknown commit'})"))
    lines = [f"# unclip {stage}", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
    lines += ["## Architecture (`model_config`)", "", "| key | value |", "|---|---|"]
    lines += [f"| {k} | `{_value(v)}` |" for k, v in model.items()]
    lines += ["", "## Sampling defaults", "", "| key | value |", "|---|---|"]
    lines += [f"| {k} | `{_value(v)}` |" for k, v in (config.get("sampling") or {}).items()]
    metrics = trained.get("metrics")
    lines += ["", "## Metrics (the run's metrics.json)", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|", *(f"| {k} | {_value(v)} |" for k, v in sorted(metrics.items()))]
    else:
        lines.append("None recorded beside the checkpoint.")
    lines += ["", "## Loading", "", "```python", "from unclip.pretrained import load_stage",
              f'net, info = load_stage("path/to/this/folder", "{stage}")  # float32; safetensors + JSON only',
              "```", "", ("A whole chain: `UnCLIPPipeline.from_pretrained(folder)` on a folder written by "
                          "`unclip-export --chain` or `save_pretrained`."), ""]
    return "\n".join(lines)
