"""Shared setup for the diffusion tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    # The closed-form tests run thousands of small float64 ops; one intra-op thread is as fast and does not
    # stall when the CPU is shared (OpenMP spin-waits made 2-thread runs 10x slower under load). Restored after.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
