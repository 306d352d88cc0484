"""PriorTransformer: shapes, causality, padding, null conditioning, embedding scale, cached sampling prefix."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unclip.diffusion import classifier_free_guidance
from unclip.models.prior import PriorTransformer, attention_mask, resolve_embed_scale

D, WT, CTX = 16, 8, 10


def make_prior(**overrides) -> PriorTransformer:
    torch.manual_seed(0)
    cfg = dict(embed_dim=D, text_width=WT, context_length=CTX, width=32, depth=3, heads=4, mlp_ratio=2.0,
               embed_scale=17.2)
    model = PriorTransformer(**{**cfg, **overrides})
    with torch.no_grad():  # random weights everywhere (the zero-initialised output layer would hide bugs)
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def inputs(b: int = 5, ctx: int = 7, lengths=(1, 3, 7, 2, 5), seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(b, D, generator=g) * 17.2, "t": torch.randint(0, 1000, (b,), generator=g),
            "text_embed": F.normalize(torch.randn(b, D, generator=g), dim=-1),
            "text_tokens": torch.randn(b, ctx, WT, generator=g),
            "text_mask": torch.arange(ctx)[None] < torch.tensor(lengths)[:, None]}


def call(model, a: dict, drop=None, fn=None) -> torch.Tensor:
    fn = fn or model
    return fn(a["x"], a["t"], a["text_embed"], a["text_tokens"], a["text_mask"], drop)


def test_output_shape_and_zero_initialised_output():
    model, a = make_prior(), inputs()
    assert call(model, a).shape == (5, D)
    fresh = PriorTransformer(embed_dim=D, text_width=WT, context_length=CTX, width=32, depth=2, heads=4,
                             mlp_ratio=2.0, embed_scale=17.2)
    assert torch.equal(call(fresh, a), torch.zeros(5, D)), "the first x0 prediction is the data mean, 0"


def test_forward_is_the_query_row_of_the_full_sequence():
    model, a = make_prior(), inputs()
    hidden = call(model, a, fn=model.hidden_states)  # [B, L + 4, W] with L = 7, the longest caption
    assert hidden.shape == (5, 7 + 4, 32)
    torch.testing.assert_close(model.out(hidden[:, -1]), call(model, a), atol=1e-5, rtol=1e-5)


def test_causality_later_positions_never_change_earlier_ones():
    model, a = make_prior(), inputs()
    base = call(model, a, fn=model.hidden_states)
    changed = dict(a, x=torch.randn(5, D), t=(a["t"] + 500) % 1000)  # timestep and noised z_i positions
    with torch.no_grad():
        model.query.add_(torch.randn(32))  # and the learned query
        after = call(model, changed, fn=model.hidden_states)
    length = base.shape[1] - 4
    torch.testing.assert_close(after[:, : length + 1], base[:, : length + 1])  # caption and z_t rows
    assert not torch.allclose(after[:, length + 1:], base[:, length + 1:])
    # Changing only the query changes only the last row: the noised-z_i row before it is untouched.
    with torch.no_grad():
        model.query.add_(torch.randn(32))
        again = call(model, changed, fn=model.hidden_states)
    torch.testing.assert_close(again[:, :-1], after[:, :-1])


def test_prediction_ignores_padded_caption_tokens_and_padding_length():
    model, a = make_prior(), inputs()
    out = call(model, a)
    noisy = dict(a, text_tokens=torch.where(a["text_mask"][..., None], a["text_tokens"], 1e3))
    torch.testing.assert_close(call(model, noisy), out)
    # More padding (a longer context) gives the same prediction: captions are cut to the longest real one.
    longer = dict(a, text_tokens=F.pad(a["text_tokens"], (0, 0, 0, 3), value=5.0),
                  text_mask=F.pad(a["text_mask"], (0, 3), value=False))
    torch.testing.assert_close(call(model, longer), out, atol=1e-5, rtol=1e-5)
    # ... and each example's prediction is the same alone as in a batch padded for longer captions.
    alone = {k: v[:1] for k, v in a.items()}
    torch.testing.assert_close(call(model, alone), out[:1], atol=1e-5, rtol=1e-5)


def test_no_nan_when_padded_rows_or_whole_captions_are_masked():
    model = make_prior()
    a = inputs(lengths=(1, 1, 1, 1, 1))
    a["text_mask"] = torch.zeros_like(a["text_mask"])  # even a caption with no real token at all
    a["text_mask"][0, 0] = True
    assert torch.isfinite(call(model, a, fn=model.hidden_states)).all()
    assert torch.isfinite(call(model, a)).all()
    mask = attention_mask(a["text_mask"], 7)
    assert mask.any(dim=-1).all(), "every row of the SDPA mask attends somewhere"
    assert not mask[1, 0, 3, 2], "no row attends to a padded key other than itself"


def test_null_conditioning_replaces_the_caption_where_the_drop_flag_is_set():
    model, a = make_prior(), inputs()
    drop = torch.tensor([True, False, True, False, False])
    out = call(model, a, drop)
    other = inputs(seed=7, lengths=(7, 1, 4, 2, 5))  # another caption, z_t and lengths...
    mixed = dict(a, text_embed=other["text_embed"], text_tokens=other["text_tokens"], text_mask=other["text_mask"])
    dropped = call(model, mixed, drop)
    torch.testing.assert_close(dropped[drop], out[drop])  # ...make no difference where dropped
    assert not torch.allclose(dropped[~drop], out[~drop])
    cond = call(model, a)
    torch.testing.assert_close(out[~drop], cond[~drop], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[drop], cond[drop])
    with torch.no_grad():
        model.null_text_token.add_(torch.randn(32))  # (a constant shift would vanish in LayerNorm)
    changed = call(model, a, drop)
    assert not torch.allclose(changed[drop], out[drop]), "the null caption is learned"
    torch.testing.assert_close(changed[~drop], out[~drop])


def test_guidance_runs_cond_and_null_in_one_batched_forward():
    model, a = make_prior(), inputs()
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return model(*args, **kwargs)

    guided = classifier_free_guidance(counted, 3.0, drop_key="cond_drop_mask")
    kwargs = {k: a[k] for k in ("text_embed", "text_tokens", "text_mask")}
    out = guided(a["x"], a["t"], **kwargs)
    assert calls == [10]
    cond = call(model, a, torch.zeros(5, dtype=torch.bool))
    null = call(model, a, torch.ones(5, dtype=torch.bool))
    torch.testing.assert_close(out, null + 3.0 * (cond - null), atol=1e-4, rtol=1e-4)


def test_embedding_scale_is_applied_and_undone():
    model = make_prior()
    z = F.normalize(torch.randn(4, D), dim=-1)
    torch.testing.assert_close(model.scale(z).norm(dim=-1), torch.full((4,), 17.2))
    torch.testing.assert_close(model.unscale(model.scale(z)), z)
    assert make_prior(embed_scale="sqrt_dim").embed_scale == math.sqrt(D) == resolve_embed_scale("sqrt_dim", D)
    for bad in ("17.2x", 0.0, -1.0):
        with pytest.raises(ValueError, match="embed_scale"):
            resolve_embed_scale(bad, D)


def test_cached_prefix_gives_the_same_predictions():
    model, a = make_prior(), inputs()
    for drop in (None, torch.tensor([True, False, True, False, False])):
        cached = model.with_cached_prefix()
        torch.testing.assert_close(call(model, a, drop, fn=cached), call(model, a, drop), atol=1e-5, rtol=1e-5)
        later = dict(a, x=torch.randn(5, D), t=(a["t"] + 1) % 1000)  # a later sampling step, same caption
        torch.testing.assert_close(call(model, later, drop, fn=cached), call(model, later, drop),
                                   atol=1e-5, rtol=1e-5)


def test_config_is_checked():
    good = dict(embed_dim=D, text_width=WT, context_length=CTX, width=32, depth=1, heads=4, mlp_ratio=2.0,
                embed_scale=17.2)
    assert isinstance(PriorTransformer.from_config(good), PriorTransformer)
    with pytest.raises(ValueError, match=r"unknown keys \['dropout'\]"):
        PriorTransformer.from_config({**good, "dropout": 0.1})
    with pytest.raises(ValueError, match=r"unset keys \['embed_dim'\]"):
        PriorTransformer.from_config({**good, "embed_dim": None})
    with pytest.raises(ValueError, match="not divisible"):
        PriorTransformer.from_config({**good, "heads": 5})
    with pytest.raises(ValueError, match="exceed the prior's context_length"):
        model = PriorTransformer.from_config(good)
        call(model, inputs(ctx=CTX + 1, lengths=(1, 1, 1, 1, 1)))
