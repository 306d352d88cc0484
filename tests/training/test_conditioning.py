"""ClipConditioner: on-the-fly and precomputed embeddings agree; mismatched sources are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import make_tiny_clip_export
from unclip.config import ConfigError
from unclip.data.embeddings import write_meta
from unclip.training.conditioning import ClipConditioner


@pytest.fixture
def batch(tiny_clip_export):
    cond = ClipConditioner(str(tiny_clip_export), None, need_text_tokens=True)
    tokens = cond.clip.tokenize(["a red circle", "a large blue star on a white background"])
    return {"image": torch.rand(2, 3, 64, 64) * 2 - 1, "tokens": tokens}


def test_on_the_fly_conditioning_shapes_and_norms(tiny_clip_export, batch):
    cond = ClipConditioner(str(tiny_clip_export), None, need_text_tokens=True)
    out = cond(batch)
    assert out["image_embed"].shape == (2, cond.embed_dim) == out["text_embed"].shape
    assert torch.allclose(out["image_embed"].norm(dim=-1), torch.ones(2), atol=1e-5)
    assert out["text_tokens"].shape == (2, cond.context_length, cond.text_width)
    assert out["text_mask"].dtype == torch.bool and out["text_mask"][:, 0].all()
    assert "text_tokens" not in ClipConditioner(str(tiny_clip_export), None, need_text_tokens=False)(batch)
    assert not any(k.startswith("_clip") for k in cond.state_dict()), "the CLIP is not part of the stage's state"


def test_precomputed_embeddings_pass_through_renormalised(tiny_clip_export, batch, tmp_path):
    live = ClipConditioner(str(tiny_clip_export), None, need_text_tokens=True)
    expected = live(batch)
    write_meta(tmp_path, live.load().to_dict())
    stored = {k: v.half() for k, v in expected.items() if k != "text_mask"}
    stored["text_mask"] = expected["text_mask"]
    out = ClipConditioner(None, str(tmp_path), need_text_tokens=True)(stored)
    assert torch.allclose(out["image_embed"], expected["image_embed"], atol=2e-3)
    assert torch.allclose(out["image_embed"].norm(dim=-1), torch.ones(2), atol=1e-6)
    assert torch.equal(out["text_mask"], expected["text_mask"])


def test_mismatched_sources_are_refused_naming_both(tiny_clip_export, tmp_path):
    other = make_tiny_clip_export(tmp_path / "other", seed=1)
    meta = ClipConditioner(str(other), None, need_text_tokens=False).load().to_dict()
    write_meta(tmp_path / "emb", meta)
    cond = ClipConditioner(str(tiny_clip_export), str(tmp_path / "emb"), need_text_tokens=False)
    with pytest.raises(ConfigError, match=r"made with clip_hash=\w+ but clip_ckpt=.* has clip_hash=\w+"):
        cond.load()
    with pytest.raises(ConfigError, match="set clip_ckpt .* or data.embeddings"):
        ClipConditioner(None, None, need_text_tokens=False)
    assert np.isfinite(meta["embed_dim"])
