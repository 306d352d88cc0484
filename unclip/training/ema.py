"""Exponential moving average of a network's weights (Table 3: decay 0.9999 for every stage).

Built on ``torch.optim.swa_utils.AveragedModel`` with a decay warm-up, so that short runs (and the
first steps of long ones) are not dominated by the random initialisation: decay_n =
min(decay, (1 + n) / (10 + n)) after n updates (the schedule of TensorFlow's EMA with num_updates).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def ema_decay_at(n_updates: int, decay: float, warmup: bool) -> float:
    """Decay used for the update after ``n_updates`` earlier ones."""
    return min(decay, (1 + n_updates) / (10 + n_updates)) if warmup else decay


def make_ema(model: nn.Module, decay: float, warmup: bool) -> AveragedModel:
    """An ``AveragedModel`` holding the EMA of ``model`` (parameters and buffers), frozen.

    :param decay: target decay in [0, 1).
    :param warmup: ramp the decay up from 0.1 as updates accumulate.
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"ema decay must be in [0, 1), got {decay}")

    @torch.no_grad()
    def ema_update(ema_params: list[torch.Tensor] | tuple[torch.Tensor, ...],
                   model_params: list[torch.Tensor] | tuple[torch.Tensor, ...], n_averaged: torch.Tensor | int) -> None:
        weight = 1.0 - ema_decay_at(int(n_averaged), decay, warmup)
        if torch.is_floating_point(ema_params[0]):
            torch._foreach_lerp_(ema_params, model_params, weight)
        else:  # integer buffers (e.g. counters) follow the model
            for ema_p, p in zip(ema_params, model_params, strict=True):
                ema_p.copy_(p)

    ema = AveragedModel(model, multi_avg_fn=ema_update, use_buffers=True)
    ema.requires_grad_(False)
    return ema
