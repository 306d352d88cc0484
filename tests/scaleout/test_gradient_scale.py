"""DDP and FSDP on two CPU ranks train the prior network exactly as one process does on the same global batches
(issue 17): same per-sample noise in every layout, plain SGD, so a gradient off by the world size (a missing or
doubled average) moves the weights twice as far and fails here. The injected-error case proves the test can tell."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from tests.scaleout import gradient_scale as gs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
ATOL, RTOL = 1e-5, 1e-4


def layouts(tmp_path) -> dict[str, dict[str, torch.Tensor]]:
    mp.spawn(gs.rank_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    return {layout: torch.load(tmp_path / f"{layout}.pt", weights_only=True) for layout in gs.LAYOUTS}


def moved_keys(reference: dict[str, torch.Tensor]) -> list[str]:
    """Weights SGD moved by over 3x the tolerance: a factor-2 gradient error (as far again) shows in each."""
    net, _ = gs.build()
    start = net.state_dict()
    return [k for k, v in reference.items() if (v - start[k]).abs().max() > 3 * (ATOL + RTOL * v.abs().max())]


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in a if not torch.allclose(a[k], b[k], atol=ATOL, rtol=RTOL)]


def test_two_ranks_match_one_process_and_a_scale_error_is_caught(tmp_path):
    reference = gs.single_process()
    moved = moved_keys(reference)
    assert len(moved) >= 0.8 * len(reference), f"too few weights move beyond the tolerance: {len(moved)}"

    trained = layouts(tmp_path)
    for layout in ("ddp", "fsdp"):
        assert set(trained[layout]) == set(reference), layout
        assert differing(trained[layout], reference) == [], f"{layout} differs from one process"
    # the premise: FSDP with its loss times the world size (a gradient scaled by 2) fails the same comparison
    assert set(moved) <= set(differing(trained["fsdp_scale_error"], reference)), "a scaled gradient went unnoticed"
