"""HardNegativeClipLoss against open_clip's ClipLoss and a per-row reference; the pairwise accuracy on known cases.

The two-rank DDP equality lives in test_clip_ddp.py (one spawn for every distributed loss case).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from unclip.models.hard_negative_loss import HardNegativeClipLoss, hard_negative_accuracy


def _features(b: int = 6, k: int = 3, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    unit = lambda *shape: F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)  # noqa: E731
    return unit(b, d), unit(b, d), unit(b, k, d), torch.rand(b, k, generator=g) > 0.4


def test_no_negatives_is_open_clip_loss():
    images, texts, negatives, _ = _features()
    scale = torch.tensor(7.0, dtype=torch.float64)
    empty = torch.zeros(negatives.shape[:2], dtype=torch.bool)
    torch.testing.assert_close(HardNegativeClipLoss()(images, texts, scale, negatives, empty),
                               ClipLoss()(images, texts, scale), rtol=1e-12, atol=0)


def test_matches_per_row_reference():
    images, texts, negatives, mask = _features()
    scale = torch.tensor(5.0, dtype=torch.float64)
    b = images.shape[0]
    pool = [negatives[j, m] for j in range(b) for m in range(negatives.shape[1]) if mask[j, m]]
    i2t = t2i = 0.0
    for i in range(b):  # -log softmax of the true caption over [all captions, every present negative]
        scores = [float(scale * images[i] @ c) for c in [*texts, *pool]]
        i2t += -scores[i] + math.log(sum(math.exp(s) for s in scores))
        scores = [float(scale * texts[i] @ x) for x in images]
        t2i += -scores[i] + math.log(sum(math.exp(s) for s in scores))
    expected = (i2t + t2i) / (2 * b)
    got = HardNegativeClipLoss()(images, texts, scale, negatives, mask)
    assert abs(float(got) - expected) < 1e-10
    assert float(got) > float(ClipLoss()(images, texts, scale)), "negatives only add competitors"


def test_bias_shifts_every_logit():
    images, texts, negatives, mask = _features(seed=3)
    scale = torch.tensor(4.0, dtype=torch.float64)
    loss = HardNegativeClipLoss()
    # A constant added to every logit leaves each softmax unchanged.
    torch.testing.assert_close(loss(images, texts, scale, negatives, mask, torch.tensor(-3.0, dtype=torch.float64)),
                               loss(images, texts, scale, negatives, mask), rtol=1e-12, atol=1e-12)


def test_gradient_separates_the_caption_from_its_negative():
    # One image between its caption and a hard negative at the same angle: the loss must move it towards the caption.
    text = torch.tensor([[1.0, 0.0, 0.0]])
    negative = torch.tensor([[[0.0, 1.0, 0.0]]])
    image = F.normalize(torch.tensor([[1.0, 1.0, 0.2]]), dim=-1).requires_grad_(True)
    HardNegativeClipLoss()(image, text, torch.tensor(10.0), negative, torch.ones(1, 1, dtype=torch.bool)).backward()
    step = -image.grad[0]
    assert step[0] > 0 > step[1]


def test_hard_negative_accuracy_counts_present_pairs_only():
    images = torch.eye(3)
    texts = torch.eye(3)
    negatives = torch.stack([torch.stack([torch.eye(3)[1], torch.eye(3)[0]]),  # one loses, one ties with the caption
                             torch.stack([torch.eye(3)[2], torch.eye(3)[0]]),
                             torch.stack([torch.eye(3)[0], torch.eye(3)[1]])])
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    assert hard_negative_accuracy(images, texts, negatives, mask).tolist() == [2, 3]  # a tie counts as lost
