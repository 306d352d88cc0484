"""Stage ``prior``: the diffusion prior p(z_i | y) on frozen-CLIP embeddings (§2.2, Table 3; docs/paper.md).

Batches come from ``ShardDataModule``: with ``data.embeddings`` they carry precomputed embeddings (see
``unclip-embed``), otherwise images and tokens that the frozen CLIP of ``clip_ckpt`` embeds on the fly
(``ClipConditioner``). Embeddings stored with caption token ids only have their per-token encodings recomputed
by that CLIP's text tower on the training device (``clip_ckpt``, else the CLIP the folder's meta.json records).
Training: x₀ = embed_scale · z_i, uniform t, the caption dropped 10% of the time, MSE on the predicted x₀.
Validation SAMPLES with the EMA network and reports, on the whole val set:

* ``val/cos_pred``: cos(sampled z_i, true z_i), the number to beat;
* ``val/cos_text``: cos(z_t, z_i), the baseline of using the text embedding as the image embedding;
* ``val/cos_shuffled``: cos(z_i sampled for another sample's caption, true z_i): how much is caption-specific;
* ``val/mse_ema``: the EMA network's training loss at random t (fixed seed).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from pytorch_lightning.utilities.types import OptimizerLRSchedulerConfig
from torch.optim.swa_utils import AveragedModel

from unclip.config import ConfigError
from unclip.data.embeddings import read_meta
from unclip.diffusion import create_diffusion
from unclip.models.clip_embedder import clip_meta
from unclip.models.prior import PriorTransformer
from unclip.models.prior_sampling import TEXT_KEYS, sample_prior
from unclip.stages import PRIOR_SAMPLING, ClipInfo, PriorInfo, clip_mismatches, clip_requirements
from unclip.training.attention import SDPA_BACKENDS, sdpa_backend
from unclip.training.base import UnclipModule, to_container
from unclip.training.conditioning import ClipConditioner
from unclip.training.ema import make_ema
from unclip.training.fsdp import ForwardOnly, is_fsdp
from unclip.training.optim import build_optimizer, lightning_optimizers, warmup_cosine
from unclip.version import version_info

log = logging.getLogger(__name__)
VAL_SUMS = ("cos_pred", "cos_text", "cos_shuffled", "mse_ema", "num_samples")


def clip_info(clip_ckpt: str | None, embeddings: str | None) -> ClipInfo | None:
    """The CLIP's facts from metadata only (no weights loaded), or None without a source."""
    if embeddings is not None:
        return ClipInfo.from_meta(read_meta(embeddings))
    if clip_ckpt is not None:
        return ClipInfo.from_meta(clip_meta(clip_ckpt))
    return None


def fill_clip_sizes(model: dict, clip: ClipInfo | None, source: str = "the CLIP") -> dict:
    """The model config with null CLIP sizes taken from ``clip``; set ones must fit it (``clip_requirements``).

    :raises ConfigError: naming both values when they disagree, or a size that no source gives.
    """
    model = dict(model)
    for key, ours, _, their_key in clip_requirements(PriorInfo.stage, model):
        theirs = None if clip is None else getattr(clip, their_key)
        if ours is None and theirs is None:
            raise ConfigError(f"{key} is null and there is no CLIP to take it from: set clip_ckpt or "
                              f"data.embeddings (or {key})")
        if ours is None:
            model[key.removeprefix("model.")] = theirs
    for mismatch in clip_mismatches(PriorInfo.stage, model, clip) if clip is not None else []:
        raise ConfigError(mismatch.message("", source))
    return model


class PriorModule(UnclipModule):
    """Trains a :class:`PriorTransformer` on CLIP embeddings with the Gaussian diffusion of ``diffusion``.

    :param model: ``conf/model/prior`` dict (CLIP sizes may be null: taken from the CLIP).
    :param clip_ckpt: the frozen CLIP (embeds on the fly when no embeddings are given).
    :param embeddings: ``data.embeddings``, the ``unclip-embed`` folder (checked against ``clip_ckpt``).
    :param diffusion: ``create_diffusion`` kwargs (1000 cosine steps, mean_type x0, loss mse in §2.2).
    :param cond_drop_prob: probability of replacing the caption by the learned null (0.1, §2.2).
    :param optimizer: optimiser config with ``_partial_: true`` (AdamW, Table 3).
    :param no_decay_keywords: parameter-name fragments kept out of weight decay (besides all <2-d params).
    :param scheduler: ``{"warmup_steps", "total_steps", "min_lr_ratio"}`` for ``warmup_cosine``.
    :param ema: ``{"decay", "warmup"}`` for ``make_ema``.
    :param val_sampling: ``{"sampler", "steps", "guidance_scale", "candidates", "seed"}`` for validation.
    :param sampling: the sampling defaults stored in the checkpoint (``sample_prior`` options; None:
        ``unclip.stages.PRIOR_SAMPLING``).
    :param grad_checkpointing: recompute each transformer block's activations in backward.
    :param compile: ``torch.compile`` the training forward (the EMA and sampling stay eager).
    :param attention: scaled-dot-product-attention kernel: auto | efficient | cudnn | math (flash takes no mask).
    :param run_dir: where ``metrics.json`` goes (None: nowhere).
    """

    stage = "prior"

    def __init__(self, model: Any, clip_ckpt: str | None, embeddings: str | None, diffusion: Any,
                 cond_drop_prob: float, optimizer: Any, no_decay_keywords: Sequence[str], scheduler: Any, ema: Any,
                 val_sampling: Any, grad_checkpointing: bool, compile: bool, attention: str, run_dir: str | None,
                 sampling: Any = None):
        super().__init__()
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ConfigError(f"module.cond_drop_prob must be in [0, 1), got {cond_drop_prob}")
        if attention not in SDPA_BACKENDS or attention == "flash":
            raise ConfigError(f"module.attention must be one of auto, efficient, cudnn, math (flash attention takes "
                              f"no mask; the prior's is causal with caption padding), got {attention!r}")
        on_meta = torch.empty(0).is_meta  # a dry run builds on the meta device and reads no checkpoint
        clip = None if on_meta and clip_ckpt is not None else clip_info(clip_ckpt, embeddings)
        self.clip_source = f"data.embeddings={embeddings}" if embeddings else f"clip_ckpt={clip_ckpt}"
        self.model_config: dict = fill_clip_sizes(to_container(model), clip, self.clip_source)
        self.diffusion_config: dict = to_container(diffusion)
        self.val_sampling: dict = to_container(val_sampling)
        self.sampling_config: dict = dict(to_container(sampling) or PRIOR_SAMPLING)
        self.save_hyperparameters({"model": self.model_config, "clip_ckpt": clip_ckpt, "embeddings": embeddings,
                                   "diffusion": self.diffusion_config, "cond_drop_prob": cond_drop_prob,
                                   "optimizer": to_container(optimizer), "no_decay_keywords": list(no_decay_keywords),
                                   "scheduler": to_container(scheduler), "ema": to_container(ema),
                                   "val_sampling": self.val_sampling, "grad_checkpointing": grad_checkpointing,
                                   "compile": compile, "attention": attention, "run_dir": run_dir,
                                   "sampling": self.sampling_config})
        self.model = PriorTransformer.from_config(self.model_config)
        self.model.set_grad_checkpointing(grad_checkpointing)
        self.use_compile, self.attention = compile, attention
        self._train_net: list[Any] = []  # the compiled forward, kept out of the module tree (state-dict keys unchanged)
        self.diffusion = create_diffusion(**self.diffusion_config)
        self.conditioner = ClipConditioner(clip_ckpt, embeddings, True) if (clip_ckpt or embeddings) else None
        self.cond_drop_prob = cond_drop_prob
        self.run_dir = run_dir
        self.ema: AveragedModel | None = None  # built in configure_model, so a dry run counts the network once
        self._val_sums: dict[str, torch.Tensor] = {}

    # ---- set-up --------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.ema is None:
            self.ema = make_ema(self.model, self.hparams["ema"]["decay"], self.hparams["ema"]["warmup"])
        if self.use_compile and not self._train_net:
            self._train_net.append(torch.compile(self.model))

    def setup(self, stage: str) -> None:
        fill_clip_sizes(self.model_config, self._conditioner().load(), self.clip_source)  # raises on a mismatch

    def _conditioner(self) -> ClipConditioner:
        if self.conditioner is None:  # neither clip_ckpt nor data.embeddings given
            return ClipConditioner(None, None, True)  # raises the ConfigError naming both ways to give them
        return self.conditioner

    def _ema(self) -> AveragedModel:
        if self.ema is None:
            raise RuntimeError("the prior's EMA is built in configure_model(), which Lightning calls before "
                               "training or validation; call it first when using the module directly")
        return self.ema

    def condition(self, batch: dict) -> dict[str, torch.Tensor]:
        """CLIP conditioning of a batch on this module's device (see ``ClipConditioner``)."""
        cond = self._conditioner()(batch)
        return {k: v.to(self.device) for k, v in cond.items()}

    # ---- training ------------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.log_data_stats(batch)
        cond = self.condition(batch)
        x0 = self.model.scale(cond["image_embed"])  # [B, D] (§2.2: × 17.2)
        b = x0.shape[0]
        t = torch.randint(0, self.diffusion.num_timesteps, (b,), device=x0.device)
        extra = {k: cond[k] for k in TEXT_KEYS}
        extra["cond_drop_mask"] = torch.rand(b, device=x0.device) < self.cond_drop_prob  # §2.2: 10% dropped
        model = self._train_net[0] if self._train_net else self.model
        with sdpa_backend(self.attention):
            terms = self.diffusion.training_losses(model, x0, t, extra)
        loss = terms["loss"].mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        quartile = t * 4 // self.diffusion.num_timesteps  # improved-diffusion's per-quartile loss log
        for q in range(4):
            chosen = quartile == q
            if chosen.any():
                self.log(f"train/mse_q{q}", terms["mse"][chosen].mean().detach(), batch_size=int(chosen.sum()))
        return loss

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        with sdpa_backend(self.attention):  # recomputed (checkpointed) blocks use the same attention kernel
            super().backward(loss, *args, **kwargs)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self._ema().update_parameters(self.model)

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        optimizer = build_optimizer(instantiate(self.hparams["optimizer"], _convert_="all"), self.model,
                                    self.hparams["no_decay_keywords"])
        return lightning_optimizers(optimizer, warmup_cosine(optimizer, **self.hparams["scheduler"]))

    # ---- validation ----------------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._val_sums = {k: torch.zeros((), dtype=torch.float64, device=self.device) for k in VAL_SUMS}

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        with sdpa_backend(self.attention):
            self._validation_sums(batch, batch_idx)

    def _validation_sums(self, batch: dict, batch_idx: int) -> None:
        cond = self.condition(batch)
        z_i, z_t = cond["image_embed"], cond["text_embed"]
        b = z_i.shape[0]
        net = self._ema().module
        vs = self.val_sampling
        seed = int(vs["seed"]) + 1000 * batch_idx + self.global_rank
        generator = torch.Generator(self.device).manual_seed(seed)

        # FSDP gathers weights only inside forward(): no cached-prefix shortcut there.
        sampling_net = ForwardOnly(net, ["with_cached_prefix"]) if is_fsdp(net) else net

        def draw(c: dict) -> torch.Tensor:
            return sample_prior(sampling_net, c, self.diffusion, sampler=vs["sampler"], steps=vs["steps"],
                                guidance_scale=vs["guidance_scale"], candidates=vs["candidates"], generator=generator)

        shuffled = {k: torch.roll(cond[k], 1, dims=0) for k in TEXT_KEYS}  # each image gets another's caption
        t = torch.randint(0, self.diffusion.num_timesteps, (b,), device=self.device, generator=generator)
        extra = {k: cond[k] for k in TEXT_KEYS}
        x0 = self.model.scale(z_i)  # the EMA copy has the same (config) embed scale
        mse = self.diffusion.training_losses(net, x0, t, extra, generator=generator)["mse"]
        sums = {"cos_pred": F.cosine_similarity(draw(cond), z_i, dim=-1).sum(),
                "cos_text": F.cosine_similarity(z_t, z_i, dim=-1).sum(),
                "cos_shuffled": F.cosine_similarity(draw(shuffled), z_i, dim=-1).sum(),
                "mse_ema": mse.sum(), "num_samples": torch.tensor(float(b), device=self.device)}
        for key, value in sums.items():
            self._val_sums[key] += value.double()

    def on_validation_epoch_end(self) -> None:
        # Sums reduced over ranks (each rank may hold a different number of val samples, or none).
        sums = {k: self.trainer.strategy.reduce(v, reduce_op="sum") for k, v in self._val_sums.items()}
        n = float(sums.pop("num_samples"))
        if n == 0:
            return
        metrics = {f"val/{k}": float(v) / n for k, v in sums.items()}
        metrics["val/num_samples"] = n
        self.log_dict(metrics, sync_dist=False)  # identical on every rank after the reduction
        if not self.trainer.sanity_checking:
            self.write_metrics(metrics, self.run_dir)

    # ---- checkpoints ---------------------------------------------------------------------------------

    def stage_info(self) -> PriorInfo:
        """This prior's description (``checkpoint["unclip"]``)."""
        return PriorInfo(model=dict(self.model_config), diffusion=dict(self.diffusion_config),
                         sampling=dict(self.sampling_config), provenance=version_info(),
                         clip=self.conditioner.load() if self.conditioner is not None else None)

    def checkpoint_metadata(self) -> dict:
        return self.stage_info().to_meta()
