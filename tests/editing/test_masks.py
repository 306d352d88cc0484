"""Training masks (unclip.data.masks) from conf/masks/mix.yaml: the configured mix, each kind's geometry, the
convention (1 = generate), determinism, and config errors."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR
from unclip.data.masks import MASK_KINDS, MaskGenerator


def mix_config() -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "masks" / "mix.yaml"))


def generator(**changes) -> MaskGenerator:
    cfg = mix_config()
    for key, value in changes.items():
        cfg[key] = value
    return instantiate(cfg, _convert_="all")


def bbox(mask: torch.Tensor) -> tuple[int, int, int, int]:
    rows, cols = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def test_kinds_follow_the_configured_mix_and_every_mask_is_binary_and_non_empty():
    gen = generator()
    masks, kinds = gen.sample(3000, 16, torch.Generator().manual_seed(0))
    assert masks.shape == (3000, 1, 16, 16) and masks.dtype == torch.float32
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    weights = mix_config()["weights"]
    total = sum(weights.values())
    counts = Counter(kinds)
    for kind in MASK_KINDS:
        p = weights[kind] / total
        assert abs(counts[kind] / 3000 - p) < 4 * (p * (1 - p) / 3000) ** 0.5 + 1e-3, (kind, counts)
    area = masks.flatten(1).mean(1)
    assert (area > 0).all(), "every mask has something to generate"
    full = torch.tensor([k == "full" for k in kinds])
    assert (area[full] == 1).all() and (area[~full] < 1).all(), "only 'full' masks cover the whole image"


def test_zero_weight_kinds_never_appear():
    _, kinds = generator(weights={"box": 1.0, "outpaint": 1.0}).sample(400, 8, torch.Generator().manual_seed(1))
    assert set(kinds) == {"box", "outpaint"}


def test_a_single_box_is_a_filled_rectangle_of_the_configured_size():
    gen = generator(weights={"box": 1.0}, box={"count": [1, 1], "side": [0.25, 0.5]})
    masks = gen(200, 32, torch.Generator().manual_seed(2))[:, 0]
    for m in masks:
        top, bottom, left, right = bbox(m)
        assert m[top:bottom, left:right].all() and m.sum() == (bottom - top) * (right - left)
        assert 8 <= bottom - top <= 16 and 8 <= right - left <= 16


def test_outpainting_keeps_one_rectangle_and_generates_up_to_the_border():
    gen = generator(weights={"outpaint": 1.0})
    masks = gen(300, 32, torch.Generator().manual_seed(3))[:, 0]
    frames = 0
    for m in masks:
        keep = m == 0
        top, bottom, left, right = bbox(keep)
        assert keep[top:bottom, left:right].all(), "the kept region is one filled rectangle"
        touches = [top == 0, bottom == 32, left == 0, right == 32]
        if not any(touches):  # frame mode: a centred rectangle, generated on all four sides
            frames += 1
            assert abs((top + bottom) - 32) <= 1 and abs((left + right) - 32) <= 1
        else:  # side mode: a band along exactly one edge, spanning the image along it
            assert sum(touches) == 3
        assert 0.3 * 32 - 1 <= min(bottom - top, right - left) <= 0.8 * 32 + 1
    assert abs(frames / 300 - 0.3) < 0.1


def test_brush_strokes_are_thin_connected_paths():
    from scipy import ndimage

    gen = generator(weights={"brush": 1.0}, brush={"strokes": [1, 1], "vertices": [2, 6], "width": [0.06, 0.2],
                                                   "step": [0.1, 0.4]})
    masks = gen(200, 32, torch.Generator().manual_seed(4))[:, 0]
    area = masks.flatten(1).mean(1)
    assert (area > 0).all() and float(area.max()) < 0.6
    for m in masks:
        _, components = ndimage.label(m.numpy())
        assert components == 1, "one stroke paints one connected path"
    several = generator(weights={"brush": 1.0})(200, 32, torch.Generator().manual_seed(5))
    assert float(several.mean()) > float(masks.mean()), "more strokes cover more"


def test_masks_are_reproducible_from_the_generator():
    gen = generator()
    a = gen(16, 24, torch.Generator().manual_seed(7))
    b = gen(16, 24, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and not torch.equal(a, gen(16, 24, torch.Generator().manual_seed(8)))
    assert gen(4, (16, 24), torch.Generator().manual_seed(0)).shape == (4, 1, 16, 24)


@pytest.mark.parametrize("changes, message", [
    ({"weights": {"boxes": 1.0}}, r"unknown mask kinds \['boxes'\]"),
    ({"weights": {"box": 0.0}}, "positive sum"),
    ({"box": {"count": [1, 2]}}, r"masks.box needs exactly the keys \['count', 'side'\]"),
    ({"box": {"count": [1, 2], "side": [0.5, 1.5]}}, "masks.box.side must be"),
])
def test_bad_mask_configs_are_refused_by_name(changes, message):
    with pytest.raises(Exception, match=message):
        generator(**changes)
