"""Stage ``clip``: contrastive pre-training of an open_clip model on image-caption shards (App. C, docs/paper.md).

Batches come from ``ShardDataModule`` with ``data.tokenizer`` set: ``{"image": [B, 3, H, W] in [-1, 1],
"tokens": [B, ctx], ...}``. With ``data.hard_negatives`` K > 0 they also carry ``negative_tokens`` [B, K, ctx] and
``negative_mask`` [B, K]: captions that do not describe the image, which the image -> text loss ranks below the
true caption (``unclip.models.hard_negative_loss``). Validation embeds the whole val split, gathers it over ranks
and computes retrieval recall@k and the loss once on the full set (plus ``hard_negative_accuracy`` when val
batches carry negatives); metrics go to the logger and (``MetricsFile`` callback) ``run_dir/metrics.json``.
At the end of training the ``ClipExport`` callback (rank 0) writes ``run_dir/clip_export`` (:meth:`export`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from pytorch_lightning.utilities.types import OptimizerLRSchedulerConfig
from torch.nn.parallel import DistributedDataParallel

from unclip.config import ConfigError
from unclip.models.clip import (
    LossKind,
    build_clip,
    clip_metadata,
    export_open_clip,
    make_loss,
    retrieval_recall,
    to_clip_pixels,
)
from unclip.models.hard_negative_loss import SIGLIP_REFUSAL, HardNegativeClipLoss, hard_negative_accuracy
from unclip.training.attention import SDPA_BACKENDS, sdpa_backend
from unclip.training.base import UnclipModule, to_container
from unclip.training.optim import build_optimizer, lightning_optimizers, warmup_cosine
from unclip.version import version_info

log = logging.getLogger(__name__)


def gather_rows(rows: torch.Tensor, all_gather: Callable[[torch.Tensor], torch.Tensor],
                world_size: int) -> torch.Tensor:
    """Concatenate every rank's rows in rank order, ranks holding different numbers of rows (or none).

    :param rows: [n_local, D] on this rank.
    :param all_gather: gathers a same-shaped tensor from every rank into [world_size, ...]
        (``LightningModule.all_gather``).
    :return: [sum of n over ranks, D], identical on every rank.
    """
    if world_size == 1:
        return rows
    counts = all_gather(torch.tensor([rows.shape[0]], device=rows.device)).view(world_size)
    padded = rows.new_zeros((int(counts.max()), rows.shape[1]))
    padded[: rows.shape[0]] = rows
    gathered = all_gather(padded).view(world_size, -1, rows.shape[1])  # [W, max n, D]
    return torch.cat([gathered[r, : int(counts[r])] for r in range(world_size)])


def set_ddp_buffer_sync(model: Any, enabled: bool | None) -> bool | None:
    """Switch DDP's per-forward buffer broadcast; returns the previous setting (None: not DDP, no-op)."""
    if not isinstance(model, DistributedDataParallel) or enabled is None:
        return None
    previous = bool(model.broadcast_buffers)
    model.broadcast_buffers = enabled
    return previous


class CLIPModule(UnclipModule):
    """Trains ``model`` (a ``conf/model/clip`` dict) with open_clip's contrastive loss.

    :param model: model config (``arch``, ``pretrained``, ``embed_dim``, ``vision``, ``text``, ...).
    :param optimizer: optimiser config with ``_partial_: true`` (e.g. AdamW with lr, betas, eps, weight_decay).
    :param no_decay_keywords: parameter-name fragments kept out of weight decay (besides all <2-d params).
    :param scheduler: ``{"warmup_steps", "total_steps", "min_lr_ratio"}`` for ``warmup_cosine``.
    :param loss: "clip" (InfoNCE) or "siglip".
    :param local_loss, gather_with_grad: open_clip ClipLoss options under DDP.
    :param max_logit_scale: ``exp(logit_scale)`` is clamped to [1, this] after each optimiser step.
    :param grad_checkpointing: recompute transformer activations in backward.
    :param channels_last: channels-last memory format for the image tower and its input (convolutional towers).
    :param compile: ``torch.compile`` the network in place (state-dict keys unchanged).
    :param attention: scaled-dot-product-attention kernel: auto | efficient | cudnn | math (flash takes no mask,
        and the text tower's is causal).
    :param recall_k: the k of the validation recall@k.
    """

    stage = "clip"

    def __init__(self, model: Any, optimizer: Any, no_decay_keywords: Sequence[str], scheduler: Any, loss: str,
                 local_loss: bool, gather_with_grad: bool, max_logit_scale: float, grad_checkpointing: bool,
                 channels_last: bool, compile: bool, attention: str, recall_k: Sequence[int]):
        super().__init__()
        if attention not in SDPA_BACKENDS or attention == "flash":
            raise ConfigError(f"module.attention must be one of auto, efficient, cudnn, math (flash attention takes "
                              f"no mask; the text tower's is causal), got {attention!r}")
        # Plain containers only: the checkpoint must load with torch.load(weights_only=True).
        self.model_config: dict = to_container(model)
        self.save_hyperparameters({"model": self.model_config, "optimizer": to_container(optimizer),
                                   "no_decay_keywords": list(no_decay_keywords), "scheduler": to_container(scheduler),
                                   "loss": loss, "local_loss": local_loss, "gather_with_grad": gather_with_grad,
                                   "max_logit_scale": max_logit_scale, "grad_checkpointing": grad_checkpointing,
                                   "channels_last": channels_last, "compile": compile, "attention": attention,
                                   "recall_k": list(recall_k)})
        self.loss_kind = LossKind.parse(loss)
        if max_logit_scale < 1:
            raise ConfigError(f"module.max_logit_scale must be >= 1, got {max_logit_scale}")
        self.model, self.open_clip_config = build_clip(self.model_config)
        if self.loss_kind is LossKind.SIGLIP and self.model.logit_bias is None:
            raise ConfigError("module.loss=siglip needs a logit bias: set model.init_logit_bias (e.g. -10.0)")
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.channels_last, self.attention = channels_last, attention
        if channels_last:
            self.model.visual.to(memory_format=torch.channels_last)
        if compile:
            self.model.compile()  # in place: parameter names (and so checkpoints) stay the same
        self.register_buffer("image_mean", torch.tensor(self.model_config["image_mean"]), persistent=False)
        self.register_buffer("image_std", torch.tensor(self.model_config["image_std"]), persistent=False)
        self.image_mean: torch.Tensor  # [3] the buffers just registered
        self.image_std: torch.Tensor
        self.recall_k = list(recall_k)
        # Set in setup(), once the rank and world size are known.
        self.loss_fn = make_loss(loss, local_loss, gather_with_grad, rank=0, world_size=1)
        self.full_set_loss = make_loss(loss, False, False, rank=0, world_size=1)
        self.negative_loss_fn = HardNegativeClipLoss(local_loss, gather_with_grad, rank=0, world_size=1)
        self._val_rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._val_negatives = torch.zeros(2, dtype=torch.long)  # (pairs won, pairs counted) over hard negatives
        self._ddp_buffer_sync: bool | None = None

    # ---- network -------------------------------------------------------------------------------------

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Embed a batch.

        :param images: [B, 3, H, W] in [-1, 1].
        :param tokens: [B, ctx] token ids.
        :return: ``(image_features [B, D], text_features [B, D], logit_scale.exp() [], logit_bias [])``
            with L2-normalised features; the bias only for models that have one.
        """
        pixels = to_clip_pixels(images, self.image_mean, self.image_std)
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        with sdpa_backend(self.attention):
            return self.model(pixels, tokens)

    def embed_with_negatives(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                         torch.Tensor, torch.Tensor]:
        """One forward over the images, their captions and their (non-empty) hard-negative captions.

        :return: ``(image_features [B, D], text_features [B, D], logit_scale, logit_bias, negative_features
            [B, K, D] (zeros in empty slots), negative_mask [B, K])``.
        """
        tokens, negatives, mask = batch["tokens"], batch["negative_tokens"], batch["negative_mask"].bool()
        b, k = mask.shape
        present = mask.reshape(-1)
        outputs = self(batch["image"], torch.cat([tokens, negatives.reshape(b * k, -1)[present]]))
        image_features, all_text = outputs[0], outputs[1]
        negative_features = all_text.new_zeros(b * k, all_text.shape[1])
        negative_features[present] = all_text[b:]
        bias = outputs[3] if len(outputs) > 3 else None
        return image_features, all_text[:b], outputs[2], bias, negative_features.view(b, k, -1), mask

    def setup(self, stage: str) -> None:
        hp = self.hparams
        self.loss_fn = make_loss(hp["loss"], hp["local_loss"], hp["gather_with_grad"],
                                 rank=self.trainer.global_rank, world_size=self.trainer.world_size)
        self.negative_loss_fn = HardNegativeClipLoss(hp["local_loss"], hp["gather_with_grad"],
                                                     rank=self.trainer.global_rank, world_size=self.trainer.world_size)

    # ---- training ------------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.log_data_stats(batch)
        if "tokens" not in batch:
            raise ConfigError("clip stage batches need 'tokens': set data.tokenizer (conf/stage/clip.yaml does)")
        size = batch["image"].shape[0]
        if "negative_tokens" in batch:
            if self.loss_kind is LossKind.SIGLIP:  # preflight refuses this config; direct use lands here
                raise ConfigError(SIGLIP_REFUSAL)
            image_f, text_f, scale, bias, negative_f, mask = outputs = self.embed_with_negatives(batch)
            loss = self.negative_loss_fn(image_f, text_f, scale, negative_f, mask, bias)
            won, counted = hard_negative_accuracy(image_f.detach(), text_f.detach(), negative_f.detach(), mask)
            # A batch without any negative logs 0 (clamp: no host sync to test for it).
            self.log("train/hard_negative_accuracy", won / counted.clamp(min=1), batch_size=size)
        else:
            outputs = self(batch["image"], batch["tokens"])
            loss = self.loss_fn(*outputs)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/logit_scale", outputs[2].detach(), batch_size=size)
        return loss

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        with sdpa_backend(self.attention):  # recomputed (checkpointed) blocks use the same attention kernel
            super().backward(loss, *args, **kwargs)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # As open_clip's trainer: temperature in [1, max_logit_scale] after every step, so it cannot blow up.
        with torch.no_grad():
            self.model.logit_scale.clamp_(0.0, math.log(self.hparams["max_logit_scale"]))

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        optimizer = build_optimizer(instantiate(self.hparams["optimizer"], _convert_="all"), self.model,
                                    self.hparams["no_decay_keywords"])
        return lightning_optimizers(optimizer, warmup_cosine(optimizer, **self.hparams["scheduler"]))

    # ---- validation ----------------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._val_rows = []
        self._val_negatives = torch.zeros(2, dtype=torch.long, device=self.device)
        # Ranks can hold different numbers of val batches (shards split unevenly, or none on a rank). DDP
        # broadcasts buffers before every forward, a collective that would then deadlock; nothing updates
        # buffers in eval mode, so validation switches it off until on_validation_epoch_end.
        self._ddp_buffer_sync = set_ddp_buffer_sync(self.trainer.strategy.model, False)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if "negative_tokens" in batch:
            image_features, text_features, _, _, negative_features, mask = self.embed_with_negatives(batch)
            self._val_negatives = self._val_negatives + hard_negative_accuracy(image_features, text_features,
                                                                               negative_features, mask)
        else:
            image_features, text_features = self(batch["image"], batch["tokens"])[:2]
        self._val_rows.append((image_features.float(), text_features.float()))

    def _all_gather_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """``all_gather`` of one tensor: [world_size, *shape] (Lightning types the result as any collection)."""
        gathered = self.all_gather(tensor)
        if not isinstance(gathered, torch.Tensor):
            raise TypeError(f"all_gather of a tensor returned {type(gathered).__name__}")
        return gathered

    def on_validation_epoch_end(self) -> None:
        if self._val_rows:
            images, texts = (torch.cat(parts) for parts in zip(*self._val_rows, strict=True))
        else:  # a rank without val shards still takes part in the gather
            images = texts = torch.zeros(0, self.open_clip_config["embed_dim"], device=self.device)
        self._val_rows = []
        set_ddp_buffer_sync(self.trainer.strategy.model, self._ddp_buffer_sync)
        negatives = self._val_negatives.to(self.device)
        if self.trainer.world_size > 1:  # every rank joins, with or without val batches
            negatives = self._all_gather_tensor(negatives).view(-1, 2).sum(0)
        images = gather_rows(images, self._all_gather_tensor, self.trainer.world_size)  # [N, D]
        texts = gather_rows(texts, self._all_gather_tensor, self.trainer.world_size)
        if images.shape[0] == 0:
            return
        metrics = {f"val/{k}": v for k, v in retrieval_recall(images, texts, self.recall_k).items()}
        with torch.no_grad():
            scale = self.model.logit_scale.exp().float()
            bias = None if self.model.logit_bias is None else self.model.logit_bias.float()
            # One loss over the whole val set as a single batch, independent of batching and world size.
            metrics["val/loss"] = float(self.full_set_loss(images, texts, scale, bias))
        metrics["val/num_samples"] = images.shape[0]
        if int(negatives[1]) > 0:  # pairwise: own caption vs each of its hard negatives (chance 0.5)
            metrics["val/hard_negative_accuracy"] = float(negatives[0]) / float(negatives[1])
        # Every rank holds the same gathered values: the sync averages identical numbers (and keeps all
        # ranks' logged metrics present for callbacks that monitor them).
        self.log_dict({k: float(v) for k, v in metrics.items()}, sync_dist=True)
        if not self.trainer.sanity_checking:
            self.validation_metrics = metrics  # written by the MetricsFile callback

    # ---- checkpoints and export ----------------------------------------------------------------------

    def checkpoint_metadata(self) -> dict:
        return clip_metadata(self.model, self.model_config, self.open_clip_config)

    def export(self, directory: str | Path) -> Path:
        """Write the network as an open_clip-loadable export (config JSON + safetensors) to ``directory``."""
        meta = {**self.checkpoint_metadata(), **version_info(), "global_step": int(self.global_step)}
        return export_open_clip(self.model, meta, directory)
