"""Scale-out helpers: FSDP wrap policies from config, attention-kernel switches, one run_dir per Hydra job,
resuming requeued jobs, and FSDP on CPUs (sharded checkpoints: unclip.training.sharded).

See docs/scaling.md for how the presets in conf/trainer and conf/hydra/launcher use these.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, open_dict

from unclip.config import ConfigError
from unclip.training.callbacks import REQUEUE_CHECKPOINT
from unclip.training.sharded import SafeFSDPStrategy

# F.scaled_dot_product_attention kernels a config may pin (``attention`` module key); "auto" lets torch choose.
SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")
HPC_CKPT = re.compile(r"hpc_ckpt_(\d+)\.ckpt$")


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


@contextlib.contextmanager
def sdpa_backend(name: str) -> Iterator[None]:
    """Restrict ``F.scaled_dot_product_attention`` to one kernel inside the block ("auto": no restriction).

    Flash attention takes no attention mask: the prior (causal + padding mask) needs "efficient" or "cudnn".
    """
    if name not in SDPA_BACKENDS:
        raise ConfigError(f"module.attention must be one of {', '.join(SDPA_BACKENDS)}, got {name!r}")
    if name == "auto":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]
    with sdpa_kernel([backend]):
        yield


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


def use_hydra_job_dir(cfg: DictConfig, hydra_cfg: Any) -> None:
    """Make ``run_dir`` the Hydra job's output dir where the two would otherwise disagree.

    * ``unclip-train -m``: presets fix ``run_dir`` (``runs/demo/prior``) or derive it from the start time, so every
      job of a sweep would write into one folder; each job takes its own ``hydra.sweep.dir/hydra.sweep.subdir``
      instead (unless the sweep is over ``run_dir`` itself).
    * A DDP rank that Lightning starts re-runs the command with ``hydra.run.dir`` set to rank 0's dir; its own
      ``${now:...}`` in ``run_dir`` would name another second, so it takes rank 0's dir too (``resume=true``
      then finds the same ``last.ckpt`` on every rank).

    :param hydra_cfg: ``HydraConfig.get()`` of the running app.
    """
    from hydra.types import RunMode

    if hydra_cfg.mode == RunMode.MULTIRUN:
        if any(o.split("=", 1)[0].lstrip("+~") == "run_dir" for o in hydra_cfg.overrides.task):
            return
    elif not any(o.startswith("hydra.run.dir=") for o in hydra_cfg.overrides.hydra):
        return
    with open_dict(cfg):
        cfg.run_dir = hydra_cfg.runtime.output_dir


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint a requeued job continues from: the newest (by modification time) of
    ``checkpoints/requeue.ckpt`` (saved on SLURM's requeue signal), ``checkpoints/last.ckpt`` and an older
    unclip's ``hpc_ckpt_N.ckpt``; None if there is none (the job's first start)."""
    run_dir = Path(run_dir)
    candidates = [p for p in run_dir.glob("hpc_ckpt_*.ckpt") if HPC_CKPT.fullmatch(p.name)]
    hpc = max(candidates, key=lambda p: int(HPC_CKPT.fullmatch(p.name).group(1)), default=None)  # type: ignore[union-attr]
    found = [p for p in (hpc, run_dir / "checkpoints" / REQUEUE_CHECKPOINT, run_dir / "checkpoints" / "last.ckpt")
             if p is not None and p.exists()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


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
