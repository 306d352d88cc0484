"""The AdamW implementation every stage trains with: fused (one vectorised kernel), not the per-tensor loop torch
picks by default for CPU parameters, and numerically the same update."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import compose_train
from unclip.training.optim import build_optimizer


@pytest.mark.parametrize("stage", ["clip", "prior", "decoder", "upsampler"])
def test_every_stage_builds_a_fused_adamw(stage):
    cfg = compose_train([f"stage={stage}", "run_dir=null"])
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
    opt = build_optimizer(instantiate(cfg.module.optimizer, _convert_="all"), net, [])
    assert isinstance(opt, torch.optim.AdamW)
    assert all(group["fused"] is True for group in opt.param_groups)


def test_fused_cpu_adamw_matches_the_single_tensor_loop():
    def run(**impl):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(4, 8), torch.nn.Conv2d(8, 2, 1))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1, **impl)
        for _ in range(3):
            net(torch.randn(2, 3, 8, 8)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        return torch.cat([p.detach().flatten() for p in net.parameters()])

    single = run(foreach=False)
    torch.testing.assert_close(run(fused=True), single, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run(foreach=True), single, rtol=1e-5, atol=1e-6)
