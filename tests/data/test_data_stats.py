"""Skip counts per reason and per rank: gathered over real gloo processes into flat metric names."""

from __future__ import annotations

import os
import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from unclip.data.stats import DataStats, flatten


def _rank(rank: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    stats = DataStats()
    stats.update({"samples": 4, "skipped": {"decode_error": rank + 1}, "repaired": {"bad_npy": 2}, "padded": rank})
    stats.update({"samples": 4, "skipped": {f"only_rank{rank}": 1}, "repaired": {}, "padded": 0})
    report = stats.report()
    if rank == 0:
        out.put(report)
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~20 s on a loaded 2-core machine; the fast test below covers flatten
def test_every_ranks_counts_reach_rank_zero_by_reason():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    report = queue.get(timeout=60)
    for p in procs:
        p.join(30)
    assert report["data/skipped/decode_error/rank0"] == 1 and report["data/skipped/decode_error/rank1"] == 2
    assert report["data/skipped/only_rank1/rank1"] == 1 and "data/skipped/only_rank1/rank0" not in report
    assert report["data/repaired/bad_npy/rank1"] == 2 and report["data/padded/rank1"] == 1
    assert report["data/skipped/all"] == 5 and report["data/repaired/all"] == 4 and report["data/padded/all"] == 1


def test_one_process_reports_its_own_counts():
    stats = DataStats()
    stats.update({"skipped": {"too_large": 3}, "repaired": {"ignored_member:gz": 1}})
    assert stats.report() == flatten([stats.as_dict()]) == {
        "data/skipped/all": 3.0, "data/repaired/all": 1.0, "data/padded/all": 0.0, "data/skipped/too_large/rank0": 3.0,
        "data/repaired/ignored_member:gz/rank0": 1.0, "data/padded/rank0": 0.0}
