"""Shared optimiser builders: no-decay parameter groups and the warm-up + cosine schedule."""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
from torch import nn

from unclip.training.optim import build_optimizer, param_groups, warmup_cosine, warmup_cosine_factor


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.positional_embedding = nn.Parameter(torch.zeros(3, 4))
        self.logit_scale = nn.Parameter(torch.ones([]))
        self.frozen = nn.Parameter(torch.ones(4, 4), requires_grad=False)


def test_param_groups_keep_decay_off_gains_biases_scalars_and_named_embeddings():
    decay, no_decay = param_groups(Net().named_parameters(), ["positional_embedding"])
    assert decay["names"] == ["proj.weight"] and "weight_decay" not in decay
    assert sorted(no_decay["names"]) == ["logit_scale", "norm.bias", "norm.weight", "positional_embedding",
                                         "proj.bias"]
    assert no_decay["weight_decay"] == 0.0  # frozen parameters are in neither group


def test_build_optimizer_gives_the_decayed_group_the_configured_decay():
    net = Net()
    opt = build_optimizer(functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.3), net, [])
    decays = {n: g["weight_decay"] for g in opt.param_groups for n in g["names"]}
    assert decays["proj.weight"] == 0.3 and decays["positional_embedding"] == 0.3  # 2-d, not listed
    assert decays["logit_scale"] == decays["norm.weight"] == decays["proj.bias"] == 0.0


def test_decay_actually_skips_the_no_decay_group():
    net = Net()
    opt = build_optimizer(functools.partial(torch.optim.AdamW, lr=0.1, weight_decay=0.5), net, [])
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)  # zero gradient: only weight decay can move a parameter
    opt.step()
    assert torch.equal(net.logit_scale, before["logit_scale"]) and torch.equal(net.norm.weight, before["norm.weight"])
    torch.testing.assert_close(net.proj.weight, before["proj.weight"] * (1 - 0.1 * 0.5))


def test_warmup_then_cosine_to_the_floor():
    f = functools.partial(warmup_cosine_factor, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values)), "monotone decay after warm-up"


def test_lambda_lr_follows_the_factor_per_step():
    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=2.0)
    sched = warmup_cosine(opt, warmup_steps=2, total_steps=6, min_lr_ratio=0.0)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [2.0 * warmup_cosine_factor(s, 2, 6, 0.0) for s in range(7)]
    assert lrs == pytest.approx(expected) and lrs[0] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.0)
    assert lrs[4] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 0.5)))


@pytest.mark.parametrize("kwargs", [dict(warmup_steps=-1, total_steps=10, min_lr_ratio=0.0),
                                    dict(warmup_steps=0, total_steps=0, min_lr_ratio=0.0),
                                    dict(warmup_steps=0, total_steps=10, min_lr_ratio=1.5)])
def test_schedule_rejects_impossible_settings(kwargs):
    with pytest.raises(ValueError, match="scheduler"):
        warmup_cosine(torch.optim.SGD(Net().parameters(), lr=1.0), **kwargs)
