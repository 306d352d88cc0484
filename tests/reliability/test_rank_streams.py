"""Data-parallel ranks start from the same seed (identical weights) but must not draw identical diffusion noise."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from unclip.training.callbacks import ResumeState


def draws(rank: int, world: int, seed: int | None = 7) -> torch.Tensor:
    torch.manual_seed(0)  # what seed_everything left every rank with
    ResumeState(seed=seed).on_fit_start(SimpleNamespace(world_size=world, global_rank=rank), None)
    return torch.rand(4)


def test_each_rank_draws_its_own_stream_and_a_single_process_is_untouched():
    assert not torch.equal(draws(0, 2), draws(1, 2))
    assert torch.equal(draws(1, 2), draws(1, 2)), "seed-determined"
    torch.manual_seed(0)
    expected = torch.rand(4)
    assert torch.equal(draws(0, 1), expected), "one process keeps seed_everything's stream"
    assert torch.equal(draws(1, 2, seed=None), expected), "without a seed nothing changes"
