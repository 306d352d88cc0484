"""FSDP set-up: wrap policies named in config (conf/trainer/fsdp*.yaml), the unit check and forward-only view
that sampling code needs, and FSDP on CPU processes (sharded checkpoint files: unclip.training.sharded).

See docs/scaling.md for how the presets in conf/trainer use these.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from hydra.utils import get_class

from unclip.config import ConfigError
from unclip.training.sharded import SafeFSDPStrategy


def module_types(names: Sequence[str]) -> set[type]:
    """Classes named by import path, as FSDP ``auto_wrap_policy`` / ``activation_checkpointing_policy`` sets.

    :param names: e.g. ``["unclip.models.prior.Block", "open_clip.transformer.ResidualAttentionBlock"]``.
    :raises ConfigError: naming a path that does not import or is not an ``nn.Module`` subclass.
    """
    types = set()
    for name in names:
        try:
            cls = get_class(name)
        except Exception as exc:  # noqa: BLE001 - hydra raises several kinds for an unimportable path
            raise ConfigError(f"FSDP policy: cannot import {name!r}: {exc}") from exc
        if not issubclass(cls, torch.nn.Module):
            raise ConfigError(f"FSDP policy: {name} is not a torch.nn.Module subclass")
        types.add(cls)
    return types


def is_fsdp(module: Any) -> bool:
    """Whether ``module`` is an FSDP unit (its weights are sharded outside its own ``forward``)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(module, FullyShardedDataParallel)


class ForwardOnly:
    """``module`` without the helper methods named in ``hidden``: FSDP gathers a unit's weights only in its own
    ``forward``, so callers that would take a shortcut through other methods (the prior's cached-prefix sampling)
    see that it is missing and call ``module(...)`` instead. Every other attribute is the module's."""

    def __init__(self, module: torch.nn.Module, hidden: Sequence[str]):
        self._module, self._hidden = module, frozenset(hidden)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name in self._hidden:
            raise AttributeError(name)
        return getattr(self._module, name)


class CPUFSDPStrategy(SafeFSDPStrategy):
    """:class:`SafeFSDPStrategy` (Lightning's FSDPStrategy with atomic sharded saves) on CPU processes over gloo
    (conf/trainer/fsdp_cpu.yaml), for tests without a GPU.

    Torch's FSDP runs on CPUs when told the device (``device_id=cpu``), but Lightning refuses ``FSDPStrategy`` with
    ``accelerator="cpu"`` (an exact type check) and passes no device for CPUs; this subclass wraps the module with
    the same arguments and that device, then lets Lightning finish the set-up (activation checkpointing, ...).
    """

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        kwargs = dict(self.kwargs)
        self.kwargs.pop("auto_wrap_policy", None)  # applied here; Lightning would warn that it is ignored
        wrapped = FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                           mixed_precision=self.mixed_precision_config,
                                           sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                                           **kwargs)
        return super()._setup_model(wrapped)
