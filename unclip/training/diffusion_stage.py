"""What every diffusion stage (prior, decoder, upsampler, inpainting decoder) trains with, written once.

:class:`DiffusionStageModule` owns the network ``net`` (built by the stage from its ``model`` config), the diffusion
process ``process``, the EMA copy ``ema`` (built in ``configure_model``, before Lightning restores a checkpoint, so
a dry run on the meta device counts the network once), AdamW over the shared parameter groups with the warm-up +
cosine schedule, the training step with per-timestep-quartile logging (improved-diffusion's log_loss_dict), the
hyperparameters (saved once, here) and the checkpoint's stage description with its sampling defaults. Stages
supply the training inputs (x₀ and the network's conditioning) and their description (``stage_info``).

Checkpoint keys: ``net.*`` (training weights), ``ema.module.*`` and ``ema.n_averaged``; checkpoints of older priors
(``model.*``) are renamed on load (``unclip.stages.upgrade_module_keys``), so they resume.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from hydra.utils import instantiate
from pytorch_lightning.utilities.types import OptimizerLRSchedulerConfig
from torch import nn
from torch.optim.swa_utils import AveragedModel

from unclip.diffusion import create_diffusion
from unclip.stages import StageInfo, upgrade_module_keys
from unclip.training.base import UnclipModule, to_container
from unclip.training.ema import make_ema
from unclip.training.optim import build_optimizer, lightning_optimizers, warmup_cosine
from unclip.version import version_info

QUARTILES = 4


def quartile_sums(terms: dict[str, torch.Tensor], t: torch.Tensor, num_timesteps: int) -> dict[str, torch.Tensor]:
    """Per-example loss terms → their sums per timestep quartile, and the examples per quartile (``"count"``).

    :param terms: name → [N] per-example values.
    :param t: [N] timesteps in [0, num_timesteps).
    :return: name → [4] sums, and ``"count"`` → [4] counts (floats).
    """
    q = (t * QUARTILES // num_timesteps).clamp(max=QUARTILES - 1)
    out = {"count": torch.bincount(q, minlength=QUARTILES).float()}
    for name, value in terms.items():
        out[name] = torch.zeros(QUARTILES, device=t.device).index_add_(0, q, value.detach().float())
    return out


def quartile_metrics(prefix: str, sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """``{prefix}/{name}`` (the mean over all examples) and ``{prefix}/{name}_q{k}`` (over quartile k's examples)
    from :func:`quartile_sums` (summed over batches or ranks); quartiles without examples are left out."""
    counts = sums["count"]
    metrics: dict[str, float] = {}
    for name, value in sums.items():
        if name == "count":
            continue
        metrics[f"{prefix}/{name}"] = float(value.sum() / counts.sum())
        metrics.update({f"{prefix}/{name}_q{k}": float(value[k] / counts[k]) for k in range(QUARTILES) if counts[k]})
    return metrics


class DiffusionStageModule(UnclipModule, abc.ABC):
    """The shared half of a diffusion stage; see the subclasses for the stage-specific arguments.

    :param model: the network config dict (every key a constructor argument of the stage's network).
    :param diffusion: ``create_diffusion`` arguments of the training chain (steps, schedule, mean/var/loss types).
    :param sampling: the stage's sampling defaults, stored in every checkpoint (per-call options override them).
    :param optimizer: AdamW with ``_partial_: true`` (Table 3: lr, betas, eps, weight decay).
    :param no_decay_keywords: parameter-name fragments kept out of weight decay (besides all <2-d params).
    :param scheduler: ``{"warmup_steps", "total_steps", "min_lr_ratio"}`` for ``warmup_cosine``.
    :param ema: ``{"decay", "warmup"}`` for ``make_ema`` (Table 3: 0.9999).
    :param grad_checkpointing: recompute each network block's activations in backward.
    :param compile: ``torch.compile`` the training forward (the EMA and sampling stay eager).
    :param stage_hparams: the stage's other constructor arguments, saved with these as the hyperparameters.
    """

    def __init__(self, model: Any, diffusion: Any, sampling: Any, optimizer: Any, no_decay_keywords: Sequence[str],
                 scheduler: Any, ema: Any, grad_checkpointing: bool, compile: bool, stage_hparams: dict[str, Any]):
        super().__init__()
        self.model_config: dict = dict(to_container(model))
        self.diffusion_config: dict = dict(to_container(diffusion))
        self.sampling_config: dict = dict(to_container(sampling))
        self.optimizer_config, self.scheduler_config = to_container(optimizer), to_container(scheduler)
        self.ema_config: dict = to_container(ema)
        self.no_decay_keywords = list(no_decay_keywords)
        self.save_hyperparameters({"model": self.model_config, "diffusion": self.diffusion_config,
                                   "sampling": self.sampling_config, "optimizer": self.optimizer_config,
                                   "no_decay_keywords": self.no_decay_keywords, "scheduler": self.scheduler_config,
                                   "ema": self.ema_config, "grad_checkpointing": grad_checkpointing,
                                   "compile": compile, **{k: to_container(v) for k, v in stage_hparams.items()}})
        self.process = create_diffusion(**self.diffusion_config)
        self.net = self.build_network()
        self.net.set_grad_checkpointing(grad_checkpointing)  # type: ignore[operator]
        self.use_compile = compile
        self.ema: AveragedModel | None = None  # built in configure_model()
        self._train_net: list[Any] = []  # the compiled forward, kept out of the module tree (state-dict keys unchanged)

    # ---- stage hooks -------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def build_network(self) -> nn.Module:
        """The stage's network from ``self.model_config`` and ``self.diffusion_config``."""

    @abc.abstractmethod
    def training_inputs(self, batch: dict) -> tuple[torch.Tensor, dict[str, Any]]:
        """(x₀ [N, ...], network kwargs, guidance drops included) for a training batch."""

    @abc.abstractmethod
    def stage_info(self) -> StageInfo:
        """This stage's description (``checkpoint["unclip"]``)."""

    def forward_context(self) -> contextlib.AbstractContextManager:
        """Entered around every network forward and backward of training (e.g. an attention-kernel choice)."""
        return contextlib.nullcontext()

    def _info_fields(self) -> dict[str, Any]:
        """The :class:`StageInfo` fields every stage fills alike (its sampling defaults among them)."""
        return {"model": dict(self.model_config), "diffusion": dict(self.diffusion_config),
                "sampling": dict(self.sampling_config), "provenance": version_info()}

    # ---- set-up ------------------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.ema is None:
            self.ema = make_ema(self.net, float(self.ema_config["decay"]), bool(self.ema_config["warmup"]))
        if self.use_compile and not self._train_net:
            self._train_net.append(torch.compile(self.net))

    @property
    def ema_net(self) -> nn.Module:
        """The EMA network (the training network before ``configure_model`` builds the EMA). Under FSDP it is a
        FullyShardedDataParallel unit wrapping the network, which forwards the network's attributes."""
        return self.ema.module if self.ema is not None else self.net

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        optimizer = build_optimizer(instantiate(self.optimizer_config, _convert_="all"), self.net,
                                    self.no_decay_keywords)
        return lightning_optimizers(optimizer, warmup_cosine(optimizer, **self.scheduler_config))

    # ---- training ----------------------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.log_data_stats(batch)
        x0, kwargs = self.training_inputs(batch)
        n = x0.shape[0]
        t_cpu = torch.randint(0, self.process.num_timesteps, (n,))  # quartile counts without a device sync
        t = t_cpu.to(x0.device)
        net = self._train_net[0] if self._train_net else self.net
        with self.forward_context():
            terms = self.process.training_losses(net, x0, t, kwargs)
        loss = terms["loss"].mean()
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=n)
        sums = quartile_sums(terms, t, self.process.num_timesteps)
        counts = quartile_sums({}, t_cpu, self.process.num_timesteps)["count"].long().tolist()
        for name in terms:
            if name != "loss":
                self.log(f"train/{name}", terms[name].detach().mean(), batch_size=n)
            for k in range(QUARTILES):
                if counts[k]:
                    self.log(f"train/{name}_q{k}", sums[name][k] / counts[k], batch_size=counts[k])
        return loss

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        with self.forward_context():  # recomputed (checkpointed) blocks run under the same context
            super().backward(loss, *args, **kwargs)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update_parameters(self.net)

    # ---- checkpoints -------------------------------------------------------------------------------------------

    def checkpoint_metadata(self) -> dict:
        return self.stage_info().to_meta()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning loads checkpoint["state_dict"] after this hook: older priors' "model.*" keys become "net.*".
        if "state_dict" in checkpoint:
            checkpoint["state_dict"] = upgrade_module_keys(checkpoint["state_dict"])
