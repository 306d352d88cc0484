"""Random training masks for the inpainting decoder, drawn from a configurable mix of kinds (``conf/masks``).

Mask convention (as everywhere in unclip): float [N, 1, H, W], **1 = generate, 0 = keep**.

Kinds (GLIDE §3.3 erases random regions; the mix follows the usual inpainting recipes, e.g. LaMa's wide masks):
* ``box``: the union of ``count`` axis-aligned rectangles, each side a ``side`` fraction of the image's.
* ``brush``: free-form strokes: ``strokes`` polylines of ``vertices`` points with random turns, segments of
  ``step`` × side and a thickness of ``width`` × side (DeepFill v2's free-form masks).
* ``outpaint``: everything but one rectangle is generated. ``side``: the kept rectangle spans the image along one
  edge and ``keep`` of it across (extend the image to the left/right/top/bottom); ``frame``: a centred rectangle of
  ``keep`` × side on each axis is kept (extend on all sides).
* ``full``: the whole image (the decoder's own task; keeps unconditional generation in the mix).

Every mask has at least one generated pixel; every kind but ``full`` keeps at least one pixel.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

MASK_KINDS = ("box", "brush", "outpaint", "full")


def _uniform(lo_hi: Sequence[float], rng: random.Random) -> float:
    return rng.uniform(float(lo_hi[0]), float(lo_hi[1]))


def _randint(lo_hi: Sequence[int], rng: random.Random) -> int:
    """Uniform integer in [lo, hi] (both included)."""
    return rng.randint(int(lo_hi[0]), int(lo_hi[1]))


@functools.lru_cache(maxsize=8)
def _pixel_centres(height: int, width: int) -> Tensor:
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    return torch.stack([ys.flatten(), xs.flatten()], dim=1)  # [H·W, 2]


class MaskGenerator:
    """Draws masks from the configured mix of kinds.

    :param weights: ``{kind: weight}`` over :data:`MASK_KINDS` (normalised; missing kinds have weight 0).
    :param box: ``{"count": [min, max], "side": [min, max]}``: rectangles per mask, side fraction of each.
    :param brush: ``{"strokes", "vertices": [min, max], "width", "step": [min, max]}``: strokes per mask, points
        per stroke, thickness and segment length as fractions of the image side.
    :param outpaint: ``{"keep": [min, max], "frame_prob": p}``: kept fraction across (side mode) or per axis
        (frame mode), and the probability of frame mode.
    """

    def __init__(self, weights: dict[str, float], box: dict[str, Any], brush: dict[str, Any],
                 outpaint: dict[str, Any]):
        unknown = sorted(set(weights) - set(MASK_KINDS))
        if unknown:
            raise ValueError(f"unknown mask kinds {unknown}; valid: {', '.join(MASK_KINDS)}")
        w = [float(weights.get(k, 0.0)) for k in MASK_KINDS]
        if min(w) < 0 or sum(w) <= 0:
            raise ValueError(f"mask weights must be >= 0 with a positive sum, got {dict(weights)}")
        # On the CPU explicitly: a dry run builds the module under torch.device("meta").
        self.probs = torch.tensor(w, dtype=torch.float64, device="cpu") / sum(w)
        for name, cfg, keys in (("box", box, ("count", "side")), ("brush", brush, ("strokes", "vertices", "width",
                                                                                 "step")),
                                ("outpaint", outpaint, ("keep", "frame_prob"))):
            if set(cfg) != set(keys):
                raise ValueError(f"masks.{name} needs exactly the keys {list(keys)}, got {sorted(cfg)}")
        for name, lo_hi in (("box.side", box["side"]), ("brush.width", brush["width"]), ("brush.step", brush["step"]),
                            ("outpaint.keep", outpaint["keep"])):
            if not 0 < float(lo_hi[0]) <= float(lo_hi[1]) <= 1:
                raise ValueError(f"masks.{name} must be [min, max] fractions with 0 < min <= max <= 1, got {lo_hi}")
        self.box, self.brush, self.outpaint = dict(box), dict(brush), dict(outpaint)

    def sample_kinds(self, n: int, generator: torch.Generator | None = None) -> list[str]:
        """n kinds drawn independently from the mix."""
        idx = torch.multinomial(self.probs, n, replacement=True, generator=generator)
        return [MASK_KINDS[i] for i in idx.tolist()]

    def sample(self, n: int, size: int | tuple[int, int], generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> tuple[Tensor, list[str]]:
        """(masks [n, 1, H, W] float on ``device``, the kind of each); all randomness from ``generator`` (CPU)."""
        height, width = (size, size) if isinstance(size, int) else size
        kinds = self.sample_kinds(n, generator)
        # Geometry is drawn from a python RNG seeded by the generator: scalar torch draws cost ~10x more.
        rng = random.Random(int(torch.randint(0, 2**62, (), generator=generator)))
        masks = torch.zeros(n, 1, height, width)
        for i, kind in enumerate(kinds):
            masks[i, 0] = getattr(self, f"_{kind}")(height, width, rng)
        return masks.to(device) if device is not None else masks, kinds

    def __call__(self, n: int, size: int | tuple[int, int], generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
        return self.sample(n, size, generator, device)[0]

    # ---- kinds: each returns a [H, W] float mask ----------------------------------------------------------------

    def _full(self, height: int, width: int, rng: random.Random) -> Tensor:
        return torch.ones(height, width)

    def _box(self, height: int, width: int, rng: random.Random) -> Tensor:
        mask = torch.zeros(height, width)
        for _ in range(_randint(self.box["count"], rng)):
            bh = min(height, max(1, round(_uniform(self.box["side"], rng) * height)))
            bw = min(width, max(1, round(_uniform(self.box["side"], rng) * width)))
            top, left = _randint((0, height - bh), rng), _randint((0, width - bw), rng)
            mask[top:top + bh, left:left + bw] = 1
        return mask

    def _brush(self, height: int, width: int, rng: random.Random) -> Tensor:
        side = min(height, width)
        starts, ends, radii = [], [], []
        for _ in range(_randint(self.brush["strokes"], rng)):
            radius = max(0.75, _uniform(self.brush["width"], rng) * side / 2)  # ≥ the start's own pixel
            y, x = rng.uniform(0, height), rng.uniform(0, width)
            segments = [(y, x, y, x)]  # a dot, so a one-point stroke still paints
            for _ in range(_randint(self.brush["vertices"], rng) - 1):
                angle, step = rng.uniform(0, 2 * math.pi), _uniform(self.brush["step"], rng) * side
                ny = min(max(y + step * math.sin(angle), 0.0), float(height))
                nx = min(max(x + step * math.cos(angle), 0.0), float(width))
                segments.append((y, x, ny, nx))
                y, x = ny, nx
            for y0, x0, y1, x1 in segments:
                starts.append((y0, x0))
                ends.append((y1, x1))
                radii.append(radius)
        a, b, r = torch.tensor(starts), torch.tensor(ends), torch.tensor(radii)  # [K, 2], [K, 2], [K]
        ab = b - a
        pixels = _pixel_centres(height, width)  # [P, 2]
        # Distance from every pixel centre to every segment: project, clamp to the segment, measure.
        s = ((pixels[:, None] - a[None]) * ab[None]).sum(-1) / ab.square().sum(-1).clamp(min=1e-9)  # [P, K]
        nearest = a[None] + s.clamp(0, 1)[..., None] * ab[None]  # [P, K, 2]
        inside = (pixels[:, None] - nearest).square().sum(-1) <= r.square()  # [P, K]
        return inside.any(dim=1).view(height, width).float()

    def _outpaint(self, height: int, width: int, rng: random.Random) -> Tensor:
        mask = torch.ones(height, width)
        if rng.random() < float(self.outpaint["frame_prob"]):
            kh = min(height - 1, max(1, round(_uniform(self.outpaint["keep"], rng) * height)))
            kw = min(width - 1, max(1, round(_uniform(self.outpaint["keep"], rng) * width)))
            top, left = (height - kh) // 2, (width - kw) // 2
            mask[top:top + kh, left:left + kw] = 0
            return mask
        edge = _randint((0, 3), rng)  # kept rectangle along the left, right, top or bottom edge
        across = width if edge < 2 else height
        keep = min(across - 1, max(1, round(_uniform(self.outpaint["keep"], rng) * across)))
        if edge == 0:
            mask[:, :keep] = 0
        elif edge == 1:
            mask[:, width - keep:] = 0
        elif edge == 2:
            mask[:keep, :] = 0
        else:
            mask[height - keep:, :] = 0
        return mask
