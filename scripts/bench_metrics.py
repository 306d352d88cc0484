"""Benchmark the metric stage of ``unclip-eval``: wall time and peak memory of FID, KID and precision/recall
at N = 2k, 8k and 30k samples per side (the paper's table is COCO-30k; ablations use 10k).

    python scripts/bench_metrics.py [--quick]

Features are synthetic (2048-d, Inception pool3's width, correlated), since the cost of the metrics depends only
on N and D. Each N runs in a fresh spawned process, so its peak (peak RSS on a CPU, the CUDA allocator's peak
on a GPU, where precision/recall runs) is its own; ``metric_memory`` is the peak above the inputs, which grows
linearly in N (a full N x N float64 distance matrix would be 7.2 GB at 30k, three of them 21 GB).
--quick runs N = 500, 1000, 2000 (10 KID subsets) to check the benchmark itself.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import device as _device  # noqa: E402
from bench_common import isolated, peak_memory_mib, peak_unit, reset_peak_memory, suite_main, sync  # noqa: E402

from unclip.evaluation.metrics import frechet_distance_from_features, kernel_inception_distance, precision_recall  # noqa: E402

DIM = 2048


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def bench_n(n: int, kid_subsets: int = 100) -> list[dict]:
    """FID + KID (``kid_subsets`` subsets of min(1000, N/2)) + precision/recall (k = 3) on N real and N fake
    features."""
    dev = _device()
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(DIM, DIM, generator=g) / DIM**0.5
    real = torch.randn(n, DIM, generator=g) @ mix
    fake = (torch.randn(n, DIM, generator=g) * 1.1 + 0.1) @ mix
    del mix
    reset_peak_memory(dev)
    sync(dev)
    before = _rss_mib() if dev.type == "cpu" else 0.0  # interpreter, torch and the features themselves
    rows = []
    for name, fn in (
        ("fid", lambda: frechet_distance_from_features(real, fake)),
        ("kid", lambda: kernel_inception_distance(real, fake, kid_subsets, min(1000, n // 2),
                                                  torch.Generator().manual_seed(0))),
        ("precision_recall", lambda: precision_recall(real, fake, 3, device=dev)),
    ):
        start = time.perf_counter()
        fn()
        sync(dev)
        rows.append({"workload": f"metrics/{name}/n={n}", "metric": "seconds",
                     "value": round(time.perf_counter() - start, 2), "unit": "s"})
    peak = peak_memory_mib(dev)
    rows.append({"workload": f"metrics/all/n={n}", "metric": "peak_memory", "value": round(peak, 1),
                 "unit": peak_unit(dev)})
    # what the metrics add on top of their inputs: a constant (D x D covariances, one distance block) plus a
    # part linear in N, so 2k -> 8k -> 30k should grow by at most 4x and 3.75x (an N x N matrix: 16x, 14x)
    rows.append({"workload": f"metrics/all/n={n}", "metric": "metric_memory",
                 "value": round(peak - before, 1), "unit": peak_unit(dev)})
    if dev.type == "cuda":  # the host side too: the features and FID/KID's float64 copies live there
        from bench_common import peak_rss_mib

        rows.append({"workload": f"metrics/all/n={n}", "metric": "peak_rss", "value": round(peak_rss_mib(), 1),
                     "unit": "MiB (peak RSS)"})
    return rows


def run(quick: bool) -> list[dict]:
    """:param quick: N = 500, 1000, 2000 and 10 KID subsets instead of 2k, 8k, 30k and 100."""
    rows: list[dict] = []
    for n in ((500, 1000, 2000) if quick else (2000, 8000, 30000)):
        rows += isolated(bench_n, n, 10 if quick else 100)
    return rows


def main(argv: list[str] | None = None) -> int:
    return suite_main(run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
