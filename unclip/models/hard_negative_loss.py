"""Contrastive CLIP loss with hard-negative captions (NegCLIP, Yuksekgonul et al. 2023, §4).

Each image's caption competes with the batch's other captions *and* with extra captions that do not describe it,
e.g. the caption with one word swapped ("a red square" for a red circle; the data pipeline drops a negative that is
another sample's caption). Image -> text
cross-entropy runs over [captions, negatives]; text -> image stays the plain InfoNCE over images. In-batch
negatives alone rarely differ from the positive in one attribute only, so an attribute the batch seldom needs
(the shape, when colours already tell images apart) never enters the embedding; a swapped caption makes every
example depend on it.

Under DDP the features are gathered as open_clip's ``ClipLoss`` gathers them (``local_loss``, ``gather_with_grad``):
with both set, the mean of the ranks' losses is the single-process loss on the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (the autograd-aware collectives: torch.distributed.nn.all_gather)
import torch.nn.functional as F
from torch import nn


def _gather(x: torch.Tensor, rank: int, world_size: int, with_grad: bool, keep_local_grad: bool) -> torch.Tensor:
    """All ranks' rows in rank order (open_clip's gather_features for one tensor)."""
    if world_size == 1:
        return x
    if with_grad:
        return torch.cat(torch.distributed.nn.all_gather(x), dim=0)
    parts = [torch.zeros_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x)
    if keep_local_grad:
        parts[rank] = x
    return torch.cat(parts, dim=0)


SIGLIP_REFUSAL = ("data.hard_negatives > 0 works with module.loss=clip only (hard negatives extend the softmax "
                  "over captions; SigLIP has none): set data.hard_negatives=0 or module.loss=clip")


def hard_negative_accuracy(image_features: torch.Tensor, text_features: torch.Tensor,
                           negative_features: torch.Tensor, negative_mask: torch.Tensor) -> torch.Tensor:
    """How often an image scores its own caption above each of its own hard negatives (chance: 1/2).

    :param image_features, text_features: [B, D] L2-normalised, row i paired.
    :param negative_features: [B, K, D] L2-normalised hard negatives of each row.
    :param negative_mask: [B, K] bool, False for empty slots.
    :return: [2] int64 on the features' device: (pairs won, pairs counted); no host sync, so the training step
        can log it without waiting for the device.
    """
    positive = (image_features * text_features).sum(-1, keepdim=True)  # [B, 1]
    negative = torch.einsum("bd,bkd->bk", image_features, negative_features)  # [B, K]
    won = (positive > negative) & negative_mask
    return torch.stack([won.sum(), negative_mask.sum()])


class HardNegativeClipLoss(nn.Module):
    """Symmetric InfoNCE whose image -> text side also ranks the caption above hard-negative captions.

    :param local_loss: under DDP each rank scores its own rows against every rank's columns.
    :param gather_with_grad: gathered features keep their gradients (needed for the single-process equality).
    :param rank, world_size: this process's place among the data-parallel ranks.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad
        self.rank, self.world_size = rank, world_size

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                negative_features: torch.Tensor, negative_mask: torch.Tensor,
                logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        """
        :param image_features, text_features: [B, D] L2-normalised, row i paired.
        :param logit_scale: exp of the learned log temperature, [].
        :param negative_features: [B, K, D] L2-normalised hard-negative captions (any content where masked).
        :param negative_mask: [B, K] bool; False slots take no part.
        :return: scalar loss.
        """
        b = image_features.shape[0]
        gather = lambda x: _gather(x, self.rank, self.world_size, self.gather_with_grad,  # noqa: E731
                                   keep_local_grad=not self.local_loss)
        negatives = negative_features.reshape(-1, negative_features.shape[-1])  # [B*K, D]
        all_images, all_texts = gather(image_features), gather(text_features)  # [N, D]
        all_negatives = gather(negatives)  # [N*K, D]
        all_mask = _gather(negative_mask.reshape(-1).to(torch.uint8), self.rank, self.world_size, with_grad=False,
                           keep_local_grad=False).bool()  # [N*K]; no gradient to carry
        local = self.local_loss and self.world_size > 1
        rows_i, rows_t = (image_features, text_features) if local or self.world_size == 1 else (all_images, all_texts)
        columns = torch.cat([all_texts, all_negatives])  # [N + N*K, D]
        logits_i2t = logit_scale * rows_i @ columns.T
        logits_t2i = logit_scale * rows_t @ all_images.T
        if logit_bias is not None:
            logits_i2t, logits_t2i = logits_i2t + logit_bias, logits_t2i + logit_bias
        keep = torch.cat([torch.ones(all_texts.shape[0], dtype=torch.bool, device=all_mask.device), all_mask])
        logits_i2t = logits_i2t.masked_fill(~keep, float("-inf"))
        offset = b * self.rank if local else 0
        labels = torch.arange(rows_i.shape[0], device=image_features.device) + offset
        return (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2
