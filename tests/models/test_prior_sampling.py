"""sample_prior (respacing, guidance, reranking), load_prior and the CLIP check (PriorInfo.check)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.models.test_prior import D, inputs, make_prior
from unclip.diffusion import create_diffusion
from unclip.models.prior_sampling import load_prior, rerank, sample_prior
from unclip.stages import ClipInfo, ContractError, PriorInfo

PROCESS = create_diffusion(steps=1000, noise_schedule="cosine", mean_type="x0", loss_type="mse")


class FakePrior:
    """Predicts a fixed x0 per candidate slot (row r is candidate r % n), whatever x_t and the caption."""

    embed_dim = 3

    def __init__(self, candidates: int, scale: float = 17.2):
        self.n, self.scale = candidates, scale
        self.targets = torch.eye(3)[:candidates] * torch.tensor([[1.0], [2.0], [3.0]])[:candidates]

    def __call__(self, x, t, text_embed, text_tokens, text_mask, cond_drop_mask=None):
        return self.scale * self.targets[torch.arange(x.shape[0]) % self.n]

    def unscale(self, x):
        return x / self.scale


def fake_cond(text_embed: torch.Tensor) -> dict:
    b = text_embed.shape[0]
    return {"text_embed": text_embed, "text_tokens": torch.zeros(b, 2, 4),
            "text_mask": torch.ones(b, 2, dtype=torch.bool)}


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp_2m"])
def test_the_kept_candidate_has_the_larger_dot_product_with_z_t(sampler):
    z_t = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.6, 0.8, 0.0]])
    out = sample_prior(FakePrior(2), fake_cond(z_t), PROCESS, sampler=sampler, steps=8, candidates=2,
                       generator=torch.Generator().manual_seed(0))
    # Candidates are e0 and 2·e1 (unit-norm after unscaling): caption 0 keeps e1, caption 1 keeps e0.
    torch.testing.assert_close(out, torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
                               atol=1e-4, rtol=0)
    one = sample_prior(FakePrior(1), fake_cond(z_t), PROCESS, steps=8, candidates=1)
    torch.testing.assert_close(one, torch.tensor([[1.0, 0.0, 0.0]]).expand(3, 3), atol=1e-4, rtol=0)


def test_rerank_by_dot_product():
    cands = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]])
    z_t = torch.tensor([[0.2, 0.9], [0.9, -0.2]])
    torch.testing.assert_close(rerank(cands, z_t), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))


def test_sample_prior_with_a_real_network_is_unit_norm_seeded_and_guided():
    model, a = make_prior(), inputs()
    cond = {k: a[k] for k in ("text_embed", "text_tokens", "text_mask")}

    def draw(seed: int, **kw):
        return sample_prior(model, cond, PROCESS, steps=6, generator=torch.Generator().manual_seed(seed), **kw)

    out = draw(0, guidance_scale=3.0, candidates=2)
    assert out.shape == (5, D) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(draw(0, guidance_scale=3.0, candidates=2), out)
    assert not torch.allclose(draw(1, guidance_scale=3.0, candidates=2), out)
    assert not torch.allclose(draw(0, guidance_scale=1.0, candidates=2), out)
    assert draw(0, sampler="ddpm", candidates=3).shape == (5, D)
    with pytest.raises(KeyError, match="text_tokens"):
        sample_prior(model, {"text_embed": a["text_embed"]}, PROCESS)


def test_load_prior_refuses_other_stages_and_check_names_both_clips(tmp_path):
    path = tmp_path / "clip.ckpt"
    torch.save({"state_dict": {}, "unclip": {"stage": "clip"}}, path)
    with pytest.raises(ValueError, match="'clip' stage checkpoint; a 'prior' checkpoint is needed"):
        load_prior(path)
    model = {"embed_dim": 128, "text_width": 64, "context_length": 8}
    torch.save({"state_dict": {"optimizer.x": torch.zeros(2)},
                "unclip": {"stage": "prior", "model_config": model, "diffusion": {}}}, path)
    with pytest.raises(ValueError, match="holds no network weights"):
        load_prior(path)
    info = PriorInfo(model=model, diffusion={}, sampling={}, clip=ClipInfo(128, 64, 8, "a" * 64))
    info.check(ClipInfo(128, 64, 8, "a" * 64))
    with pytest.raises(ContractError, match=r"the prior: clip_hash=a{12} must be equal to the clip_hash=b{12} of "
                                            r"the CLIP"):
        info.check(ClipInfo(128, 64, 8, "b" * 64))
    with pytest.raises(ContractError, match="model.embed_dim=128 must be equal to the embed_dim=64 of the CLIP"):
        info.check(ClipInfo(64, 64, 8, "a" * 64))


def test_candidates_are_normalised_before_reranking():
    # Candidates e0, 2·e1, 3·e2 become unit vectors: the ranking is by direction (cosine), and the output has norm 1.
    z_t = F.normalize(torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]]), dim=-1)
    out = sample_prior(FakePrior(3), fake_cond(z_t), PROCESS, steps=4, candidates=3)
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), atol=1e-4, rtol=0)
