"""Read a demo-shapes image back from its pixels, and score images against their captions.

Colours: the background is the median of the border ring, the foreground the median of the pixels farthest
from it, each snapped to the nearest named colour. Shape: every pixel gets a soft coverage (its projection on
the background→foreground colour line); each candidate shape is drawn with the same area and centroid as that
coverage, in its own proportions, and the best soft IoU wins. Size and position follow from the fitted box.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache
from typing import Any

import numpy as np
from PIL import Image

from unclip.data.demo_shapes import (
    COLORS,
    POSITION_PHRASES,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeSpec,
    caption,
    coverage,
    position_offset,
    unit_outline,
)
from unclip.data.image_io import to_rgb

_COLOR_ARRAY = np.array(list(COLORS.values()), np.float32)
_MIN_CONTRAST = 30.0  # below this colour distance there is no foreground to read
_NOISE_FLOOR = 0.1  # coverage below this is compression noise, not shape


def nearest_color(rgb: Iterable[float], exclude: Iterable[str] = ()) -> str:
    """Name of the named colour closest to ``rgb`` (Euclidean in RGB).

    :param rgb: three channel values in 0..255.
    :param exclude: names that may not be returned.
    """
    dist = np.linalg.norm(_COLOR_ARRAY - np.asarray(list(rgb), np.float32), axis=1)
    for i, name in enumerate(COLORS):
        if name in set(exclude):
            dist[i] = np.inf
    return list(COLORS)[int(np.argmin(dist))]


@cache
def _template(shape: str) -> tuple[float, float, float, float]:
    """(area fraction of its box, centroid x and y as fractions of the box, aspect) of a shape."""
    side = 256
    m = np.asarray(coverage(shape, (0, 0, side, side), side), np.float64) / 255
    ys, xs = np.mgrid[0:side, 0:side] + 0.5
    area = m.sum()
    return area / side**2, (m * xs).sum() / area / side, (m * ys).sum() / area / side, unit_outline(shape)[1]


def _nearest_size(fraction: float) -> str:
    return min(SIZES, key=lambda s: abs(np.log(fraction / SIZES[s])))


def _position(cx: float, cy: float, size: str, n: int) -> str:
    reach = position_offset(size)
    if reach == 0:
        return "center"
    # Nominal offsets are -reach, 0, +reach: split halfway.
    col, row = (int(np.clip(np.round((c / n - 0.5) / reach), -1, 1)) for c in (cx, cy))
    return next(name for name, d in POSITIONS.items() if d == (col, row))


def check_image(img: Image.Image) -> dict[str, Any]:
    """Read shape, colours, size and position of a (square) demo-shapes image.

    :param img: PIL image, any mode.
    :return: {"shape", "color", "background", "size", "position", "score"}; score is the winning soft IoU
        (about 0.95+ on clean images). Everything but background is None when no foreground is found.
    """
    arr = np.asarray(to_rgb(img), np.float32)
    n = arr.shape[1]
    ring = np.concatenate([arr[0], arr[-1], arr[1:-1, 0], arr[1:-1, -1]])
    bg = np.median(ring, axis=0)
    result: dict[str, Any] = {"shape": None, "color": None, "background": nearest_color(bg), "size": None,
                              "position": None, "score": 0.0}
    dist = np.linalg.norm(arr - bg, axis=-1)
    top = float(np.percentile(dist, 99))
    if top < _MIN_CONTRAST:
        return result
    fg = np.median(arr[dist >= 0.7 * top], axis=0)
    result["color"] = nearest_color(fg, exclude=[result["background"]])
    axis = fg - bg
    t = np.clip((arr - bg) @ axis / float(axis @ axis), 0, 1)
    t[t < _NOISE_FLOOR] = 0
    area = float(t.sum())
    ys, xs = np.mgrid[0 : arr.shape[0], 0:n] + 0.5
    cx, cy = float((t * xs).sum()) / area, float((t * ys).sum()) / area
    best = (-1.0, "", 0.0, 0.0, 0.0, 0.0)
    for shape in SHAPES:
        frac, gx, gy, aspect = _template(shape)
        h = np.sqrt(area / (frac * aspect))
        w = aspect * h
        x0, y0 = cx - gx * w, cy - gy * h
        m = np.asarray(coverage(shape, (x0, y0, x0 + w, y0 + h), n), np.float32)[: arr.shape[0]] / 255
        iou = float(np.minimum(t, m).sum() / max(np.maximum(t, m).sum(), 1e-6))
        if iou > best[0]:
            best = (iou, shape, x0, y0, w, h)
    iou, shape, x0, y0, w, h = best
    size = _nearest_size(max(w, h) / n)
    result.update(shape=shape, size=size, position=_position(x0 + w / 2, y0 + h / 2, size, n), score=iou)
    return result


def _alternation(words: Iterable[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_PHRASE_TO_POSITION = {phrase: name for name, phrase in POSITION_PHRASES.items()}
_CAPTION_RE = re.compile(
    rf"^an? (?P<size>{_alternation(SIZES)}) (?P<color>{_alternation(COLORS)}) (?P<shape>{_alternation(SHAPES)})"
    rf"(?: (?P<where>{_alternation(_PHRASE_TO_POSITION)}))? on an? (?P<background>{_alternation(COLORS)}) "
    r"background$")


def parse_caption(text: str) -> dict[str, str | None]:
    """Parse a demo caption back into its attributes; position is None when the caption leaves it out.

    :param text: a caption as made by demo_shapes.caption.
    :raises ValueError: for text that is not a demo caption.
    """
    match = _CAPTION_RE.match(text.strip().lower())
    if match is None:
        raise ValueError(f"not a demo-shapes caption: {text!r}")
    parts = match.groupdict()
    where = parts.pop("where")
    return {**parts, "position": _PHRASE_TO_POSITION[where] if where else None}


def caption_matches(caption_or_spec: str | ShapeSpec, img: Image.Image) -> dict[str, bool | None]:
    """Compare an image with what its caption (or spec) asks for, attribute by attribute.

    :param caption_or_spec: a demo caption or a ShapeSpec.
    :param img: the image, e.g. a generated sample.
    :return: {"shape", "color", "background", "size", "position", "all"}: booleans; position is None when the
        caption does not name it. "all" requires shape, colours and size (and position when named).
    """
    text = caption(caption_or_spec) if isinstance(caption_or_spec, ShapeSpec) else caption_or_spec
    want = parse_caption(text)
    got = check_image(img)
    result: dict[str, bool | None] = {k: got[k] == want[k] for k in ("shape", "color", "background", "size")}
    result["position"] = None if want["position"] is None else got["position"] == want["position"]
    result["all"] = all(v for v in result.values() if v is not None)
    return result


def caption_accuracy(captions: Iterable[str | ShapeSpec], images: Iterable[Image.Image]) -> dict[str, float]:
    """Mean per-attribute accuracy of images against their captions (the demo's caption-accuracy metric).

    :param captions: demo captions or specs.
    :param images: matching images, in order.
    :return: {"shape", "color", "background", "size", "position", "all", "n"}; position averages only over
        captions that name one (NaN if none do).
    """
    rows = [caption_matches(c, img) for c, img in zip(captions, images, strict=True)]
    out: dict[str, float] = {"n": float(len(rows))}
    for key in ("shape", "color", "background", "size", "position", "all"):
        values = [float(v) for r in rows if (v := r[key]) is not None]
        out[key] = float(np.mean(values)) if values else float("nan")
    return out


# The caption-checker interface unclip-eval loads by module name (conf/evaluate.yaml: caption_checker), so the
# evaluator does not import the demo data: ``applies(captions)``, ``caption_matches(caption, image)`` and
# ``chance_levels()``.
def applies(captions: Iterable[str]) -> bool:
    """Whether every caption is a demo caption this checker can read."""
    try:
        for text in captions:
            parse_caption(text)
    except ValueError:
        return False
    return True


def chance_levels() -> dict[str, float]:
    """Caption accuracy of guessing each attribute uniformly (a shape's colour is never its background's)."""
    return {"shape": 1 / len(SHAPES), "color": 1 / (len(COLORS) - 1), "background": 1 / len(COLORS),
            "size": 1 / len(SIZES), "position": 1 / len(POSITIONS)}
