"""Optimiser and learning-rate schedule builders shared by every stage.

* ``param_groups``: two AdamW groups, decayed (matrices) and undecayed (gains, biases, scalars such as a
  logit scale, and any parameter whose name contains a configured keyword, e.g. embeddings).
* ``warmup_cosine``: linear warm-up from 0, then cosine decay to a floor, as a step-wise ``LambdaLR``.
* ``build_optimizer``: a ``functools.partial`` optimiser (Hydra ``_partial_: true``) applied to those groups.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from pytorch_lightning.utilities.types import OptimizerLRSchedulerConfig
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def is_no_decay(name: str, param: torch.Tensor, no_decay_keywords: Sequence[str]) -> bool:
    """True for parameters that weight decay must not touch.

    Every parameter with fewer than 2 dimensions (LayerNorm gains and biases, linear biases, scalar
    temperatures, class tokens) and every parameter whose name contains one of ``no_decay_keywords``.
    """
    return param.ndim < 2 or any(key in name for key in no_decay_keywords)


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]],
                 no_decay_keywords: Sequence[str]) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed group and a ``weight_decay=0`` group.

    The decayed group has no ``weight_decay`` key, so it takes the optimiser's configured value.

    :param named_params: ``module.named_parameters()``; frozen parameters are skipped.
    :param no_decay_keywords: name fragments that exclude a parameter from weight decay.
    :return: ``[{"params", "names"}, {"params", "names", "weight_decay": 0.0}]`` (empty groups dropped).
    """
    decay: dict[str, Any] = {"params": [], "names": []}
    no_decay: dict[str, Any] = {"params": [], "names": [], "weight_decay": 0.0}
    for name, param in named_params:
        if not param.requires_grad:
            continue
        group = no_decay if is_no_decay(name, param, no_decay_keywords) else decay
        group["params"].append(param)
        group["names"].append(name)
    return [g for g in (decay, no_decay) if g["params"]]


def build_optimizer(optimizer: Callable[..., torch.optim.Optimizer], module: nn.Module,
                    no_decay_keywords: Sequence[str]) -> torch.optim.Optimizer:
    """Apply a partially-applied optimiser (e.g. ``partial(AdamW, lr=3e-4, weight_decay=0.2)``) to
    ``module``'s parameter groups (see ``param_groups``)."""
    return optimizer(param_groups(module.named_parameters(), no_decay_keywords))


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier at optimiser step ``step``.

    Linear from 1/warmup at step 0 to 1 at ``warmup_steps``, then half a cosine down to ``min_lr_ratio``
    at ``total_steps``, constant after that.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float) -> LambdaLR:
    """A ``LambdaLR`` following ``warmup_cosine_factor``; step it once per optimiser step.

    :param warmup_steps: steps of linear warm-up (0: none).
    :param total_steps: step at which the cosine reaches its floor (usually ``trainer.max_steps``).
    :param min_lr_ratio: floor as a fraction of each group's base learning rate.
    """
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"scheduler needs warmup_steps >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"scheduler.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")

    def factor(step: int) -> float:
        return warmup_cosine_factor(step, warmup_steps, total_steps, min_lr_ratio)

    return LambdaLR(optimizer, factor)


def lightning_optimizers(optimizer: torch.optim.Optimizer, scheduler: LambdaLR) -> OptimizerLRSchedulerConfig:
    """The ``configure_optimizers`` return value for a scheduler stepped every optimiser step."""
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
