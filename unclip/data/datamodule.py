"""LightningDataModule over webdataset shards: the one data entry point of every stage."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from unclip.data.decode import SampleDecoder
from unclip.data.embeddings import META_FILE, check_embeddings
from unclip.data.pipeline import IMAGE_DTYPES, ShardDataset, _seed, normalize_images
from unclip.data.shards import expand_shards


def _worker_init(_: int) -> None:
    # Each worker decodes on one core; intra-op threads in workers only oversubscribe the machine.
    torch.set_num_threads(1)


def check_placement(mode: str, world: int, num_workers: int, n_shards: int, batches_per_epoch: int | None,
                    train: bool = True) -> None:
    """Refuse a data layout that would stall DDP, before any worker starts.

    Several ranks must take equal steps: ``epoch`` mode needs ``batches_per_epoch`` (then every reader gets
    an equal run of samples, whatever the shard count); a ``resampled`` stream is endless and needs
    nothing (``trainer.max_steps`` ends the run). One pass over whole shards on one rank only warns when
    some workers get no shard.
    """
    if train and world > 1 and mode == "epoch" and batches_per_epoch is None:
        raise ValueError(f"data.batches_per_epoch must be set for data.mode=epoch on {world} ranks: DDP ranks "
                         f"must take the same number of steps, which one pass over unevenly split shards cannot "
                         f"promise (e.g. data.batches_per_epoch=<samples / (ranks x batch_size)>), or use "
                         f"data.mode=resampled with trainer.max_steps")
    readers = world * max(1, num_workers)
    if mode == "epoch" and batches_per_epoch is None and n_shards < readers:
        warnings.warn(f"{n_shards} shard(s) for {world} rank(s) x {max(1, num_workers)} worker(s): "
                      f"{readers - n_shards} reader(s) will get no shard; write more, smaller shards",
                      stacklevel=3)


class EpochDataLoader(DataLoader):
    """A DataLoader that tells its ShardDataset the epoch before each pass (workers read it from shared memory).

    Stateful for Lightning (``state_dict``/``load_state_dict``, stored in checkpoints): with ``position_fn`` it
    records how many batches of the epoch training has consumed, and the first pass after a restore continues
    from there. Epoch mode replays the epoch's stream and discards the consumed batches (exact resume; they
    are read again, not trained on). Resampled mode starts a fresh stream seeded by (seed, step) instead, cut
    to the epoch's remaining batches when ``batches_per_epoch`` is set.
    """

    dataset: ShardDataset  # narrower than DataLoader's Dataset: __init__ takes only a ShardDataset

    def __init__(self, dataset: ShardDataset, epoch_fn: Callable[[], int],
                 progress_fn: Callable[[], tuple[int, bool, int]] | None = None, **kwargs):
        # Worker seeds from a generator of our own: creating an iterator then leaves the global RNGs (which a
        # resumed run restores) untouched. The data itself is seeded explicitly, so this changes no sample.
        kwargs.setdefault("generator", torch.Generator().manual_seed(_seed(dataset.seed, dataset.rank)))
        super().__init__(dataset, **kwargs)
        self.epoch_fn = epoch_fn
        # () -> (batches trained on in this pass, as Lightning counts them; whether the pass is exhausted; step)
        self.progress_fn = progress_fn
        self._resume: dict | None = None
        self._pass = {"epoch": 0, "offset": 0}

    def __iter__(self):
        resume, self._resume = self._resume, None
        # After a restore Lightning runs this first pass as the checkpoint's epoch, whatever current_epoch says
        # yet (a checkpoint at the end of an epoch resumes at the start of the next).
        epoch = resume["epoch"] if resume is not None else self.epoch_fn()
        self.dataset.set_epoch(epoch)
        # Lightning's count goes on from its restored value, which after a resume at an epoch's end still holds
        # that epoch's batches: count this pass's batches from there.
        counted = self.progress_fn()[0] if self.progress_fn is not None and resume is not None else 0
        self._pass = {"epoch": epoch, "offset": counted - (resume["batches"] if resume is not None else 0)}
        batches = super().__iter__()
        if resume is None or resume["batches"] == 0:
            return batches
        if self.dataset.mode == "epoch":
            for _ in range(resume["batches"]):  # same stream as before the interruption: skip what was trained on
                if next(batches, None) is None:
                    return iter(())
            return batches
        if self.dataset.batches_per_epoch is not None:
            return itertools.islice(batches, max(0, self.dataset.batches_per_epoch - resume["batches"]))
        return batches

    def state_dict(self) -> dict:
        """Where training stands in the data: ``{"epoch", "batches" (of it trained on), "step", "seed"}``."""
        counted, exhausted, step = self.progress_fn() if self.progress_fn is not None else (0, False, 0)
        epoch, batches = self._pass["epoch"], counted - self._pass["offset"]
        if exhausted:  # resumes at the start of the next epoch, as Lightning does
            epoch, batches = epoch + 1, 0
        return {"epoch": int(epoch), "batches": int(batches), "step": int(step), "seed": self.dataset.seed}

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state)
        if self.dataset.mode == "resampled":  # fresh, seed-determined shard draws: not the stream already seen
            self.dataset.seed = _seed(int(state["seed"]), int(state["step"]))


class ShardDataModule(pl.LightningDataModule):
    """Train/val batches of ``{"image", "caption", "key", "json", "tokens"?, "data_stats"}``.

    :param train_shards, val_shards: shard specs (see ``expand_shards``); val may be None.
    :param batch_size: per-rank batch size.
    :param num_workers: data-loader worker processes per rank.
    :param mode: "epoch" (each sample once per epoch over ranks x workers) or "resampled" (infinite).
    :param image_size: square size every image is resized and cropped to.
    :param crop: "center" or "random" for training; validation always crops the centre.
    :param shuffle_buffer: sample shuffle buffer per worker (0: read in shard order).
    :param seed: base seed of shard order, shuffling and crops.
    :param tokenizer: callable list[str] -> LongTensor, e.g. an open_clip tokenizer; None for no tokens.
    :param max_pixels, min_side: image size limits; larger/smaller images are skipped and counted.
    :param pin_memory, persistent_workers, prefetch_factor: passed to the DataLoader.
    :param embeddings: folder written by ``unclip-embed``: batches then carry ``image_embed``,
        ``text_embed``, ``text_tokens`` and ``text_mask`` aligned by key. None: no precomputed embeddings.
    :param decode_images: False reads captions (and embeddings) only, without decoding any image.
    :param batches_per_epoch: training batches per rank per epoch (full batches). In epoch mode each rank x worker
        reads an equal run of the shards' samples, each sample at most once (once when the quota covers the data;
        extra slots re-read and count as ``padded``; see ``unclip.data.partition``). Required for epoch mode on
        several ranks, whose DDP steps must match; None: one pass (epoch) or endless (resampled).
    :param image_dtype: "uint8": workers send raw pixels (4x less to copy between processes) and
        :meth:`on_after_batch_transfer` turns them into float32 in [-1, 1] on the training device; "float32":
        workers send [-1, 1] floats.
    :param hard_negatives: K > 0: batches carry up to K hard-negative captions per sample, tokenized, drawn from
        each sample's json field ``hard_negatives_key`` (NegCLIP-style negatives for the clip stage; train and val).
    :param hard_negatives_key: that json field (a list of captions).
    """

    def __init__(self, train_shards: str | Sequence[str], val_shards: str | Sequence[str] | None,
                 batch_size: int, num_workers: int, mode: str, image_size: int, crop: str,
                 shuffle_buffer: int, seed: int, tokenizer: Callable | None, max_pixels: int | None,
                 min_side: int, pin_memory: bool, persistent_workers: bool, prefetch_factor: int | None,
                 embeddings: str | None, decode_images: bool, batches_per_epoch: int | None,
                 image_dtype: str = "uint8", hard_negatives: int = 0, hard_negatives_key: str = "hard_negatives"):
        super().__init__()
        if hard_negatives < 0:
            raise ValueError(f"data.hard_negatives must be >= 0, got {hard_negatives}")
        if hard_negatives > 0 and tokenizer is None:
            raise ValueError("data.hard_negatives > 0 needs data.tokenizer: only stages that tokenize captions "
                             "(stage=clip) can use hard-negative captions")
        self.hard_negatives, self.hard_negatives_key = hard_negatives, hard_negatives_key
        if image_dtype not in IMAGE_DTYPES:
            raise ValueError(f"data.image_dtype must be one of {IMAGE_DTYPES}, got {image_dtype!r}")
        self.image_dtype = image_dtype
        self.train_urls = expand_shards(train_shards, "data.train_shards")
        self.val_urls = expand_shards(val_shards, "data.val_shards") if val_shards else None
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.mode = mode
        self.image_size = image_size
        self.crop = crop
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.tokenizer = tokenizer
        self.decoder = SampleDecoder(require=("image", "caption") if decode_images else ("caption",),
                                     max_pixels=max_pixels, min_side=min_side, draft_size=image_size,
                                     decode_images=decode_images)
        if embeddings is not None and not (Path(embeddings) / META_FILE).is_file():
            raise ValueError(f"data.embeddings={embeddings!r} holds no {META_FILE}: run unclip-embed first")
        if embeddings is not None:  # every shard has its file, made from this version of it (before any worker)
            check_embeddings(embeddings, self.train_urls + (self.val_urls or []))
        self.embeddings = embeddings
        if batches_per_epoch is not None and batches_per_epoch < 1:
            raise ValueError(f"data.batches_per_epoch must be >= 1 or null, got {batches_per_epoch}")
        self.batches_per_epoch = batches_per_epoch
        self.loader_kwargs = dict(num_workers=num_workers, pin_memory=pin_memory,
                                  persistent_workers=persistent_workers and num_workers > 0,
                                  prefetch_factor=prefetch_factor if num_workers > 0 else None)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and isinstance(batch.get("image"), torch.Tensor):
            batch["image"] = normalize_images(batch["image"])
        return batch

    def _placement(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def _progress(self) -> tuple[int, bool, int]:
        # Read as a checkpoint is written, after the step: batches whose training step ran, whether the loader
        # is exhausted (Lightning prefetches one batch ahead to know), global step.
        if self.trainer is None:
            return 0, False, 0
        progress = self.trainer.fit_loop.epoch_loop.batch_progress
        # Lightning annotates current as _ReadyCompletedTracker but creates a _ProcessedTracker (has processed).
        processed: int = progress.current.processed  # type: ignore[attr-defined]
        return processed, progress.is_last_batch, self.trainer.global_step

    def _dataset(self, urls: list[str], train: bool) -> ShardDataset:
        rank, world = self._placement()
        batches_per_epoch = self.batches_per_epoch if train else None
        mode = self.mode if train else "epoch"
        check_placement(mode, world, self.num_workers, len(urls), batches_per_epoch, train)
        dataset = ShardDataset(urls, batch_size=self.batch_size, image_size=self.image_size,
                               mode=mode, rank=rank, world_size=world,
                               seed=self.seed, shuffle_buffer=self.shuffle_buffer if train else 0,
                               crop=self.crop if train else "center", tokenizer=self.tokenizer,
                               drop_last=False, decoder=self.decoder, embeddings=self.embeddings,
                               batches_per_epoch=batches_per_epoch, image_dtype=self.image_dtype,
                               hard_negatives=self.hard_negatives, hard_negatives_key=self.hard_negatives_key)
        if dataset.shard_sizes is not None:
            total, slots = dataset.slots()
            if slots > total:
                warnings.warn(f"data.batches_per_epoch={batches_per_epoch} x {world} rank(s) x batch "
                              f"{self.batch_size} = {slots} slots for {total} samples: every sample once and "
                              f"{slots - total} re-read per epoch (counted as padded)", stacklevel=2)
        return dataset

    def _loader(self, dataset: ShardDataset, progress_fn: Callable[[], tuple[int, bool, int]] | None = None
                ) -> EpochDataLoader:
        # batch_size=None: the dataset batches in the workers.
        return EpochDataLoader(dataset, self._epoch, progress_fn, batch_size=None, worker_init_fn=_worker_init,
                               **self.loader_kwargs)

    def train_dataloader(self) -> EpochDataLoader:
        return self._loader(self._dataset(self.train_urls, train=True), self._progress)

    def val_dataloader(self) -> EpochDataLoader | list:
        return self._loader(self._dataset(self.val_urls, train=False)) if self.val_urls else []

