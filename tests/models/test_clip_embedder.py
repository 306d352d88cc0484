import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR
from unclip.models.clip import build_clip, make_tokenizer
from unclip.models.clip_embedder import FrozenCLIP


@pytest.fixture(scope="module")
def frozen():
    torch.manual_seed(0)
    cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "clip" / "tiny.yaml"))
    model, _ = build_clip(cfg)
    meta = {"embed_dim": cfg["embed_dim"], "image_size": 64, "image_mean": cfg["image_mean"],
            "image_std": cfg["image_std"], "clip_hash": "test"}
    return FrozenCLIP(model, make_tokenizer(None, 32), meta)


def test_text_embedding_equals_open_clip_and_mask_stops_at_end_of_text(frozen):
    tokens = frozen.tokenize(["a red circle", "a small blue star on a green background"])
    out = frozen.embed_text(tokens)
    assert torch.allclose(out["text_embed"], frozen.model.encode_text(tokens, normalize=True), atol=1e-6)
    assert out["text_tokens"].shape == (2, 32, frozen.text_width)
    lengths = (tokens != 0).sum(dim=1)
    assert torch.equal(out["text_mask"].sum(dim=1), lengths)
    assert not out["text_mask"][0, lengths[0]:].any()


def test_image_embeddings_are_unit_norm_and_resized(frozen):
    images = torch.rand(3, 3, 96, 96) * 2 - 1
    z = frozen.embed_images(images)
    assert z.shape == (3, frozen.embed_dim)
    assert torch.allclose(z.norm(dim=-1), torch.ones(3), atol=1e-5)
    small = torch.nn.functional.interpolate(images, size=(64, 64), mode="bicubic", antialias=True)
    assert torch.allclose(frozen.embed_images(small), z, atol=0.05)


def test_frozen_clip_never_trains(frozen):
    frozen.train()
    assert not frozen.model.training
    assert not any(p.requires_grad for p in frozen.parameters())
