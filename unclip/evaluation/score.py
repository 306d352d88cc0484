"""Score images from anywhere: ``unclip-eval --config-name evaluate_score`` (conf/evaluate_score.yaml).

The generated side (``fake``) is a folder of images or webdataset shards, e.g. a baseline model's samples; the
real side (``real``) is shards, a folder, or saved reference statistics (``.npz``, reference.py). Both sides go
through the same centre-crop resize to ``image_size`` and the same feature extractor, so a baseline's samples
and ours land in one table. ``save_reference=PATH`` writes the real side's statistics (and features) so the
real side of a 30k evaluation is computed once; ``fake=null`` only does that.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from unclip.evaluation.features import InceptionFeatures
from unclip.evaluation.metrics import feature_statistics, frechet_distance, kernel_inception_distance, precision_recall
from unclip.evaluation.real_data import RESIZE, read_image_folder, read_real_set
from unclip.evaluation.reference import Reference, load_reference, save_reference

Extractor = Callable[[torch.Tensor], torch.Tensor]
CLIP_SCORE_FORMULA = ("100 * max(cos(image, caption), 0), averaged (the unCLIP/GLIDE convention; Hessel et al. "
                      "2021's CLIPScore is 2.5 * max(cos, 0), i.e. ours / 40)")
PR_PAPER_NOTE = ("Kynkäänniemi et al. 2019 define precision/recall on VGG-16 fc2 features; these use the "
                 "feature_extractor above, so they are not comparable with VGG-16 numbers")


def extractor_from_config(cfg: DictConfig, device: torch.device) -> tuple[str, Extractor]:
    """(name, images [B, 3, S, S] in [-1, 1] → [B, D]) for ``cfg.feature_extractor`` = inception | clip."""
    if cfg.feature_extractor == "inception":
        net = InceptionFeatures(cfg.inception_weights).to(device).eval()
        return InceptionFeatures.name, lambda images: net(images.to(device)).float().cpu()
    if cfg.feature_extractor == "clip":
        if cfg.clip_scorer is None:
            raise ValueError("feature_extractor=clip needs clip_scorer=PATH (a CLIP checkpoint or export)")
        from unclip.images import to_uint8
        from unclip.models.clip_embedder import FrozenCLIP

        clip = FrozenCLIP.from_path(cfg.clip_scorer, device)
        name = f"clip image embedding (hash {clip.clip_hash[:12]})"
        return name, lambda images: clip.embed_images(to_uint8(images.to(device)).float() / 127.5 - 1).float().cpu()
    raise ValueError(f"feature_extractor={cfg.feature_extractor!r}: use 'inception' or 'clip' for scoring folders")


def features_of(source: str, n: int | None, image_size: int, extractor: Extractor,
                batch_size: int = 64) -> tuple[torch.Tensor, dict]:
    """Features [N, D] of a folder of images or of shards (streamed; images are never kept).

    :return: (features, {"source", "num_images", "skipped"}).
    """
    parts: list[torch.Tensor] = []

    def consume(images: torch.Tensor, *_: Any) -> None:
        parts.append(extractor(images))

    if Path(source).is_dir():
        info = read_image_folder(source, n, image_size, consume, batch_size)
    elif not any(mark in source for mark in ("{", "://", "::", ".tar")):
        raise FileNotFoundError(f"{source} is neither an image folder nor a shard spec (does not exist)")
    else:
        if n is None:
            raise ValueError(f"{source} is read as shards: give num_samples")
        real = read_real_set(source, n, image_size, on_images=consume, batch_size=batch_size)
        info = {"num_images": len(real.captions), "skipped": real.skipped}
    return torch.cat(parts), {"source": str(source), **info}


def distribution_metrics(ref: Reference, fake: torch.Tensor, *, kid_subsets: int, kid_subset_size: int, k: int,
                         seed: int, device: torch.device | str | None = None) -> dict[str, Any]:
    """FID from the reference's mu/sigma; KID and precision/recall from its features (null with a note without).

    :param fake: [N, D] generated-side features.
    :param kid_subset_size: capped at half the smaller set (subsets as large as a set would all be that set).
    """
    mu, sigma = feature_statistics(fake)
    out: dict[str, Any] = {"fid": frechet_distance(ref.mu, ref.sigma, mu, sigma)}
    if ref.features is None:
        return {**out, "kid_mean": None, "kid_std": None, "precision": None, "recall": None,
                "metrics_note": f"{ref.path} holds mu/sigma only: KID and precision/recall need its features"}
    subset = min(int(kid_subset_size), max(2, min(fake.shape[0], ref.features.shape[0]) // 2))
    out["kid_mean"], out["kid_std"] = kernel_inception_distance(
        ref.features, fake, subsets=kid_subsets, subset_size=subset, generator=torch.Generator().manual_seed(seed))
    out["kid_subset_size"] = subset
    out["precision"], out["recall"] = precision_recall(ref.features, fake, k, device=device)
    return out


def real_reference(cfg: DictConfig, name: str, extractor: Extractor) -> Reference:
    """The real side: loaded from ``cfg.real`` when it is a .npz file, else computed from a folder or shards."""
    if str(cfg.real).endswith(".npz"):
        return load_reference(cfg.real, name)
    n = None if cfg.num_real is None else int(cfg.num_real)
    feats, info = features_of(str(cfg.real), n, int(cfg.image_size), extractor, int(cfg.batch_size))
    return Reference.from_features(feats, {"extractor": name, "image_size": int(cfg.image_size), "resize": RESIZE,
                                           "source": info["source"], "skipped": info["skipped"]})


def score(cfg: DictConfig) -> dict:
    """Run the scoring; writes ``out_dir/report.json`` (and ``save_reference``) and returns the report."""
    start = time.perf_counter()
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name, extractor = extractor_from_config(cfg, device)
    ref = real_reference(cfg, name, extractor)
    if cfg.save_reference is not None:
        ref.path = str(save_reference(cfg.save_reference, ref))
    report: dict[str, Any] = {"reference": ref.describe(), "feature_extractor": name}
    if cfg.fake is not None:
        n = None if cfg.num_samples is None else int(cfg.num_samples)
        fake, info = features_of(str(cfg.fake), n, int(cfg.image_size), extractor, int(cfg.batch_size))
        report.update(
            num_samples=int(fake.shape[0]), fake=info,
            **distribution_metrics(ref, fake, kid_subsets=int(cfg.kid.subsets),
                                   kid_subset_size=int(cfg.kid.subset_size), k=int(cfg.precision_recall_k),
                                   seed=int(cfg.seed), device=device))
    report.update(recipe(cfg, name, int(cfg.image_size)), seconds=round(time.perf_counter() - start, 1))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    return report


def recipe(cfg: DictConfig, extractor_name: str, image_size: int) -> dict[str, Any]:
    """The report fields a reader needs to reproduce or compare a number."""
    return {
        "image_size": image_size,
        "resize": {"to_image_size": RESIZE,
                   "to_extractor": "inception: TF1 bilinear to 299 inside the network (torch-fidelity); clip: the "
                                   "CLIP's own preprocessing"},
        "precision_recall_features": extractor_name,
        "precision_recall_note": PR_PAPER_NOTE,
        "precision_recall_k": int(cfg.precision_recall_k),
        "kid": OmegaConf.to_container(cfg.kid, resolve=True),
        "clip_score_formula": CLIP_SCORE_FORMULA,
    }
