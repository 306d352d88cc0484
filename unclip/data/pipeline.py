"""The webdataset read pipeline shared by every stage.

Two modes:

* ``epoch``: every sample exactly once per epoch over all ranks x workers. Shards are shuffled by
  (seed, epoch) identically on every rank. Without ``batches_per_epoch`` (one pass, one rank) they are
  split by rank, then by data-loader worker (a worker with no shard yields nothing). With it, every
  reader takes an equal run of samples of the shards laid end to end (``unclip.data.partition``): each
  sample at most once, and once when the quota covers the data (extra slots re-read and count as
  ``padded``). Samples are shuffled in a buffer seeded by (seed, epoch, rank, worker).
* ``resampled``: an infinite stream per worker; shards drawn with replacement by webdataset's
  ``ResampledShards`` from a seed of (seed, epoch, rank, worker), for large runs driven by max_steps.

Batching happens in the workers; each batch carries the skip counts accumulated since the worker's
previous batch under ``batch["data_stats"]`` so the trainer can log them (``data/skipped``).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator, Sequence
from itertools import islice

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from unclip.data import partition
from unclip.data.decode import ImageTransform, SampleDecoder, SkipCounter, keep_member
from unclip.data.embeddings import ShardEmbeddingLookup

MODES = ("epoch", "resampled")


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes (unlike hash() of strings)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


IMAGE_DTYPES = ("float32", "uint8")


def _to_unit_range(pixels: np.ndarray) -> np.ndarray:
    # numpy, single-threaded: torch's 2-thread element-wise ops stall ~10x whenever another process
    # (a loader worker, the trainer) holds a core, which is the normal state of a training run.
    image = np.empty(pixels.shape, dtype=np.float32)
    np.copyto(image, pixels)
    np.divide(image, np.float32(127.5), out=image)
    np.subtract(image, np.float32(1.0), out=image)
    return image


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] pixels -> float32 in [-1, 1] on their device (float images pass through)."""
    if images.dtype != torch.uint8:
        return images
    if images.device.type == "cpu":
        return torch.from_numpy(_to_unit_range(images.numpy()))
    return images.float().div_(127.5).sub_(1.0)


def pick_negatives(meta: dict, key: str, k: int, rng: random.Random) -> list[str]:
    """Up to ``k`` distinct hard-negative captions drawn from ``meta[key]`` (a list of strings; missing: none).

    Non-string or empty entries are ignored, so a malformed field costs that sample its negatives, not the run.
    """
    listed = meta.get(key) if isinstance(meta, dict) else None
    if not isinstance(listed, list):
        return []
    pool = [c.strip() for c in listed if isinstance(c, str) and c.strip()]
    return rng.sample(pool, k) if len(pool) > k else pool


def collate(samples: list[dict], tokenizer: Callable | None = None, image_dtype: str = "float32",
            hard_negatives: int = 0, counter: SkipCounter | None = None) -> dict:
    """Stack decoded samples into a batch.

    :param image_dtype: "float32" (in [-1, 1]) or "uint8" (raw pixels, 4x less to copy from a loader worker;
        :func:`normalize_images` converts them where they are used).
    :param hard_negatives: K > 0 tokenizes each sample's ``"negatives"`` (up to K captions, see
        :func:`pick_negatives`) into ``negative_tokens`` [B, K, ctx] with ``negative_mask`` [B, K] (False: no
        caption in that slot); needs a tokenizer. A negative equal to any caption of the batch is dropped (it would
        describe that image); other ranks' captions are not checked.
    :param counter: counts an npy field left out of the batch because its shapes or dtypes differ
        (``repaired["ragged_npy"]``).
    :return: ``{"image": [B, 3, H, W] float32 in [-1, 1] (or uint8), "original_size": [B, 2] (width, height
        before resizing), "caption": list[str], "key": list[str], "json": list[dict],
        "tokens": [B, ctx] int64 (when a tokenizer is given), <npy member name>: [B, ...] (when every sample
        has it with one shape and dtype),
        "negative_tokens", "negative_mask" (with hard_negatives),
        and with precomputed embeddings "image_embed", "text_embed", "text_tokens", "text_mask"}``
    """
    batch: dict = {"key": [s["key"] for s in samples], "caption": [s.get("caption", "") for s in samples],
                   "json": [s.get("json", {}) for s in samples]}
    if "image" in samples[0]:
        pixels = np.stack([s["image"] for s in samples]).transpose(0, 3, 1, 2)  # uint8 NCHW view
        image = np.ascontiguousarray(pixels) if image_dtype == "uint8" else _to_unit_range(pixels)
        batch["image"] = torch.from_numpy(image)
        batch["original_size"] = torch.tensor([s["original_size"] for s in samples])  # [B, 2] (w, h)
    for name in samples[0].get("embeddings", {}):
        batch[name] = torch.from_numpy(np.stack([s["embeddings"][name] for s in samples]))
    for name in samples[0]["npy"]:
        if not all(name in s["npy"] for s in samples):
            continue
        arrays = [s["npy"][name] for s in samples]
        if len({(a.shape, a.dtype) for a in arrays}) > 1:  # ragged over the batch: cannot be stacked
            if counter is not None:
                counter.repaired["ragged_npy"] += 1
            continue
        batch[name.rsplit(".", 1)[0]] = torch.from_numpy(np.stack(arrays))
    if tokenizer is not None:
        batch["tokens"] = tokenizer(batch["caption"])
    if hard_negatives > 0:
        if tokenizer is None:
            raise ValueError("hard-negative captions need a tokenizer (data.tokenizer)")
        # A negative that is some sample's own caption would be a false negative for that image: drop it.
        positives = set(batch["caption"])
        slots = [[c for c in s.get("negatives") or [] if c not in positives][:hard_negatives] for s in samples]
        slots = [n + [""] * (hard_negatives - len(n)) for n in slots]
        tokens = tokenizer([c for n in slots for c in n])  # [B * K, ctx]
        batch["negative_tokens"] = tokens.view(len(samples), hard_negatives, -1)
        batch["negative_mask"] = torch.tensor([[bool(c) for c in n] for n in slots])
    return batch


class ShardDataset(IterableDataset):
    """Image-caption batches from webdataset shards, split over ranks and workers.

    :param urls: expanded shard URLs (see ``unclip.data.shards.expand_shards``).
    :param batch_size: samples per batch (per rank).
    :param image_size: square output size; images are resized on the shorter side and cropped.
    :param mode: "epoch" or "resampled".
    :param rank, world_size: this process's place among the data-parallel ranks.
    :param seed: base seed; the stream is a function of (seed, epoch, rank, worker).
    :param shuffle_buffer: samples held for shuffling; 0 disables sample shuffling (and shard shuffling).
    :param crop: "center" or "random".
    :param tokenizer: callable list[str] -> LongTensor [B, ctx], run in the workers; None for no tokens.
    :param drop_last: drop a final partial batch of a worker.
    :param batches_per_epoch: None: one pass over the data per epoch (epoch mode; endless when resampled).
        An int: exactly this many full batches per rank per epoch, split over the workers; in epoch mode from
        equal runs of the shards' samples (``unclip.data.partition``), when resampled from the endless stream.
    :param decoder: sample decoding options (required members, pixel limits, whether to decode images).
    :param embeddings: folder of precomputed embeddings (``unclip.data.embeddings``); samples whose key
        is not in their shard's file are skipped and counted as ``missing_embedding``.
    :param image_dtype: "float32" images in [-1, 1], or "uint8" pixels (less to copy out of loader workers;
        convert with :func:`normalize_images` where they are used).
    :param hard_negatives: K > 0 draws up to K hard-negative captions per sample from its json field
        ``hard_negatives_key`` (a list of captions that do not describe the image) and tokenizes them into
        ``negative_tokens`` / ``negative_mask`` (see :func:`collate`); drawn anew each pass, seeded.
    :param hard_negatives_key: the json field holding them.
    """

    def __init__(self, urls: Sequence[str], *, batch_size: int, image_size: int, mode: str = "epoch",
                 rank: int = 0, world_size: int = 1, seed: int = 0, shuffle_buffer: int = 1000,
                 crop: str = "center", tokenizer: Callable | None = None, drop_last: bool = False,
                 decoder: SampleDecoder | None = None, embeddings: str | None = None,
                 batches_per_epoch: int | None = None, image_dtype: str = "float32",
                 hard_negatives: int = 0, hard_negatives_key: str = "hard_negatives"):
        super().__init__()
        if hard_negatives < 0:
            raise ValueError(f"data.hard_negatives must be >= 0, got {hard_negatives}")
        if hard_negatives > 0 and tokenizer is None:
            raise ValueError("data.hard_negatives > 0 needs data.tokenizer (the captions are tokenized in workers)")
        self.hard_negatives, self.hard_negatives_key = hard_negatives, hard_negatives_key
        if mode not in MODES:
            raise ValueError(f"data.mode must be one of {MODES}, got {mode!r}")
        if image_dtype not in IMAGE_DTYPES:
            raise ValueError(f"data.image_dtype must be one of {IMAGE_DTYPES}, got {image_dtype!r}")
        self.image_dtype = image_dtype
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.urls = list(urls)
        self.batch_size = batch_size
        self.mode = mode
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.tokenizer = tokenizer
        self.drop_last = drop_last
        self.transform = ImageTransform(image_size, crop)
        self.decoder = decoder or SampleDecoder(draft_size=image_size)
        self.embeddings = embeddings
        self.batches_per_epoch = batches_per_epoch
        # Sample counts per shard, for exactly-once ranges (counted once here, not in every worker).
        self.shard_sizes: list[int] | None = None
        if mode == "epoch" and batches_per_epoch is not None:
            sizes = {u: partition.count_samples(u, keep_member) for u in dict.fromkeys(self.urls)}
            self.shard_sizes = [sizes[u] for u in self.urls]
            if sum(self.shard_sizes) == 0:
                raise ValueError(f"data: the {len(self.urls)} shard(s) hold no readable sample")
        # Shared memory, so persistent workers see the epoch the main process sets.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def epoch_order(self, repeat: int = 0) -> list[int]:
        """Shard indices in the order of the current epoch (and repeat): the same on every rank."""
        order = list(range(len(self.urls)))
        if self.shuffle_buffer > 0:
            random.Random(_seed(self.seed, self.epoch, repeat)).shuffle(order)
        return order

    def shards_for(self, worker: int, num_workers: int, repeat: int = 0) -> list[str]:
        """The shards this (rank, worker) reads in the current epoch (and repeat), in epoch mode."""
        urls = [self.urls[i] for i in self.epoch_order(repeat)]
        return list(islice(islice(urls, self.rank, None, self.world_size), worker, None, num_workers))

    def slots(self) -> tuple[int, int]:
        """(samples in the shards, slots per epoch over all ranks) of exactly-once quota reading."""
        sizes, batches = self._quota_config()
        return sum(sizes), self.world_size * batches * self.batch_size

    def _quota_config(self) -> tuple[list[int], int]:
        """(shard sizes, batches per epoch): both set in epoch mode with a batch quota, the exact-quota reader."""
        if self.shard_sizes is None or self.batches_per_epoch is None:
            raise RuntimeError("exact-quota reading needs mode='epoch' and batches_per_epoch")
        return self.shard_sizes, self.batches_per_epoch

    def _shard_samples(self, url: str, counter: SkipCounter) -> Iterator[dict]:
        return self._attach(iter(wds.DataPipeline(lambda: iter([dict(url=url)]),
                                                  wds.tarfile_to_samples(handler=counter.handler,
                                                                         select_files=counter.selector()))))

    def _attach(self, raws: Iterator[dict]) -> Iterator[dict]:
        """Attach each sample's precomputed embeddings in shard order, before any shuffling: one file load per
        shard, not one per change of shard in the shuffled stream."""
        if not self.embeddings:
            yield from raws
            return
        lookup = ShardEmbeddingLookup(self.embeddings)
        for raw in raws:
            raw["__embeddings__"] = lookup(raw["__url__"], raw["__key__"])
            yield raw

    def _positions(self, start: int, counter: SkipCounter) -> Iterator[dict]:
        """Raw samples at positions start, start + 1, ... of this epoch's shard sequence (endless)."""
        order = self.epoch_order()
        shard_sizes, _ = self._quota_config()
        urls, sizes = [self.urls[i] for i in order], [shard_sizes[i] for i in order]
        for url, first, stop in partition.segments(urls, sizes, start):
            yield from islice(self._shard_samples(url, counter), first, stop)

    def _quota_pass(self, worker: int, num_workers: int, counter: SkipCounter) -> Iterator[dict]:
        """Exactly this reader's quota of full batches from its run of positions (see ``partition``)."""
        total, slots = self.slots()
        _, batches = self._quota_config()
        first, need = partition.reader_window(self.rank, worker, num_workers, batches, self.batch_size)
        base = self.epoch * slots  # the window moves each epoch: a short quota reaches the rest next time
        fresh = max(0, min(need, total - first))  # slots past N re-read samples: padding
        stream = self._positions(base + first, counter)
        own = islice(stream, fresh)
        if self.shuffle_buffer > 0:
            rng = random.Random(_seed(self.seed, self.epoch, self.rank, worker, 2))
            own = wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=rng)(own)
        quota = need // self.batch_size
        if quota == 0:  # more workers than batches per rank: this one has none
            return
        made, since_kept = 0, 0

        def padding() -> Iterator[dict]:
            nonlocal since_kept
            for raw in stream:  # past the reader's range (or past N): counted as padding
                if since_kept > total:
                    raise RuntimeError(f"data: rank {self.rank} worker {worker} read every sample of "
                                       f"{len(self.urls)} shard(s) without one it could use; see the skip counts")
                since_kept += 1
                counter.padded += 1
                yield raw

        for batch in self._batches(itertools.chain(own, padding()), worker, counter, partial=False):
            since_kept = 0
            yield batch
            made += 1
            if made >= quota:
                return

    def _shard_source(self, worker: int, num_workers: int, repeat: int):
        if self.mode == "epoch":
            shards = [dict(url=u) for u in self.shards_for(worker, num_workers, repeat)]
            return lambda: iter(shards)  # DataPipeline would splice a bare list into its stages
        stream_seed = _seed(self.seed, self.epoch, repeat, self.rank, worker)
        return wds.ResampledShards(self.urls, seed=stream_seed, worker_seed=lambda: 0, deterministic=True)

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = self._worker()
        counter = SkipCounter(stop_after_failures=max(16, 2 * len(self.urls)) if self.mode == "resampled" else None)
        if self.shard_sizes is not None:
            yield from self._quota_pass(worker, num_workers, counter)
            return
        if self.batches_per_epoch is None:
            yield from self._one_pass(worker, num_workers, counter, 0, partial=not self.drop_last)
            return
        # A fixed number of full batches per rank: DDP ranks must step in lockstep, so a rank whose
        # shards run out early reads them again (reshuffled) rather than stopping first and hanging the rest.
        quota = self.batches_per_epoch // num_workers + int(worker < self.batches_per_epoch % num_workers)
        made = 0
        for repeat in itertools.count():
            if made >= quota:
                return
            before = made
            for batch in self._one_pass(worker, num_workers, counter, repeat, partial=False):
                yield batch
                made += 1
                if made >= quota:
                    return
            if made == before:
                raise RuntimeError(f"data: rank {self.rank} worker {worker} cannot make any full batch of "
                                   f"{self.batch_size} from its shards {self.shards_for(worker, num_workers)}; "
                                   f"write more shards or lower data.num_workers / data.batch_size")

    def _one_pass(self, worker: int, num_workers: int, counter: SkipCounter, repeat: int,
                  partial: bool) -> Iterator[dict]:
        """Batches from one pass over this worker's shards (one endless pass in resampled mode)."""
        stages = [self._shard_source(worker, num_workers, repeat),
                  wds.tarfile_to_samples(handler=counter.handler, select_files=counter.selector()), self._attach]
        if self.shuffle_buffer > 0:
            shuffle_rng = random.Random(_seed(self.seed, self.epoch, repeat, self.rank, worker, 2))
            stages.append(wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=shuffle_rng))
        yield from self._batches(iter(wds.DataPipeline(*stages)), worker, counter, partial, repeat=repeat)

    def _batches(self, raws: Iterator[dict], worker: int, counter: SkipCounter, partial: bool,
                 repeat: int = 0) -> Iterator[dict]:
        """Decode, check and batch raw samples; a sample that cannot be used is skipped and counted."""
        rng = random.Random(_seed(self.seed, self.epoch, repeat, self.rank, worker, 1))
        batch: list[dict] = []
        for raw in raws:
            counter.failures_in_row = 0
            sample = self.decoder(raw, counter)
            if sample is None:
                continue
            if self.embeddings:
                sample["embeddings"] = raw["__embeddings__"]
                if sample["embeddings"] is None:
                    counter.skip("missing_embedding")  # never paired with another sample's embedding
                    continue
            if "image" in sample:
                sample["image"] = self.transform(sample["image"], rng)
            if self.hard_negatives:
                sample["negatives"] = pick_negatives(sample.get("json", {}), self.hard_negatives_key,
                                                     self.hard_negatives, rng)
            counter.samples += 1
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield self._emit(batch, counter)
                batch = []
        if batch and partial:
            yield self._emit(batch, counter)

    def _emit(self, samples: list[dict], counter: SkipCounter) -> dict:
        out = collate(samples, self.tokenizer, self.image_dtype, self.hard_negatives, counter)
        out["data_stats"] = counter.drain()
        return out
