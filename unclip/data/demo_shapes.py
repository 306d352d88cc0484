"""Built-in demo data: coloured shapes with captions, generated on first use, no download.

"a small red circle on a blue background" (with ``placed_sizes``, shapes off-centre too: "... in the top left ...").
A held-out set of colour-shape combinations never appears in train; val holds both seen and held-out combinations
(each json says which), so a model's compositional generalisation can be measured. ``check_image`` reads shape and
colours back from pixels, which gives a caption-accuracy metric for generated samples (see demo_shapes_check).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from unclip.data.writer import EncodeOptions, SourceSample, shard_pattern, write_shards

# Bump when rendering, sampling, captions or the json change: it is part of the cache key.
# 2: each json lists hard-negative captions (hard_negatives).
GENERATOR_VERSION = 2

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross", "heart", "diamond")
# Picked far apart in RGB (>= 75 apart pairwise) so the nearest-colour read-back survives resizing and JPEG.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (245, 215, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
# Longer side of the shape's box as a fraction of the image side.
SIZES = {"small": 0.3, "medium": 0.5, "large": 0.75}
# name -> (column, row) direction from the centre, and the caption phrase.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (-1, -1), "top": (0, -1), "top right": (1, -1),
    "left": (-1, 0), "center": (0, 0), "right": (1, 0),
    "bottom left": (-1, 1), "bottom": (0, 1), "bottom right": (1, 1),
}
POSITION_PHRASES = {
    "top left": "in the top left", "top": "at the top", "top right": "in the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left", "bottom": "at the bottom", "bottom right": "in the bottom right",
}
_SIZE_JITTER = 0.05  # relative
_POSITION_JITTER = 0.025  # fraction of the image side
_EDGE_MARGIN = 0.08  # fraction of the image side between an off-centre shape's nominal box and the border
PLACEABLE_SIZES = ("small", "medium")  # a large shape has no room to move: always in the center
_SUPERSAMPLE = 4  # anti-aliasing: draw at 4x and box-filter down


@dataclass(frozen=True)
class DemoShapesConfig:
    """Parameters of the demo set; every field is part of the cache key.

    :param seed: generator seed; the same config always gives the same bytes.
    :param n_train: training samples.
    :param n_val: validation samples.
    :param image_size: image side in pixels.
    :param samples_per_shard: shard size.
    :param held_out: explicit (colour, shape) pairs kept out of train; None = choose ``held_out_count`` by seed.
    :param held_out_count: number of pairs held out when ``held_out`` is None.
    :param val_held_out_fraction: share of val samples drawn from held-out pairs.
    :param position_in_caption: probability that a caption names the position (0 by default: every shape is
        centred, see placed_sizes).
    :param placed_sizes: size classes drawn at one of the 9 positions (the others always in the center), a subset of
        PLACEABLE_SIZES. Default (): centred shapes only. With small and medium shapes placed, the demo's tiny
        decoder drew blobs near the centre after 4,000 steps (position 0.31, the always-centre rate; shape 0.19); on
        centred shapes it draws the caption's shape (0.55 seen, 0.45 held-out at 2,000 steps).
    :param hard_negative_attributes: attributes swapped to write each sample's hard-negative captions (json
        ``hard_negatives``: the caption with that attribute changed to every other value, never to a held-out pair,
        for CLIP training with ``data.hard_negatives``).
    """

    seed: int = 0
    n_train: int = 10_000
    n_val: int = 1_000
    image_size: int = 64
    samples_per_shard: int = 250  # small shards: val still splits over 2 ranks x 2 workers
    held_out: tuple[tuple[str, str], ...] | None = None
    held_out_count: int = 6
    val_held_out_fraction: float = 0.5
    position_in_caption: float = 0.0
    placed_sizes: tuple[str, ...] = ()
    hard_negative_attributes: tuple[str, ...] = ("shape",)

    def __post_init__(self) -> None:
        for name in ("n_train", "n_val"):
            if getattr(self, name) < 1:  # an empty split has no shards, so no pattern to return
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        bad = [size for size in self.placed_sizes if size not in PLACEABLE_SIZES]
        if bad:
            raise ValueError(f"placed_sizes {bad} cannot move off-centre; placeable: {list(PLACEABLE_SIZES)}")

    def version_hash(self) -> str:
        """Short hash of the config and GENERATOR_VERSION, naming the cache folder."""
        payload = json.dumps([GENERATOR_VERSION, dataclasses.asdict(self)], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ShapeSpec:
    """Everything needed to render one image and caption it.

    :param scale: longer side of the shape's box as a fraction of the image (the size class, jittered).
    :param offset: centre of the box relative to the image centre, as fractions of the image side.
    :param named_position: whether the caption names the position.
    """

    shape: str
    color: str
    background: str
    size: str
    position: str
    scale: float
    offset: tuple[float, float]
    named_position: bool = True


# ----------------------------------------------------------------------------- geometry

def _polygon(shape: str) -> np.ndarray | None:
    """Outline in its natural proportions, y pointing down; None for the circle (drawn as an ellipse)."""
    if shape == "circle":
        return None
    if shape == "square":
        return np.array([(0, 0), (1, 0), (1, 1), (0, 1)], float)
    if shape == "diamond":
        return np.array([(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)], float)
    if shape == "triangle":  # equilateral, pointing up
        return np.array([(0.5, 0), (1, np.sqrt(3) / 2), (0, np.sqrt(3) / 2)], float)
    if shape == "hexagon":  # flat top
        a = np.deg2rad(np.arange(6) * 60)
        return np.stack([np.cos(a), np.sin(a)], 1)
    if shape == "star":  # five points, fat enough to keep its points at 20 px
        a = np.deg2rad(np.arange(10) * 36 - 90)
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.5)
        return np.stack([r * np.cos(a), r * np.sin(a)], 1)
    if shape == "cross":  # plus sign, arms one third wide
        t, u = 1 / 3, 2 / 3
        return np.array([(t, 0), (u, 0), (u, t), (1, t), (1, u), (u, u), (u, 1), (t, 1), (t, u), (0, u), (0, t),
                         (t, t)], float)
    if shape == "heart":
        theta = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        x = 16 * np.sin(theta) ** 3
        y = -(13 * np.cos(theta) - 5 * np.cos(2 * theta) - 2 * np.cos(3 * theta) - np.cos(4 * theta))
        return np.stack([x, y], 1)
    raise ValueError(f"unknown shape {shape!r}; valid: {list(SHAPES)}")


@cache
def unit_outline(shape: str) -> tuple[np.ndarray | None, float]:
    """(outline scaled into the unit box, aspect = width / height) of a shape."""
    poly = _polygon(shape)
    if poly is None:
        return None, 1.0
    lo, hi = poly.min(0), poly.max(0)
    return (poly - lo) / (hi - lo), float((hi - lo)[0] / (hi - lo)[1])


def coverage(shape: str, box: tuple[float, float, float, float], canvas: int) -> Image.Image:
    """Anti-aliased coverage mask ("L", canvas x canvas) of a shape filling ``box`` = (x0, y0, x1, y1) in pixels.

    :param shape: one of SHAPES.
    :param box: the shape's bounding box, sub-pixel.
    :param canvas: image side in pixels.
    """
    s = _SUPERSAMPLE
    mask = Image.new("L", (canvas * s, canvas * s), 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = (v * s for v in box)
    outline, _ = unit_outline(shape)
    if outline is None:
        draw.ellipse((x0, y0, x1, y1), fill=255)
    else:
        pts = np.column_stack([x0 + outline[:, 0] * (x1 - x0), y0 + outline[:, 1] * (y1 - y0)])
        draw.polygon([tuple(p) for p in pts], fill=255)
    return mask.reduce(s)


def shape_box(spec: ShapeSpec, image_size: int) -> tuple[float, float, float, float]:
    """Pixel box (x0, y0, x1, y1) of a spec's shape: the longer side is ``scale`` of the image."""
    _, aspect = unit_outline(spec.shape)
    side = spec.scale * image_size
    w, h = (side, side / aspect) if aspect >= 1 else (side * aspect, side)
    cx = image_size / 2 + spec.offset[0] * image_size
    cy = image_size / 2 + spec.offset[1] * image_size
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def position_offset(size: str) -> float:
    """Distance of an off-centre position from the centre, as a fraction of the image side (0: always centred)."""
    if size not in PLACEABLE_SIZES:
        return 0.0
    return (1 - SIZES[size]) / 2 - _EDGE_MARGIN


# ----------------------------------------------------------------------------- rendering and captions

def render(spec: ShapeSpec, image_size: int = 64) -> Image.Image:
    """Draw a spec as an RGB image.

    :param spec: what to draw.
    :param image_size: side in pixels.
    """
    mask = coverage(spec.shape, shape_box(spec, image_size), image_size)
    fg = Image.new("RGB", mask.size, COLORS[spec.color])
    bg = Image.new("RGB", mask.size, COLORS[spec.background])
    return Image.composite(fg, bg, mask)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(spec: ShapeSpec) -> str:
    """The caption of a spec, e.g. "a small red circle in the top left on a blue background".

    :param spec: the sample.
    """
    where = f" {POSITION_PHRASES[spec.position]}" if spec.named_position else ""
    return (f"{_article(spec.size)} {spec.size} {spec.color} {spec.shape}{where} "
            f"on {_article(spec.background)} {spec.background} background")


NEGATIVE_ATTRIBUTES = {"shape": SHAPES, "color": tuple(COLORS), "size": tuple(SIZES)}


def hard_negative_captions(spec: ShapeSpec, cfg: DemoShapesConfig, held: set[tuple[str, str]]) -> list[str]:
    """Captions that differ from the spec's in exactly one of ``cfg.hard_negative_attributes`` (NegCLIP-style).

    A swap never names a held-out colour-shape pair, nor a shape coloured like its background.

    :param spec: the sample.
    :param cfg: demo config.
    :param held: the held-out (colour, shape) pairs.
    """
    out = []
    for attr in cfg.hard_negative_attributes:
        if attr not in NEGATIVE_ATTRIBUTES:
            raise ValueError(f"unknown hard-negative attribute {attr!r}; valid: {list(NEGATIVE_ATTRIBUTES)}")
        for value in NEGATIVE_ATTRIBUTES[attr]:
            if value == getattr(spec, attr):
                continue
            change: dict[str, Any] = {attr: value}  # one of the str fields named in NEGATIVE_ATTRIBUTES
            other = dataclasses.replace(spec, **change)
            if (other.color, other.shape) in held or other.color == other.background:
                continue
            out.append(caption(other))
    return out


def held_out_combos(cfg: DemoShapesConfig) -> list[tuple[str, str]]:
    """The (colour, shape) pairs never shown in train.

    Chosen by seed along diagonals of a shuffled colour x shape table, so each colour and each shape loses as
    few partners as possible and still appears in train with others.

    :param cfg: demo config.
    """
    if cfg.held_out is not None:
        combos = [(color, shape) for color, shape in cfg.held_out]
        for color, shape in combos:
            if color not in COLORS or shape not in SHAPES:
                raise ValueError(f"unknown held-out pair {(color, shape)}; colours {list(COLORS)}, shapes {SHAPES}")
        return combos
    n_colors = len(COLORS)
    if not 0 <= cfg.held_out_count <= len(SHAPES) * (n_colors - 1):
        raise ValueError(f"held_out_count must be in [0, {len(SHAPES) * (n_colors - 1)}]")
    rng = np.random.default_rng([cfg.seed, 7])
    colors = [list(COLORS)[i] for i in rng.permutation(n_colors)]
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))]
    combos = [(colors[(i + d) % n_colors], shapes[i]) for d in range(n_colors) for i in range(len(SHAPES))]
    return combos[: cfg.held_out_count]


def _random_spec(rng: np.random.Generator, color: str, shape: str, cfg: DemoShapesConfig) -> ShapeSpec:
    background = str(rng.choice([c for c in COLORS if c != color]))
    size = str(rng.choice(list(SIZES)))
    position = str(rng.choice(list(POSITIONS))) if size in cfg.placed_sizes else "center"
    dx, dy = POSITIONS[position]
    jitter = rng.uniform(-_POSITION_JITTER, _POSITION_JITTER, 2)
    reach = position_offset(size)
    return ShapeSpec(shape=shape, color=color, background=background, size=size, position=position,
                     scale=float(SIZES[size] * (1 + rng.uniform(-_SIZE_JITTER, _SIZE_JITTER))),
                     offset=(float(dx * reach + jitter[0]), float(dy * reach + jitter[1])),
                     named_position=bool(rng.random() < cfg.position_in_caption))


def make_specs(cfg: DemoShapesConfig, split: str) -> list[tuple[ShapeSpec, bool]]:
    """Deterministic (spec, held_out) list of a split.

    :param cfg: demo config.
    :param split: "train" (seen pairs only) or "val" (seen and held-out pairs).
    """
    if split not in ("train", "val"):
        raise ValueError(f"unknown split {split!r}; valid: train, val")
    held = held_out_combos(cfg)
    seen = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in set(held)]
    rng = np.random.default_rng([cfg.seed, 0 if split == "train" else 1])
    n = cfg.n_train if split == "train" else cfg.n_val
    n_held = round(n * cfg.val_held_out_fraction) if split == "val" and held else 0
    flags = np.array([True] * n_held + [False] * (n - n_held))
    rng.shuffle(flags)
    specs, held_i = [], 0
    for is_held in flags:
        if is_held:  # round-robin, so every held-out pair shows up in val
            color, shape = held[held_i % len(held)]
            held_i += 1
        else:
            color, shape = seen[rng.integers(len(seen))]
        specs.append((_random_spec(rng, color, shape, cfg), bool(is_held)))
    return specs


def iter_samples(cfg: DemoShapesConfig, split: str) -> Iterator[SourceSample]:
    """Rendered samples of a split, ready for write_shards; the json records the spec.

    :param cfg: demo config.
    :param split: "train" or "val".
    """
    held_pairs = set(held_out_combos(cfg))
    for i, (spec, held) in enumerate(make_specs(cfg, split)):
        meta = {"shape": spec.shape, "color": spec.color, "background": spec.background, "size": spec.size,
                "position": spec.position, "held_out": held, "split": split,
                "hard_negatives": hard_negative_captions(spec, cfg, held_pairs)}
        yield SourceSample(f"demo_shapes/{split}/{i}", render(spec, cfg.image_size), caption(spec), meta)


# ----------------------------------------------------------------------------- the cached shard set

def default_cache_dir() -> Path:
    """``$UNCLIP_CACHE`` or ``~/.cache/unclip``."""
    return Path(os.environ.get("UNCLIP_CACHE") or Path.home() / ".cache" / "unclip")


def ensure_demo_shards(cfg: DemoShapesConfig | None = None, cache_dir: str | Path | None = None,
                       workers: int = 1) -> dict[str, str]:
    """Build the demo shards once (atomically) and return their brace patterns.

    :param cfg: demo config (default: DemoShapesConfig()).
    :param cache_dir: cache root (default: default_cache_dir()); the set lives in
        ``<root>/demo_shapes/<hash>/{train,val}/NNNNN.tar``.
    :param workers: processes encoding images on the first build.
    :return: {"train": pattern, "val": pattern}
    """
    cfg = cfg or DemoShapesConfig()
    final = Path(cache_dir or default_cache_dir()) / "demo_shapes" / cfg.version_hash()
    if not final.is_dir():
        final.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the final folder, then rename: a killed run never leaves a half set under the real name.
        tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            manifest: dict[str, Any] = {"generator_version": GENERATOR_VERSION, "config": dataclasses.asdict(cfg),
                        "held_out": held_out_combos(cfg), "splits": {}}
            for split in ("train", "val"):
                stats = write_shards(iter_samples(cfg, split), tmp / split, EncodeOptions(image_format="png"),
                                     samples_per_shard=cfg.samples_per_shard, workers=workers)
                manifest["splits"][split] = {"samples": stats["written"], "shards": stats["shards"]}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():  # not a concurrent build that finished first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    manifest = json.loads((final / "manifest.json").read_text())
    patterns = {}
    for split in ("train", "val"):
        pattern = shard_pattern(final / split, "%05d.tar", manifest["splits"][split]["shards"])
        if pattern is None:
            raise ValueError(f"the demo set {final} has no {split} shards; delete it to rebuild")
        patterns[split] = pattern
    return patterns
