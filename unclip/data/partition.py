"""Exactly-once sample ranges for a fixed number of batches per rank (``data.batches_per_epoch``).

Splitting whole shards over ranks x workers cannot give every reader the same number of samples when
shards differ in size, so a fixed quota per reader then re-reads some samples and never reaches others.
Instead, the epoch's shards (in one order, the same on every rank) are laid end to end as one sequence
of N samples, and reader k (rank-major, then worker) takes the next ``quota_k * batch_size`` positions
of it, as Mosaic streaming and webdataset's indexed reader partition by sample:

* total slots S = ranks x batches_per_epoch x batch_size <= N: every sample at most once; the start
  of the window moves by S each epoch, so successive epochs reach the rest even in a fixed shard order;
* S > N: every sample once, and the S - N extra slots re-read samples from the start (``padded``).

A reader reads a shard from its first sample and discards the positions before its range (tar is a
stream); that costs reading, not decoding.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterable, Sequence

import webdataset as wds
from webdataset.tariterators import base_plus_ext

Segment = tuple[str, int, int]  # (shard url, first sample index, stop index) within the shard


def count_samples(url: str, select: Callable[[str], bool] | None = None) -> int:
    """Samples in one shard as the read pipeline groups them (consecutive members sharing a key).

    :param select: the member filter the pipeline reads with; members it refuses do not form samples.
    Unreadable tails are counted up to the first error (the pipeline stops there too).
    """
    count, previous = 0, None
    try:
        with wds.gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isreg() or (info.name.startswith("__") and info.name.endswith("__")):
                    continue
                if select is not None and not select(info.name):
                    continue
                prefix, _ = base_plus_ext(info.name)
                if prefix is None:
                    continue
                if prefix != previous:
                    count, previous = count + 1, prefix
    except (tarfile.TarError, OSError, EOFError):
        pass
    return count


def reader_quotas(batches_per_epoch: int, num_workers: int) -> list[int]:
    """Batches each worker of one rank makes: the rank's quota split as evenly as possible."""
    return [batches_per_epoch // num_workers + int(w < batches_per_epoch % num_workers) for w in range(num_workers)]


def reader_window(rank: int, worker: int, num_workers: int, batches_per_epoch: int, batch_size: int) -> tuple[int, int]:
    """(first position, positions) of reader (rank, worker) among the epoch's S slots."""
    quotas = reader_quotas(batches_per_epoch, num_workers)
    start = (rank * batches_per_epoch + sum(quotas[:worker])) * batch_size
    return start, quotas[worker] * batch_size


def segments(urls: Sequence[str], sizes: Sequence[int], start: int) -> Iterable[Segment]:
    """Endless shard segments covering positions start, start + 1, ... of the sequence (wrapping at its end).

    :param urls, sizes: the epoch's shard order and each shard's sample count.
    """
    total = sum(sizes)
    if total == 0:
        return
    offsets, acc = [], 0
    for size in sizes:
        offsets.append(acc)
        acc += size
    pos = start % total
    i = next(j for j in range(len(sizes)) if offsets[j] + sizes[j] > pos)
    first = pos - offsets[i]
    while True:
        if sizes[i] > first:
            yield urls[i], first, sizes[i]
        i, first = (i + 1) % len(urls), 0
