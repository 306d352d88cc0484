"""``unclip-eval``'s job: sample for validation captions and measure the samples against the real images.

For the first ``num_samples`` captions (of the val shards, or of ``captions_file``): caption → image through the
whole chain; then, against the real images at the chain's output size (streamed, never held) or saved reference
statistics (``reference``, reference.py),

* FID (Inception-v3 pool3, the pytorch-fid / torch-fidelity network; Fréchet distance in float64),
* FD-CLIP (the same distance on the scorer CLIP's image embeddings; needs no download),
* KID (mean, std over subsets) and precision/recall (k-NN, k = 3) on the FID features (FD-CLIP's without them),
* CLIP score 100·max(cos(image, caption), 0) with a named scorer CLIP (the report warns when it is the CLIP the
  chain conditions on: the prior and decoder were trained to please it),
* where the configured caption checker applies (the built-in demo data's, loaded by module name), caption
  accuracy (shape, colour, ...) split into seen and held-out colour×shape pairs, with the checker's accuracy on
  the real images beside it,
* with ``ablation`` on, what each stage adds: the same captions and draws with the prior replaced by the caption
  embedding, and the base samples bicubic-upsampled in place of the upsamplers (ablation.py).

Under several processes (``torchrun``), rank r samples captions r, r + W, ...; features and per-sample results
are gathered to rank 0 before any distance is computed (never an average of per-rank FIDs).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from unclip.evaluation.ablation import ablation_report, enabled_arms, sample_arms, upsampler_psnr
from unclip.evaluation.captions import CaptionChecker, load_checker, read_captions
from unclip.evaluation.features import InceptionFeatures
from unclip.evaluation.metrics import clip_score, frechet_distance_from_features
from unclip.evaluation.real_data import RESIZE, RealSet, cache_key, load_cached, read_real_set, store_cached
from unclip.evaluation.reference import Reference, load_reference
from unclip.evaluation.score import distribution_metrics, recipe
from unclip.images import image_grid, save_pngs, to_pil, to_uint8
from unclip.models.clip_embedder import FrozenCLIP
from unclip.pipeline import UnCLIPPipeline


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


def _accuracy(rows: list[dict]) -> dict[str, float | None]:
    out: dict[str, float | None] = {"n": float(len(rows))}
    keys = sorted({k for r in rows for k in r if k not in ("held_out", "index")} | {"all"})
    for key in keys:
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
    knobs: dict[str, Any] = {k: OmegaConf.to_container(cfg[k], resolve=True) if cfg[k] is not None else None
                             for k in ("prior", "decoder", "upsamplers")}
    settings = pipe.settings(**knobs)
    size = pipe.output_size
    n = int(cfg.num_samples)
    scorer = pipe.clip if cfg.clip_scorer is None else FrozenCLIP.from_path(cfg.clip_scorer, device)
    inception, fid_note = load_inception(cfg, device)
    checker = load_checker(cfg.caption_checker)
    ablation = cfg.get("ablation")
    arms = enabled_arms({str(k): v for k, v in ablation.items()} if ablation is not None else None,
                        len(pipe.chain.upsamplers))
    keep = min(n, int(ablation.get("psnr_samples") or 0)) if "bicubic" in arms else 0
    real = _real_side(cfg, n, size, rank, scorer, inception, device, checker, keep)
    checked = checker if real.checked else None  # the checker, when it applies to these captions

    psnr_real = None  # before the captions, so that a time limit (max_seconds) counts it before sampling starts
    if real.kept is not None and "bicubic" in arms:
        psnr_real = upsampler_psnr(pipe, real.kept, torch.Generator(device=device).manual_seed(int(cfg.seed)),
                                   knobs["upsamplers"], int(cfg.batch_size))
    mine = list(range(rank, n, world))
    rows: list[dict] = []
    grid_ids = set(range(min(int(cfg.grid_size), n)))
    batches = [mine[i:i + int(cfg.batch_size)] for i in range(0, len(mine), int(cfg.batch_size))]

    def features(images: torch.Tensor, ids: list[int], captions: list[str]) -> list[dict]:
        """Per-sample scorer-CLIP and Inception features and checker verdicts of [N, 3, S, S] samples."""
        clip_feats = scorer.embed_images(images).cpu()
        incep = inception(images).cpu() if inception is not None else None
        pils = to_pil(images) if checked is not None else []
        out = []
        for j, i in enumerate(ids):
            row = {"index": i, "clip": clip_feats[j], "inception": incep[j] if incep is not None else None}
            if checked is not None:
                row["check"] = {**checked.caption_matches(captions[j], pils[j]),
                                "held_out": bool(real.meta[i].get("held_out"))}
            out.append(row)
        return out

    limit = time_limit(cfg.get("max_seconds"), world)
    for ids in tqdm(batches, desc=f"eval rank {rank}", disable=rank != 0):
        if limit is not None and not limit.next_fits(time.perf_counter() - start):
            break
        g = torch.Generator(device=device).manual_seed(int(cfg.seed) * 1_000_003 + ids[0])
        captions = [real.captions[i] for i in ids]
        sampled = sample_arms(pipe, captions, g, knobs, arms)  # the chain's samples: 8-bit quantised
        images = sampled.chain
        text = scorer.embed_text(scorer.tokenize(captions))["text_embed"]
        if cfg.save_images:
            save_pngs(images, out_dir / "samples", [f"{i:06d}" for i in ids])
        baselines = {arm: features(x, ids, captions) for arm, x in sampled.extra.items()}
        for j, row in enumerate(features(images, ids, captions)):
            i = row["index"]
            rows.append({**row, "text": text[j].cpu(), "image": images[j].cpu() if i in grid_ids else None,
                         "arms": {arm: baselines[arm][j] for arm in baselines}})
        if limit is not None:
            limit.batch_done(time.perf_counter() - start)
    rows = sorted(gather(rows, world), key=lambda r: r["index"])
    if rank != 0:
        return None

    fake_clip = torch.stack([r["clip"] for r in rows])
    report: dict[str, Any] = {
        "num_samples": len(rows), "num_samples_requested": n, "image_size": size, "world_size": world,
        "device": str(device), **(limit.describe(len(rows), n) if limit is not None else {}),
        "fd_clip": (frechet_distance_from_features(real.features["clip"], fake_clip)
                    if "clip" in real.features else None),
        "clip_score": clip_score(fake_clip, torch.stack([r["text"] for r in rows])),
        **run_description(cfg, settings, scorer, real.skipped, "samples"),
        "captions_source": str(cfg.captions_file or cfg.val_shards),
    }
    report["real_features_cached"] = real.cached
    if inception is not None:
        ref, fake = real.references["inception"], torch.stack([r["inception"] for r in rows])
        name = InceptionFeatures.name
    else:  # KID and precision/recall fall back to the CLIP features, and the report says so
        if "clip" not in real.references:
            raise ValueError("no Inception weights and no real images (val_shards) for CLIP features: nothing to "
                             "compare against; set inception_weights or val_shards")
        ref, fake = real.references["clip"], fake_clip
        name = f"clip image embedding (hash {scorer.clip_hash[:12]})"
        report["fid_note"] = fid_note
    kid = dict(cfg.kid)
    metrics = distribution_metrics(ref, fake, kid_subsets=int(kid["subsets"]), kid_subset_size=int(kid["subset_size"]),
                                   k=int(cfg.precision_recall_k), seed=int(cfg.seed), device=device)
    if inception is None:
        metrics["fid"] = None  # the Fréchet distance on CLIP features is fd_clip, not FID
    report.update(metrics, feature_extractor=name if inception is not None else f"{name}; no FID",
                  reference=ref.describe(), **recipe(cfg, name, size))
    if checked is not None:
        report["caption_accuracy"] = _split_accuracy([r["check"] for r in rows])
        report["caption_accuracy_real"] = _split_accuracy(real.checks)
        report["caption_accuracy_chance"] = checked.chance_levels()
    if arms:
        arm_rows = {"chain": rows, **{arm: [r["arms"][arm] for r in rows] for arm in arms}}
        report["ablation"] = ablation_report(arm_rows, real.features.get("clip"), real.references.get("inception")
                                             if inception is not None else None,
                                             _split_accuracy if checked is not None else None)
        if psnr_real is not None and "upsampler_vs_bicubic" in report["ablation"]:
            report["ablation"]["upsampler_vs_bicubic"]["psnr_real"] = psnr_real
    report["seconds"] = round(time.perf_counter() - start, 1)
    _write(out_dir, report, rows, real.captions, int(cfg.grid_size))
    return report


class TimeLimit:
    """``max_seconds``: sample caption batches while the next one, at the slowest batch's pace so far, still ends
    within the limit (counted from the evaluation's start, model loading and real features included); at least one
    batch is always sampled. The report then holds the captions sampled so far (``num_samples``) and says why."""

    def __init__(self, seconds: float):
        self.seconds, self.batch_s, self.batches = float(seconds), 0.0, 0
        self.last: float | None = None  # elapsed seconds when the current batch started

    def next_fits(self, elapsed: float) -> bool:
        self.last = elapsed if self.last is None else self.last
        return self.batches == 0 or elapsed + self.batch_s <= self.seconds

    def batch_done(self, elapsed: float) -> None:
        assert self.last is not None
        self.batch_s, self.last, self.batches = max(self.batch_s, elapsed - self.last), elapsed, self.batches + 1

    def describe(self, sampled: int, requested: int) -> dict[str, Any]:
        return {"max_seconds": self.seconds, "stopped_by": "max_seconds" if sampled < requested else "num_samples"}


def time_limit(max_seconds: float | None, world: int) -> TimeLimit | None:
    """The evaluation's :class:`TimeLimit` (None: no limit)."""
    if max_seconds is None:
        return None
    if not float(max_seconds) > 0:
        raise ValueError(f"max_seconds must be > 0 or null, got {max_seconds}")
    if world > 1:  # ranks would stop after different batch counts; a limit needs one decision for all
        raise ValueError(f"max_seconds={max_seconds} is for a single-process evaluation (world size {world}): "
                         f"set num_samples instead")
    return TimeLimit(float(max_seconds))


@dataclass
class RealSide:
    """The real side of an evaluation on rank 0 (captions on every rank).

    :param captions, meta, skipped: from the val shards or the captions file.
    :param features: real [N, D] features by extractor ("clip", "inception") computed from the val shards.
    :param references: the :class:`Reference` each metric compares against (from features or a saved file).
    :param checks: the caption checker's verdicts on the real images (when ``checked``).
    :param cached: every feature set came from the cache.
    :param kept: the first real images [K, 3, S, S] in [-1, 1], kept for the upsampler's PSNR (None: none kept).
    """

    captions: list[str]
    meta: list[dict]
    skipped: dict
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    references: dict[str, Reference] = field(default_factory=dict)
    checks: list[dict] = field(default_factory=list)
    checked: bool = False
    cached: bool = False
    kept: torch.Tensor | None = None


def _real_side(cfg: DictConfig, n: int, size: int, rank: int, scorer: FrozenCLIP, inception: InceptionFeatures | None,
               device: torch.device, checker: CaptionChecker | None, keep: int = 0) -> RealSide:
    """Captions (val shards or ``captions_file``) for every rank; on rank 0 the real features: from the saved
    ``reference`` statistics for the FID network when given, else from one streamed pass over the val shards
    (cached), during which the caption checker also reads the real images. No real image is kept beyond the
    first ``keep`` (8-bit, for the upsampler's PSNR; none from the cache, so they are read even on a cache hit)."""
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir is not None else None
    extractors = {"clip": (f"clip:{scorer.clip_hash}", scorer.embed_images)}
    references: dict[str, Reference] = {}
    if cfg.reference is not None and inception is None:
        raise ValueError(f"reference={cfg.reference} holds the FID network's statistics, but Inception is not loaded "
                         f"(feature_extractor={cfg.feature_extractor}); set inception_weights=PATH")
    if inception is not None:
        if cfg.reference is not None:
            references["inception"] = load_reference(cfg.reference, InceptionFeatures.name)
        else:
            extractors["inception"] = (InceptionFeatures.name, inception)
    if cfg.val_shards is None:
        if cfg.captions_file is None or "inception" not in references:
            raise ValueError("without val_shards give captions_file=... and reference=STATS.npz (the real side)")
        captions = read_captions(cfg.captions_file, n)
        return RealSide(captions, [{}] * n, {}, references=references)

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
    checks: list[dict] = []
    readable = [checker is not None]  # every caption so far is one the checker reads
    kept: list[torch.Tensor] = []

    def consume(images: torch.Tensor, first: int, captions: list[str], meta: list[dict]) -> None:
        if rank != 0:
            return
        room = keep - sum(x.shape[0] for x in kept)
        if room > 0:
            kept.append(to_uint8(images[:room]).cpu())
        for name in todo:
            todo[name].append(extractors[name][1](images.to(device)).float().cpu())
        if readable[0] and checker is not None and cfg.captions_file is None:
            readable[0] = checker.applies(captions)
            if readable[0]:  # verdicts now, so the images can go
                checks.extend({**checker.caption_matches(c, img), "held_out": bool(m.get("held_out"))}
                              for c, img, m in zip(captions, to_pil(images), meta, strict=True))

    real: RealSet = read_real_set(cfg.val_shards, n, size, on_images=consume)
    for name, parts in todo.items():
        features[name] = torch.cat(parts)
        store_cached(cache_dir, keys[name], features[name])
    for name, feats in features.items():
        references.setdefault(name, Reference.from_features(
            feats, {"extractor": extractors[name][0], "image_size": size, "resize": RESIZE,
                    "source": str(cfg.val_shards)}))
    captions, meta = real.captions, real.meta
    if cfg.captions_file is not None:  # captions from the file, real images from the shards
        captions, meta = read_captions(cfg.captions_file, n), [{}] * n
    checked = checker is not None and cfg.captions_file is None and checker.applies(captions)
    return RealSide(captions, meta, real.skipped, features, references, checks if rank == 0 else [], checked,
                    not todo, torch.cat(kept).float() / 127.5 - 1 if kept else None)


def _write(out_dir: Path, report: dict, rows: list[dict], captions: list[str], grid_size: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    shown = [r for r in rows if r["image"] is not None][:grid_size]
    if shown:
        nrow = max(1, round(len(shown) ** 0.5))
        image_grid(torch.stack([r["image"] for r in shown]), nrow=nrow).save(out_dir / "grid.png")
        (out_dir / "grid.txt").write_text("".join(f"{captions[r['index']]}\n" for r in shown))
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")

