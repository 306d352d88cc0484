"""Classifier-free guidance as a model wrapper (Ho & Salimans 2022; GLIDE, Nichol et al. 2022 §2.4).

The wrapper sits in front of any sampler: samplers never know about guidance. It runs the conditional and the
unconditional pass in ONE batched forward of 2N examples and returns uncond + s·(cond − uncond) on the predicted
quantity. Because ε, x₀ and v are affine in each other at fixed x_t, guiding any of them gives the same sample,
so the combination is applied to whatever the network predicts.

How the unconditional half is made is the caller's choice:
- ``null_args``: a dict of kwargs replacing ``extra_args`` entries for the uncond half (e.g. a zeroed or learned
  null CLIP embedding, [1 x ...] tensors broadcast to the batch), or a callable ``extra_args -> uncond kwargs``;
- ``drop_key``: the name of a boolean [2N] kwarg the network understands (e.g. ``cond_drop_mask``), False for the
  conditional half and True for the unconditional half, so the network drops its own conditioning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .gaussian import Model

NullArgs = Mapping[str, Any] | Callable[[dict[str, Any]], Mapping[str, Any]]


def _rows(value: Tensor, n: int, key: str, half: str) -> Tensor:
    # One half of a batched kwarg as [n x ...]: a batch-1 tensor is broadcast, any other size must be n.
    if value.ndim == 0 or value.shape[0] not in (1, n):
        raise ValueError(f"guidance kwarg {key!r} ({half} half) has shape {tuple(value.shape)}: its batch dim "
                         f"must be 1 (broadcast) or the batch size {n}")
    return value.expand(n, *value.shape[1:]) if value.shape[0] != n else value


def _batch2(cond: Any, uncond: Any, n: int, key: str) -> Any:
    # Stack the two halves of one kwarg along the batch dim; non-tensors must agree between halves.
    if isinstance(cond, Tensor) or isinstance(uncond, Tensor):
        if not (isinstance(cond, Tensor) and isinstance(uncond, Tensor)):
            raise TypeError(f"guidance kwarg {key!r}: both halves must be tensors")
        cond, uncond = _rows(cond, n, key, "conditional"), _rows(uncond, n, key, "unconditional")
        return torch.cat([cond, uncond.to(device=cond.device, dtype=cond.dtype)])
    if cond is not uncond and cond != uncond:
        raise ValueError(f"guidance kwarg {key!r} is not a tensor, so it cannot differ between the halves")
    return cond


def classifier_free_guidance(
    model: Model,
    scale: float,
    *,
    null_args: NullArgs | None = None,
    drop_key: str | None = None,
    learned_variance: bool = False,
) -> Model:
    """Wrap ``model`` so that it returns the classifier-free-guided output.

    :param model: network called as ``model(x [N x C x ...], t [N], **extra_args)``.
    :param scale: guidance scale s (per stage; the paper's decoder uses 1.25 on COCO). s = 1 returns the
        conditional output exactly and skips the unconditional pass; s = 0 is the unconditional model.
    :param null_args: kwargs (or a function of the conditional kwargs returning them) for the uncond half;
        keys not given are shared with the conditional half. Tensors with batch size 1 are broadcast.
    :param drop_key: alternatively, a boolean kwarg [2N] passed to the network: False = conditional half.
    :param learned_variance: the output has 2C channels (prediction, variance logits) on dim 1; only the
        prediction is guided and the variance comes from the conditional pass (GLIDE).
    :return: callable ``guided(x, t, **extra_args) -> [N x ...]`` with the same output layout as ``model``.
    """
    if (null_args is None) == (drop_key is None):
        raise ValueError("give exactly one of null_args (uncond kwargs) or drop_key (a drop-mask kwarg name)")

    def guided(x: Tensor, t: Tensor, **extra_args: Any) -> Tensor:
        if scale == 1.0:
            if drop_key is not None:
                extra_args = {**extra_args, drop_key: torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)}
            return model(x, t, **extra_args)
        n = x.shape[0]
        if drop_key is not None:
            mask = torch.arange(2 * n, device=x.device) >= n
            kwargs = {k: _batch2(v, v, n, k) for k, v in extra_args.items()}
            kwargs[drop_key] = mask
        else:
            if null_args is None:  # excluded above (exactly one of null_args, drop_key); narrows for mypy
                raise ValueError("classifier_free_guidance needs null_args when drop_key is None")
            uncond = dict(null_args(dict(extra_args)) if callable(null_args) else null_args)
            keys = set(extra_args) | set(uncond)
            missing = [k for k in uncond if k not in extra_args]
            if missing:
                raise KeyError(f"null_args keys {missing} have no conditional value in extra_args")
            kwargs = {k: _batch2(extra_args[k], uncond.get(k, extra_args[k]), n, k) for k in keys}
        out = model(torch.cat([x, x]), torch.cat([t, t]), **kwargs)
        # Combined in (at least) float32: under autocast the halves are bf16, whose 8-bit mantissa loses most of
        # s·(cond − uncond) when the two are close.
        out = out.to(torch.promote_types(out.dtype, torch.float32))
        cond, uncond_out = out[:n], out[n:]
        if learned_variance:
            c_pred, c_var = torch.chunk(cond, 2, dim=1)
            u_pred, _ = torch.chunk(uncond_out, 2, dim=1)
            return torch.cat([u_pred + scale * (c_pred - u_pred), c_var], dim=1)
        return uncond_out + scale * (cond - uncond_out)

    return guided
