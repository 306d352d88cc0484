"""``unclip-eval --config-name evaluate_edit``: text-guided edits of val images inside generated masks, measured.

For each of the first ``num_samples`` val samples (read at the chain's output size, quantised to 8 bits as a saved
PNG is): a mask from the configured mix (``conf/masks``, whole-image masks off by default), a new caption (that of
another val sample by a seeded random cyclic permutation, or the sample's own), and one edit through
:meth:`UnCLIPPipeline.edit` (caption → prior → z_i → inpainting decoder or RePaint → upsamplers). Reported:

* ``outside_error_raw``: how far the sampler's output strays from the original over the kept pixels (mask = 0),
  BEFORE compositing: MSE and MAE per channel value in [-1, 1] units, averaged over samples, and the largest
  absolute difference; this measures how faithful the sampler is to the known region.
* ``outside_error``: the same AFTER compositing (the returned edit): ~0 by construction (exactly 0 up to float
  round-off, since the originals are 8-bit quantised like the outputs).
* ``clip_score_new`` / ``clip_score_original``: CLIP score 100·max(cos, 0) of the edited image against the new
  caption / against the sample's original caption; ``clip_score_real`` gives the unedited image against both, so
  the gain over the original image is readable. The scorer warning of ``unclip-eval`` applies.
* ``fd_clip_masked``: Fréchet distance between the scorer CLIP's embeddings of the masked-region crops of the edits
  and of the real images (crop: the mask's bounding box, grown to a square or stretched, resized to ``crop_size``).
* ``fid_masked``: the same on Inception-v3 pool3 features when its weights load (else null and a note).
* ``by_mask_kind``: per kind (box, brush, outpaint, full) the count, mean mask area, raw outside MSE, CLIP score.

Every random draw is seeded by (``seed``, sample index), so any number of ranks gives the same edits. Under
``torchrun`` rank r edits samples r, r + W, ...; per-sample results and features are gathered to rank 0 before any
distance is computed.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from unclip.config import ConfigError, require_keys
from unclip.data.masks import MaskGenerator
from unclip.decoder_sampling import EDIT_METHODS
from unclip.diffusion.inpaint import outside_mask_error
from unclip.evaluation.features import InceptionFeatures
from unclip.evaluation.metrics import clip_score, frechet_distance_from_features
from unclip.evaluation.real_data import read_real_set
from unclip.evaluation.run import distributed, gather, load_inception, run_description
from unclip.images import image_grid, to_uint8
from unclip.models.clip_embedder import FrozenCLIP
from unclip.models.degradations import resize
from unclip.pipeline import UnCLIPPipeline

NEW_CAPTIONS = ("other", "own")
CROPS = ("square", "box")
FEATURE_EXTRACTORS = ("auto", "inception", "clip")
OVERLAY = (1.0, -1.0, -1.0)  # the mask overlay's tint (red), blended 50 % over the generated region


def check_config(cfg: DictConfig) -> MaskGenerator:
    """Refuse a config that cannot work before anything is loaded, naming the key; return the mask generator."""
    require_keys(cfg, "clip_ckpt", "prior_ckpt", "decoder_ckpt", "val_shards")
    if cfg.prior_ckpt is None:
        raise ConfigError("prior_ckpt must be set: the new caption reaches the decoder through the prior's z_i")
    choices = {"new_caption": NEW_CAPTIONS, "method": EDIT_METHODS, "crop": CROPS,
               "feature_extractor": FEATURE_EXTRACTORS}
    for key, valid in choices.items():
        if cfg[key] not in valid:
            raise ConfigError(f"{key}={cfg[key]!r} is not one of {valid}")
    for key, least in (("num_samples", 2), ("jump_length", 1), ("jump_n_sample", 1), ("grid_size", 0)):
        if int(cfg[key]) < least:
            raise ConfigError(f"{key} must be >= {least}, got {cfg[key]}"
                              + (" (Fréchet distances and the caption permutation need two samples)"
                                 if key == "num_samples" else ""))
    if cfg.crop_size is not None and int(cfg.crop_size) < 1:
        raise ConfigError(f"crop_size must be a positive number of pixels or null, got {cfg.crop_size}")
    try:
        return instantiate(cfg.masks, _convert_="all")
    except Exception as exc:  # noqa: BLE001 - any bad mask config, reported under its key
        raise ConfigError(f"masks: {exc.__cause__ or exc}") from exc  # the generator's own message, not Hydra's


def caption_permutation(n: int, mode: str, seed: int) -> list[int]:
    """Whose caption each sample is edited towards: itself ("own"), or a seeded random cyclic permutation
    (Sattolo's algorithm, uniform over the n-cycles, so no sample keeps its own caption) for "other"."""
    order = list(range(n))
    if mode == "own":
        return order
    rng = random.Random(seed)
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)  # j < i: Sattolo's variant of Fisher-Yates gives a single cycle
        order[i], order[j] = order[j], order[i]
    return order


def sample_seed(tag: str, seed: int, index: int) -> int:
    """A 63-bit seed for one draw of one sample, independent across tags, seeds and indices."""
    return int.from_bytes(hashlib.sha256(f"{tag}:{seed}:{index}".encode()).digest()[:8], "little") >> 1


def crop_box(mask: torch.Tensor, mode: str) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the masked region of a [1, H, W] (or [H, W]) mask: its bounding box, or for
    "square" that box grown to a square of side max(h, w) around its centre, shifted to lie inside the image."""
    m = mask.reshape(mask.shape[-2:]).bool()
    ys, xs = m.any(dim=1).nonzero().flatten(), m.any(dim=0).nonzero().flatten()
    top, left = int(ys[0]), int(xs[0])
    h, w = int(ys[-1]) - top + 1, int(xs[-1]) - left + 1
    if mode == "box":
        return top, left, h, w
    height, width = m.shape
    side = min(max(h, w), height, width)
    top = min(max(top - (side - h) // 2, 0), height - side)
    left = min(max(left - (side - w) // 2, 0), width - side)
    return top, left, side, side


def crop_resize(images: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """:param images: [B, 3, H, W] in [-1, 1]. :return: [B, 3, size, size], the box resized bicubic (antialiased)."""
    top, left, h, w = box
    crop = images[:, :, top:top + h, left:left + w]
    return resize(crop, size)


def overlay(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] images with the generated region (mask = 1) tinted red, for the grid."""
    tint = torch.tensor(OVERLAY, device=image.device, dtype=image.dtype).view(1, 3, 1, 1)
    return torch.where(mask.bool(), (image + tint) / 2, image)


def _outside(x: torch.Tensor, known: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    keep = ~mask.bool()
    diff = (x.float() - known.float()).abs()
    return {"mse": float(outside_mask_error(x, known, mask, "mse")[0]),
            "mae": float(outside_mask_error(x, known, mask, "mae")[0]),
            "max_abs": float(diff.masked_select(keep.expand_as(diff)).max()) if keep.any() else float("nan")}


def evaluate_edits(cfg: DictConfig) -> dict | None:
    """Run the editing evaluation; rank 0 writes ``out_dir/edit_report.json`` and ``edit_grid.png`` and returns
    the report (other ranks return None)."""
    start = time.perf_counter()
    masks = check_config(cfg)
    rank, world, device = distributed(cfg.device)
    pipe = UnCLIPPipeline.from_checkpoints(clip=cfg.clip_ckpt, prior=cfg.prior_ckpt, decoder=cfg.decoder_ckpt,
                                           upsamplers=list(cfg.upsampler_ckpts or []), device=device)
    inpainter = bool(getattr(pipe.chain.decoder.net, "inpaint", False))
    if cfg.method == "inpaint" and not inpainter:
        raise ConfigError("method=inpaint needs an inpainting decoder (model.inpaint=true); decoder_ckpt is a base "
                          "decoder: use method=repaint or auto")
    knobs: dict[str, Any] = {k: OmegaConf.to_container(cfg[k], resolve=True) if cfg[k] is not None else None
                             for k in ("prior", "decoder", "upsamplers")}
    settings = pipe.settings(**knobs)
    size, n, seed = pipe.output_size, int(cfg.num_samples), int(cfg.seed)
    scorer = pipe.clip if cfg.clip_scorer is None else FrozenCLIP.from_path(cfg.clip_scorer, device)
    crop_size = int(cfg.crop_size or scorer.meta["image_size"])
    inception, fid_note = load_inception(cfg, device)

    originals: dict[int, torch.Tensor] = {}  # this rank's val images, uint8 [3, S, S] (a quarter of float32)

    def keep_mine(images: torch.Tensor, first: int, *_: Any) -> None:
        for j in range(images.shape[0]):
            if (first + j) % world == rank:
                originals[first + j] = to_uint8(images[j])

    real = read_real_set(cfg.val_shards, n, size, on_images=keep_mine)
    targets = caption_permutation(n, cfg.new_caption, seed)
    options = {"method": cfg.method, "jump_length": int(cfg.jump_length), "jump_n_sample": int(cfg.jump_n_sample),
               **knobs}
    rows = []
    for i in tqdm(range(rank, n, world), desc=f"edit eval rank {rank}", disable=rank != 0):
        known = (originals.pop(i).float() / 127.5 - 1)[None].to(device)  # [1, 3, S, S], exactly 8-bit levels
        mask, kinds = masks.sample(1, size, torch.Generator().manual_seed(sample_seed("mask", seed, i)), device)
        g = torch.Generator(device=device).manual_seed(sample_seed("edit", seed, i))
        out = pipe.edit(known[0], mask, real.captions[targets[i]], 1, generator=g, output_type="pt", **options)
        rows.append(_measure(i, kinds[0], known, mask, out.images * 2 - 1, out.raw * 2 - 1,
                             [real.captions[targets[i]], real.captions[i]], scorer, inception, cfg.crop, crop_size,
                             i < int(cfg.grid_size)))
    rows = sorted(gather(rows, world), key=lambda r: r["index"])
    if rank != 0:
        return None

    method_used = "inpaint" if cfg.method == "inpaint" or (cfg.method == "auto" and inpainter) else "repaint"
    report: dict[str, Any] = {
        "task": "edit", "num_samples": n, "image_size": size, "world_size": world, "device": str(device),
        "method": cfg.method, "method_used": method_used, "new_caption": cfg.new_caption,
        "new_caption_same_as_original": sum(real.captions[targets[r["index"]]] == real.captions[r["index"]]
                                            for r in rows),
        **_metrics(rows, inception is not None),
        "crop": {"mode": cfg.crop, "size": crop_size},
        "masks": {"kinds": dict(Counter(r["kind"] for r in rows)), "area_mean": _mean([r["area"] for r in rows]),
                  "config": OmegaConf.to_container(cfg.masks, resolve=True)},
        "by_mask_kind": _by_kind(rows),
        "repaint": {"jump_length": int(cfg.jump_length), "jump_n_sample": int(cfg.jump_n_sample)},
        "seed": seed,
        **run_description(cfg, settings, scorer, real.skipped, "edits"),
    }
    if inception is None:
        report["fid_masked_note"] = fid_note
    report["feature_extractor"] = (InceptionFeatures.name if inception is not None else
                                   f"clip image embedding (hash {scorer.clip_hash[:12]}); no FID")
    report["seconds"] = round(time.perf_counter() - start, 1)
    _write(Path(cfg.out_dir), report, rows, real.captions, targets)
    return report


@torch.no_grad()
def _measure(index: int, kind: str, known: torch.Tensor, mask: torch.Tensor, edited: torch.Tensor,
             raw: torch.Tensor, captions: list[str], scorer: FrozenCLIP, inception: InceptionFeatures | None,
             crop: str, crop_size: int, in_grid: bool) -> dict[str, Any]:
    """One edit's numbers and features (on the CPU, to be gathered).

    :param known, edited, raw: [1, 3, S, S] in [-1, 1]: the original, the composited edit, the edit before
        compositing. :param mask: [1, 1, S, S], 1 = generated. :param captions: [new, original].
    """
    images = torch.cat([edited, known])  # [2, 3, S, S]: edit, real
    crops = crop_resize(images, crop_box(mask[0], crop), crop_size)
    text = scorer.embed_text(scorer.tokenize(captions))["text_embed"].float().cpu()  # [2, D]: new, original
    row = {"index": index, "kind": kind, "area": float(mask.float().mean()),
           "outside_raw": _outside(raw, known, mask), "outside": _outside(edited, known, mask),
           "clip": scorer.embed_images(images).float().cpu(), "text": text,
           "crop_clip": scorer.embed_images(crops).float().cpu(),
           "crop_inception": inception(crops).cpu() if inception is not None else None, "grid": None}
    if in_grid:
        row["grid"] = torch.cat([known, overlay(known, mask), edited]).cpu()  # [3, 3, S, S]: the grid's rows
    return row


def _mean(values: list[float]) -> float | None:
    """Mean of the finite values; None when there are none (e.g. outside errors of whole-image masks only)."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def _error_summary(rows: list[dict], key: str) -> dict[str, Any]:
    counted = [r[key] for r in rows if math.isfinite(r[key]["mse"])]  # whole-image masks keep nothing
    return {"mse": _mean([c["mse"] for c in counted]), "mae": _mean([c["mae"] for c in counted]),
            "max_abs": max((c["max_abs"] for c in counted), default=None), "n": len(counted)}


def _metrics(rows: list[dict], with_inception: bool) -> dict[str, Any]:
    """The report's metric fields from the gathered rows (rank 0)."""
    edit_clip = torch.stack([r["clip"][0] for r in rows])  # [N, D]
    real_clip = torch.stack([r["clip"][1] for r in rows])
    new_text = torch.stack([r["text"][0] for r in rows])
    old_text = torch.stack([r["text"][1] for r in rows])
    crops = torch.stack([r["crop_clip"] for r in rows])  # [N, 2, D]: edit, real
    out = {"outside_error_raw": _error_summary(rows, "outside_raw"), "outside_error": _error_summary(rows, "outside"),
           "clip_score_new": clip_score(edit_clip, new_text), "clip_score_original": clip_score(edit_clip, old_text),
           "clip_score_real": {"new": clip_score(real_clip, new_text), "original": clip_score(real_clip, old_text)},
           "fd_clip_masked": frechet_distance_from_features(crops[:, 1], crops[:, 0]), "fid_masked": None}
    if with_inception:
        incep = torch.stack([r["crop_inception"] for r in rows])  # [N, 2, 2048]
        out["fid_masked"] = frechet_distance_from_features(incep[:, 1], incep[:, 0])
    return out


def _by_kind(rows: list[dict]) -> dict[str, dict[str, Any]]:
    out = {}
    for kind in sorted({r["kind"] for r in rows}):
        mine = [r for r in rows if r["kind"] == kind]
        out[kind] = {"n": len(mine), "area_mean": _mean([r["area"] for r in mine]),
                     "outside_error_raw_mse": _mean([r["outside_raw"]["mse"] for r in mine]),
                     "clip_score_new": clip_score(torch.stack([r["clip"][0] for r in mine]),
                                                  torch.stack([r["text"][0] for r in mine]))}
    return out


def _write(out_dir: Path, report: dict, rows: list[dict], captions: list[str], targets: list[int]) -> None:
    """``edit_report.json``; ``edit_grid.png`` (one column per sample; rows: original, mask overlay, edit) and
    ``edit_grid.txt`` (each column's original → new caption)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shown = [r for r in rows if r["grid"] is not None]
    if shown:
        images = torch.stack([r["grid"] for r in shown], dim=1).flatten(0, 1)  # row-major: [3·K, 3, S, S]
        image_grid(images, nrow=len(shown)).save(out_dir / "edit_grid.png")
        (out_dir / "edit_grid.txt").write_text("".join(f"{r['index']}: {captions[r['index']]} -> "
                                                       f"{captions[targets[r['index']]]}\n" for r in shown))
    (out_dir / "edit_report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
