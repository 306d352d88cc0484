"""Today's (format 0) stage checkpoints, frozen as text, and the golden outputs of the networks they hold.

``tests/golden/<stage>.json`` records, per stage, what a Lightning checkpoint of that stage held before the typed
stage contract existed: the top-level keys, the ``checkpoint["unclip"]`` metadata dict and every state-dict key
with its shape and dtype. :func:`rebuild_checkpoint` writes such a checkpoint back with seeded weights, so loaders
are tested against the old format without committing binary files; :func:`golden_outputs` runs a loaded network
(one forward pass and one short sampling run, fixed seeds) and returns a few values and sums to compare with the
golden numbers recorded beside the format (``tests/golden/make_golden.py`` writes both, once, from the code of
that time).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

GOLDEN_DIR = Path(__file__).resolve().parent
STAGES = ("prior", "decoder", "upsampler", "inpaint")
WEIGHT_SCALE = 0.1  # seeded weights ~ N(0, 0.1²): outputs stay finite and far from saturation
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool)}


def read_format(stage: str) -> dict[str, Any]:
    return json.loads((GOLDEN_DIR / f"{stage}.json").read_text())


def seeded_state_dict(keys: dict[str, dict], seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights for the recorded keys: floats ~ N(0, WEIGHT_SCALE²) drawn in sorted key order, others zero."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name in sorted(keys):
        shape, dtype = tuple(keys[name]["shape"]), _DTYPES[keys[name]["dtype"]]
        if dtype.is_floating_point:
            state[name] = (torch.randn(shape, generator=generator) * WEIGHT_SCALE).to(dtype)
        else:
            state[name] = torch.zeros(shape, dtype=dtype)
    return state


def rebuild_checkpoint(stage: str, path: Path, seed: int = 0) -> Path:
    """Write a today-format checkpoint of ``stage`` (every recorded top-level key; seeded weights) to ``path``."""
    fmt = read_format(stage)
    checkpoint: dict[str, Any] = {key: 0 for key in fmt["top_level_keys"]}  # Lightning's bookkeeping: unread
    checkpoint["state_dict"] = seeded_state_dict(fmt["state_dict"], seed)
    checkpoint["unclip"] = fmt["meta"]
    torch.save(checkpoint, path)
    return path


def _summary(x: torch.Tensor) -> dict[str, Any]:
    x = x.detach().double().flatten()
    return {"first": x[:8].tolist(), "sum": float(x.sum()), "abs_sum": float(x.abs().sum()), "numel": x.numel()}


def golden_inputs(stage: str, meta: dict) -> dict[str, torch.Tensor]:
    """Fixed conditioning and inputs (seed 1) shaped from the stage's metadata."""
    g = torch.Generator().manual_seed(1)
    n = 2
    if stage == "prior":
        cfg = meta["model_config"]
        d, w, ctx = cfg["embed_dim"], cfg["text_width"], cfg["context_length"]
        mask = torch.arange(ctx)[None] < torch.tensor([[ctx], [ctx // 2]])
        return {"text_embed": torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1),
                "text_tokens": torch.randn(n, ctx, w, generator=g), "text_mask": mask,
                "x": torch.randn(n, d, generator=g)}
    if stage in ("decoder", "inpaint"):
        cfg = meta["model_config"]
        size, text = cfg["image_size"], cfg["text"]
        out = {"image_embed": torch.nn.functional.normalize(torch.randn(n, cfg["clip_embed_dim"], generator=g), -1),
               "x": torch.randn(n, 3, size, size, generator=g)}
        if text is not None:
            out["text_tokens"] = torch.randn(n, text["context_length"], text["input_width"], generator=g)
            out["text_mask"] = torch.arange(text["context_length"])[None] < torch.tensor([[5], [9]])
        if stage == "inpaint":
            out["known"] = torch.rand(n, 3, size, size, generator=g) * 2 - 1
            mask = torch.zeros(n, 1, size, size)
            mask[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
            out["mask"] = mask
        return out
    size, low = meta["image_size"], meta["input_size"]
    return {"low_res": torch.rand(n, 3, low, low, generator=g) * 2 - 1, "x": torch.randn(n, 3, size, size, generator=g)}


def golden_outputs(stage: str, net: Any, loaded: Any) -> dict[str, Any]:
    """One network forward at t = [10, 500] and one short sampling run (seed 2) from fixed inputs.

    ``loaded`` is what the loader returned beside the network (format 0's metadata dict, or a stage description),
    passed as is to the sampling functions; the inputs are shaped from the recorded format-0 metadata."""
    from unclip.decoder_sampling import (
        edit_decoder,
        sample_decoder,
        sample_upsampler,
    )
    from unclip.diffusion import create_diffusion
    from unclip.models.prior_sampling import sample_prior

    meta = read_format(stage)["meta"]
    inp = golden_inputs(stage, meta)
    t = torch.tensor([10, 500])
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        if stage == "prior":
            cond = {k: inp[k] for k in ("text_embed", "text_tokens", "text_mask")}
            forward = net(inp["x"], t, **cond)
            diffusion = loaded["diffusion"] if isinstance(loaded, dict) else loaded.diffusion
            sample = sample_prior(net, cond, create_diffusion(**diffusion), steps=4, candidates=2,
                                  generator=g)
        elif stage == "decoder":
            text = {k: inp.get(k) for k in ("text_tokens", "text_mask")}
            forward = net(inp["x"], t, inp["image_embed"], **text)
            sample = sample_decoder(net, loaded, inp["image_embed"], **text, generator=g)
        elif stage == "inpaint":
            text = {k: inp.get(k) for k in ("text_tokens", "text_mask")}
            forward = net(inp["x"], t, inp["image_embed"], **text, inpaint_image=inp["known"],
                          inpaint_mask=inp["mask"])
            sample = edit_decoder(net, loaded, inp["known"], inp["mask"], inp["image_embed"], **text, method="inpaint",
                                  generator=g).image
        else:
            from unclip.models.degradations import upsample

            aug = {"aug_level": torch.tensor([0.0, 0.3])} if net.noise_aug else {}
            forward = net(inp["x"], t, upsample(inp["low_res"], inp["x"].shape[-1]), **aug)
            sample = sample_upsampler(net, loaded, inp["low_res"], generator=g)
    return {"forward": _summary(forward), "sample": _summary(sample)}


def assert_close_to_golden(actual: dict[str, Any], golden: dict[str, Any], rel: float = 1e-4,
                           abs_: float = 1e-5) -> None:
    """Every recorded value within ``rel`` relative (or ``abs_`` absolute) tolerance; names the first miss."""
    for part, expected in golden.items():
        got = actual[part]
        assert got["numel"] == expected["numel"], f"{part}: {got['numel']} values, golden {expected['numel']}"
        pairs = list(zip(got["first"], expected["first"], strict=True)) + [(got["sum"], expected["sum"]),
                                                              (got["abs_sum"], expected["abs_sum"])]
        for k, (a, e) in enumerate(pairs):
            assert abs(a - e) <= max(rel * abs(e), abs_), f"{part} value {k}: {a!r}, golden {e!r}"


def format_0_meta(stage: str, image_size: int | None = None) -> dict[str, Any]:
    """A copy of the recorded format-0 metadata of ``stage``, optionally with another output size."""
    meta = json.loads(json.dumps(read_format(stage)["meta"]))
    if image_size is not None:
        meta["image_size"] = meta["model_config"]["image_size"] = image_size
    return meta


def metadata_checkpoint(path: Path, meta: dict[str, Any]) -> Path:
    """A checkpoint holding only ``meta`` (and no weights): enough for every metadata check."""
    torch.save({"unclip": meta, "state_dict": {}}, path)
    return path
