"""Data-skip counts per reason and per rank, as the training modules log them.

Every batch carries the counts its worker gathered since its previous batch (``batch["data_stats"]``:
``samples``, ``skipped`` and ``repaired`` by reason, ``padded``). :class:`DataStats` sums them on each rank;
:meth:`DataStats.report` gathers every rank's sums (a collective: all ranks call it at the same step) into
flat metrics such as ``data/skipped/decode_error/rank1``, which rank 0's loggers write.
"""

from __future__ import annotations

from collections import Counter

import torch.distributed as dist


class DataStats:
    """Running per-reason counts of one rank."""

    def __init__(self) -> None:
        self.skipped: Counter = Counter()
        self.repaired: Counter = Counter()
        self.padded = 0
        self.samples = 0

    def update(self, stats: dict) -> None:
        """Add one batch's ``data_stats``."""
        self.skipped.update(stats.get("skipped", {}))
        self.repaired.update(stats.get("repaired", {}))
        self.padded += int(stats.get("padded", 0))
        self.samples += int(stats.get("samples", 0))

    def as_dict(self) -> dict:
        return {"samples": self.samples, "padded": self.padded, "skipped": dict(self.skipped),
                "repaired": dict(self.repaired)}

    def gather(self) -> list[dict]:
        """Every rank's counts, in rank order (this rank's alone outside torch.distributed)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return [self.as_dict()]
        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, self.as_dict())
        return out

    def report(self) -> dict[str, float]:
        """Flat metrics of every rank: ``data/<kind>/<reason>/rank<r>`` and totals ``data/<kind>/all``."""
        return flatten(self.gather())


def flatten(per_rank: list[dict]) -> dict[str, float]:
    """``[{"skipped": {...}, "repaired": {...}, "padded", "samples"}, ...]`` -> flat metric names."""
    metrics: dict[str, float] = {"data/skipped/all": 0.0, "data/repaired/all": 0.0, "data/padded/all": 0.0}
    for rank, stats in enumerate(per_rank):
        for kind in ("skipped", "repaired"):
            for reason, count in sorted(stats.get(kind, {}).items()):
                metrics[f"data/{kind}/{reason}/rank{rank}"] = float(count)
                metrics[f"data/{kind}/all"] += count
        metrics[f"data/padded/rank{rank}"] = float(stats.get("padded", 0))
        metrics["data/padded/all"] += stats.get("padded", 0)
    return metrics
