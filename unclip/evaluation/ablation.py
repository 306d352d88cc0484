"""What each stage adds (unclip-eval's ``ablation``): the chain against itself with one stage swapped for its
baseline, on the same captions and the same random draws, scored against the same real images.

* prior vs caption embedding (Ramesh et al. 2022 §5.1): the decoder is given the caption's CLIP text embedding z_t
  in place of the prior's sample z_i; the decoder (and upsampler) start from the same noise as the chain's own
  samples, so only the embedding differs;
* upsampler vs bicubic: the chain's own base-decoder samples, upsampled once by the upsampler cascade (the chain's
  output) and once by bicubic interpolation (the same resize the upsampler's val/psnr_bicubic uses), so only the
  upsampling differs; and, since generated samples have no ground truth, PSNR on real val images downsampled to
  the base size and restored both ways (the upsampler's val/psnr against val/psnr_bicubic, at evaluation time and
  with the evaluation's sampling options, so an upsampler sampling sweep reads both PSNR and FD).

Each arm gets FD-CLIP, FID when Inception is loaded, and caption accuracy where the checker applies; ``margin`` is
signed so that positive means the stage does better than its baseline (lower FD, higher accuracy).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from unclip.evaluation.metrics import feature_statistics, frechet_distance, frechet_distance_from_features, psnr
from unclip.images import to_output
from unclip.models.degradations import downsample, upsample
from unclip.pipeline import UnCLIPPipeline

# (report key, the stage's arm, the baseline's arm): arm "chain" is the full chain's output
COMPARISONS = (("prior_vs_caption_embedding", "chain", "caption_embedding"),
               ("upsampler_vs_bicubic", "chain", "bicubic"))
ABLATION_KEYS = ("caption_embedding", "bicubic", "psnr_samples")  # conf/evaluate.yaml's ablation
ACCURACY_KEYS = ("shape", "all")  # caption accuracy (all captions) shown in the margins


def quantised(images: Tensor) -> Tensor:
    """[N, 3, H, W] in [-1, 1] rounded to 8 bits, as a saved PNG (and the chain's own evaluated samples) hold them."""
    return to_output(images, "pt") * 2 - 1


@dataclass
class Arms:
    """One batch's samples: ``chain`` the full chain's output; ``extra`` the baselines' outputs by arm name, each
    [N, 3, S, S] in [-1, 1] (8-bit), at the chain's output size."""

    chain: Tensor
    extra: dict[str, Tensor]


def enabled_arms(ablation: Mapping[str, Any] | None, num_upsamplers: int) -> list[str]:
    """The baseline arms to sample: ``caption_embedding`` and/or ``bicubic`` (the latter only when the chain has an
    upsampler to compare)."""
    ablation = dict(ablation or {})
    unknown = sorted(set(ablation) - set(ABLATION_KEYS))
    if unknown:
        raise ValueError(f"unknown ablation key(s) {unknown}; valid: {list(ABLATION_KEYS)}")
    arms = ["caption_embedding"] if ablation.get("caption_embedding") else []
    return arms + (["bicubic"] if ablation.get("bicubic") and num_upsamplers > 0 else [])


@torch.no_grad()
def sample_arms(pipe: UnCLIPPipeline, captions: list[str], generator: torch.Generator,
                knobs: Mapping[str, Any], arms: list[str]) -> Arms:
    """Text → images through the chain, plus each baseline arm on the same captions and draws.

    Without arms this draws from ``generator`` exactly as ``pipe(captions, generator=generator)`` does (prior,
    then decoder, then upsamplers), so enabling the ablation leaves the chain's own samples unchanged.

    :param knobs: ``{"prior", "decoder", "upsamplers"}`` sampling options (None: each checkpoint's own).
    :param arms: from :func:`enabled_arms`.
    """
    text = pipe.encode_text(captions)
    z = pipe.image_embeddings(text, generator, knobs.get("prior"))
    after_prior = generator.get_state()  # the caption arm's decoder starts from the very same noise
    base = pipe.decode_base(z, text, generator, knobs.get("decoder"))  # [N, 3, s, s]
    chain = pipe.upsample(base, generator, knobs.get("upsamplers"))  # [N, 3, S, S]
    extra: dict[str, Tensor] = {}
    if "bicubic" in arms:
        extra["bicubic"] = quantised(upsample(base, chain.shape[-1]))
    if "caption_embedding" in arms:
        g = torch.Generator(device=generator.device)
        g.set_state(after_prior)
        z_t = pipe.image_embeddings(text, g, None, embedding="caption")
        extra["caption_embedding"] = quantised(pipe.decode(z_t, text, g, knobs.get("decoder"),
                                                           knobs.get("upsamplers")))
    return Arms(quantised(chain), extra)


def _accuracy_margin(stage: dict | None, baseline: dict | None) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in ACCURACY_KEYS:
        a, b = ((block or {}).get("all", {}).get(key) for block in (stage, baseline))
        out[f"caption_accuracy_{key}"] = None if a is None or b is None else a - b
    return out


def ablation_report(arm_rows: dict[str, list[dict]], real_clip: Tensor | None, inception_ref: Any,
                    split_accuracy: Callable[[list[dict]], dict] | None) -> dict[str, Any]:
    """The report's ``ablation`` entry from every arm's per-sample rows (index order, all ranks).

    :param arm_rows: arm name ("chain" and the baselines) → rows with "clip" [D], optional "inception" [2048]
        and optional "check" (caption checker verdicts).
    :param real_clip: [N, D] real images' scorer-CLIP embeddings (None: no FD-CLIP).
    :param inception_ref: the real side's Inception :class:`~unclip.evaluation.reference.Reference`, or None.
    :param split_accuracy: turns checker rows into seen / held-out / all accuracies (None: no checker).
    """
    scored: dict[str, dict[str, Any]] = {}
    for arm, rows in arm_rows.items():
        entry: dict[str, Any] = {"n": len(rows)}
        fake_clip = torch.stack([r["clip"] for r in rows])
        entry["fd_clip"] = frechet_distance_from_features(real_clip, fake_clip) if real_clip is not None else None
        entry["fid"] = None
        if inception_ref is not None and rows and rows[0].get("inception") is not None:
            entry["fid"] = frechet_distance(inception_ref.mu, inception_ref.sigma,
                                            *feature_statistics(torch.stack([r["inception"] for r in rows])))
        entry["caption_accuracy"] = (split_accuracy([r["check"] for r in rows])
                                     if split_accuracy is not None and rows and "check" in rows[0] else None)
        scored[arm] = entry
    out: dict[str, Any] = {}
    for key, stage, baseline in COMPARISONS:
        if baseline not in scored:
            continue
        s, b = scored[stage], scored[baseline]
        margin = {metric: None if s[metric] is None or b[metric] is None else b[metric] - s[metric]
                  for metric in ("fd_clip", "fid")}  # lower is better: positive = the stage's FD is lower
        margin.update(_accuracy_margin(s["caption_accuracy"], b["caption_accuracy"]))
        out[key] = {"stage": s, "baseline": b, "margin": margin}
    return out


@torch.no_grad()
def upsampler_psnr(pipe: UnCLIPPipeline, real: Tensor, generator: torch.Generator,
                   options: Any = None, batch_size: int = 64) -> dict[str, Any]:
    """PSNR (dB) of real images restored from their base-size downsample by the upsampler cascade and by bicubic.

    :param real: [N, 3, S, S] real images in [-1, 1] at the chain's output size.
    :param options: the upsamplers' sampling options (as :meth:`UnCLIPPipeline.upsample` takes them).
    :return: ``{"n", "upsampler", "bicubic", "margin"}``: mean PSNRs and upsampler − bicubic.
    """
    ours, theirs = [], []
    base_size = pipe.chain.decoder.info.image_size
    for start in range(0, real.shape[0], batch_size):
        target = real[start:start + batch_size].to(pipe.device).float()
        low = downsample(target, base_size)  # antialiased, as the upsampler's training and validation
        ours.append(psnr(quantised(pipe.upsample(low, generator, options)), target).cpu())
        theirs.append(psnr(quantised(upsample(low, target.shape[-1])), target).cpu())
    a, b = float(torch.cat(ours).mean()), float(torch.cat(theirs).mean())
    return {"n": int(real.shape[0]), "upsampler": a, "bicubic": b, "margin": a - b}
