"""``unclip-eval``'s job: sample for validation captions and measure the samples against the real images.

For the first ``num_samples`` val samples: caption → image through the whole chain; then, against the real images
at the chain's output size,

* FID (Inception-v3 pool3, the pytorch-fid / torch-fidelity network; Fréchet distance in float64),
* FD-CLIP (the same distance on the scorer CLIP's image embeddings; needs no download),
* KID (mean, std over subsets) and precision/recall (k-NN, k = 3) on the FID features (FD-CLIP's without them),
* CLIP score 100·max(cos(image, caption), 0) with a named scorer CLIP (the report warns when it is the CLIP the
  chain conditions on: the prior and decoder were trained to please it),
* on the built-in demo data, caption accuracy (shape, colour, ...) by the data set's own checker, split into
  seen and held-out colour×shape pairs, with the checker's accuracy on the real images beside it.

Under several processes (``torchrun``), rank r samples captions r, r + W, ...; features and per-sample results
are gathered to rank 0 before any distance is computed (never an average of per-rank FIDs).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from unclip.data.demo_shapes import COLORS, POSITIONS, SHAPES, SIZES
from unclip.data.demo_shapes_check import caption_matches, parse_caption
from unclip.evaluation.features import InceptionFeatures
from unclip.evaluation.metrics import (clip_score, frechet_distance_from_features, kernel_inception_distance,
                                       precision_recall)
from unclip.evaluation.real_data import cache_key, load_cached, read_real_set, store_cached
from unclip.images import image_grid, save_pngs, to_pil
from unclip.models.clip_embedder import FrozenCLIP
from unclip.pipeline import UnCLIPPipeline

ATTRIBUTES = ("shape", "color", "background", "size", "position", "all")


def distributed(device: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device), joining the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if device is None:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    return rank, world, torch.device(device)


def gather(rows: list[Any], world: int) -> list[Any]:
    """Every rank's ``rows`` concatenated in rank order (on every rank); the rows themselves when alone."""
    if world == 1:
        return rows
    everyone: list[list[Any] | None] = [None] * world
    dist.all_gather_object(everyone, rows)
    return [row for part in everyone for row in (part or [])]


def load_inception(cfg: DictConfig, device: torch.device) -> tuple[InceptionFeatures | None, str | None]:
    """The FID network, or (None, why) when ``feature_extractor`` is auto and it cannot be loaded (offline)."""
    if cfg.feature_extractor == "clip":
        return None, "feature_extractor=clip"
    try:
        return InceptionFeatures(cfg.inception_weights).to(device).eval(), None
    except Exception as exc:  # noqa: BLE001 - any failure to get the weights (no network, bad file)
        if cfg.feature_extractor == "inception":
            raise RuntimeError(f"feature_extractor=inception but its weights could not be loaded "
                               f"(inception_weights={cfg.inception_weights}): {exc}") from exc
        return None, (f"Inception-v3 weights unavailable ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
                      f"set inception_weights=PATH to pt_inception-2015-12-05 weights for FID")


def run_description(cfg: DictConfig, settings: dict, scorer: FrozenCLIP, skipped: dict, what: str) -> dict:
    """The report fields that say what was evaluated and how: checkpoints, val shards, per-stage sampling
    (steps and guidance as docs/design.md names them), the CLIP scorer (warned when it is the chain's own CLIP)."""
    out = {
        "clip_scorer": f"{cfg.clip_scorer or cfg.clip_ckpt} (hash {scorer.clip_hash[:12]})",
        "steps": {"prior": settings["prior"]["steps"], "decoder": settings["decoder"]["steps"],
                  "upsamplers": [u["steps"] for u in settings["upsamplers"]]},
        "guidance": {"prior": settings["prior"]["guidance_scale"], "decoder": settings["decoder"]["guidance_scale"]},
        "sampling": settings,
        "checkpoints": {"clip": str(cfg.clip_ckpt), "prior": str(cfg.prior_ckpt), "decoder": str(cfg.decoder_ckpt),
                        "upsamplers": [str(p) for p in cfg.upsampler_ckpts or []]},
        "val_shards": OmegaConf.to_container(cfg.val_shards) if OmegaConf.is_config(cfg.val_shards) else cfg.val_shards,
        "data_skipped": skipped,
        "overrides": list(cfg.get("overrides") or []),  # unclip-eval's command line (scripts/collect_runs.py columns)
    }
    if cfg.clip_scorer is None:
        out["clip_scorer_warning"] = (f"the CLIP score uses the CLIP the chain conditions on; the prior and decoder "
                                      f"were trained against it, so it flatters the {what}; set clip_scorer")
    return out


def _demo_captions(captions: list[str]) -> bool:
    try:
        for c in captions:
            parse_caption(c)
    except ValueError:
        return False
    return True


def chance_levels() -> dict[str, float]:
    """Caption accuracy of guessing each attribute uniformly (a shape's colour is never its background's)."""
    return {"shape": 1 / len(SHAPES), "color": 1 / (len(COLORS) - 1), "background": 1 / len(COLORS),
            "size": 1 / len(SIZES), "position": 1 / len(POSITIONS)}


def _accuracy(rows: list[dict]) -> dict[str, float | None]:
    out: dict[str, float | None] = {"n": float(len(rows))}
    for key in ATTRIBUTES:
        values = [float(r[key]) for r in rows if r.get(key) is not None]
        out[key] = sum(values) / len(values) if values else None  # e.g. position when no caption names one
    return out


def _split_accuracy(rows: list[dict]) -> dict[str, Any]:
    return {"all": _accuracy(rows), "seen": _accuracy([r for r in rows if not r["held_out"]]),
            "held_out": _accuracy([r for r in rows if r["held_out"]])}


def evaluate(cfg: DictConfig) -> dict | None:
    """Run the evaluation; rank 0 writes ``out_dir/report.json`` and ``grid.png`` and returns the report."""
    start = time.perf_counter()
    rank, world, device = distributed(cfg.device)
    out_dir = Path(cfg.out_dir)
    pipe = UnCLIPPipeline.from_checkpoints(clip=cfg.clip_ckpt, prior=cfg.prior_ckpt, decoder=cfg.decoder_ckpt,
                                           upsamplers=list(cfg.upsampler_ckpts or []), device=device)
    knobs = {k: OmegaConf.to_container(cfg[k], resolve=True) if cfg[k] is not None else None
             for k in ("prior", "decoder", "upsamplers")}
    settings = pipe.settings(**knobs)
    size = pipe.output_size
    n = int(cfg.num_samples)
    scorer = pipe.clip if cfg.clip_scorer is None else FrozenCLIP.from_path(cfg.clip_scorer, device)
    inception, fid_note = load_inception(cfg, device)
    real, real_features, real_rows, cached = _real_side(cfg, n, size, rank, scorer, inception, device)
    demo = _demo_captions(real.captions)

    mine = list(range(rank, n, world))
    rows: list[dict] = []
    grid_ids = set(range(min(int(cfg.grid_size), n)))
    batches = [mine[i:i + int(cfg.batch_size)] for i in range(0, len(mine), int(cfg.batch_size))]
    for ids in tqdm(batches, desc=f"eval rank {rank}", disable=rank != 0):
        g = torch.Generator(device=device).manual_seed(int(cfg.seed) * 1_000_003 + ids[0])
        captions = [real.captions[i] for i in ids]
        images = pipe(captions, generator=g, output_type="pt", **knobs).images * 2 - 1  # 8-bit quantised
        clip_feats = scorer.embed_images(images)
        text = scorer.embed_text(scorer.tokenize(captions))["text_embed"]
        incep = inception(images).cpu() if inception is not None else None
        pils = to_pil(images)
        if cfg.save_images:
            save_pngs(images, out_dir / "samples", [f"{i:06d}" for i in ids])
        for j, i in enumerate(ids):
            row = {"index": i, "clip": clip_feats[j].cpu(), "text": text[j].cpu(),
                   "inception": incep[j] if incep is not None else None,
                   "image": images[j].cpu() if i in grid_ids else None}
            if demo:
                row.update(caption_matches(captions[j], pils[j]), held_out=bool(real.meta[i].get("held_out")))
            rows.append(row)
    rows = sorted(gather(rows, world), key=lambda r: r["index"])
    if rank != 0:
        return None

    fake_clip = torch.stack([r["clip"] for r in rows])
    real_clip = real_features["clip"]
    report: dict[str, Any] = {
        "num_samples": n, "image_size": size, "world_size": world, "device": str(device),
        "fd_clip": frechet_distance_from_features(real_clip, fake_clip),
        "clip_score": clip_score(fake_clip, torch.stack([r["text"] for r in rows])),
        **run_description(cfg, settings, scorer, real.skipped, "samples"),
    }
    report["real_features_cached"] = cached
    if inception is not None:
        real_feats, fake = real_features["inception"], torch.stack([r["inception"] for r in rows])
        report.update(fid=frechet_distance_from_features(real_feats, fake), feature_extractor=InceptionFeatures.name)
    else:  # KID and precision/recall fall back to the CLIP features, and the report says so
        real_feats, fake = real_clip, fake_clip
        report.update(fid=None, fid_note=fid_note,
                      feature_extractor=f"clip image embedding (hash {scorer.clip_hash[:12]}); no FID")
    kid = dict(cfg.kid)
    # Subsets as large as the whole set would all be the same set (std 0): at most half of it.
    subset = min(int(kid["subset_size"]), max(2, n // 2))
    report["kid_mean"], report["kid_std"] = kernel_inception_distance(
        real_feats, fake, subsets=int(kid["subsets"]), subset_size=subset,
        generator=torch.Generator().manual_seed(int(cfg.seed)))
    report["kid_subset_size"] = subset
    report["precision"], report["recall"] = precision_recall(real_feats, fake, int(cfg.precision_recall_k))
    if demo:
        report["caption_accuracy"] = _split_accuracy(rows)
        report["caption_accuracy_real"] = _split_accuracy(real_rows)
        report["caption_accuracy_chance"] = chance_levels()
    report["seconds"] = round(time.perf_counter() - start, 1)
    _write(out_dir, report, rows, real.captions, int(cfg.grid_size))
    return report


def _real_side(cfg: DictConfig, n: int, size: int, rank: int, scorer: FrozenCLIP,
               inception: InceptionFeatures | None, device: torch.device):
    """One streamed pass over the real val samples: captions for every rank; on rank 0 also the real features
    (from the cache where present) and the demo checker's verdicts on the real images.

    :return: (RealSet, {"clip", "inception"?: [N, D]}, checker rows, whether every feature set was cached).
    """
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir is not None else None
    extractors = {"clip": (f"clip:{scorer.clip_hash}", scorer.embed_images)}
    if inception is not None:
        extractors["inception"] = (InceptionFeatures.name, inception)
    features: dict[str, torch.Tensor] = {}
    todo: dict[str, list[torch.Tensor]] = {}
    keys = {name: cache_key(cfg.val_shards, n, size, ident) for name, (ident, _) in extractors.items()}
    if rank == 0:
        for name in extractors:
            hit = load_cached(cache_dir, keys[name])
            if hit is None:
                todo[name] = []
            else:
                features[name] = hit
    pils: list = []

    def consume(images: torch.Tensor, first: int) -> None:
        if rank != 0:
            return
        for name in todo:
            todo[name].append(extractors[name][1](images.to(device)).float().cpu())
        pils.extend(to_pil(images))

    real = read_real_set(cfg.val_shards, n, size, on_images=consume)
    for name, parts in todo.items():
        features[name] = torch.cat(parts)
        store_cached(cache_dir, keys[name], features[name])
    rows = []
    if rank == 0 and _demo_captions(real.captions):
        rows = [{**caption_matches(c, img), "held_out": bool(m.get("held_out"))}
                for c, img, m in zip(real.captions, pils, real.meta)]
    return real, features, rows, not todo


def _write(out_dir: Path, report: dict, rows: list[dict], captions: list[str], grid_size: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    shown = [r for r in rows if r["image"] is not None][:grid_size]
    if shown:
        nrow = max(1, round(len(shown) ** 0.5))
        image_grid(torch.stack([r["image"] for r in shown]), nrow=nrow).save(out_dir / "grid.png")
        (out_dir / "grid.txt").write_text("".join(f"{captions[r['index']]}\n" for r in shown))
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")

