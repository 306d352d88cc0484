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

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from unclip.config import ConfigError
from unclip.data.embeddings import read_meta
from unclip.models.clip_embedder import clip_meta
from unclip.models.prior import PriorTransformer
from unclip.models.prior_sampling import TEXT_KEYS, sample_prior
from unclip.stages import ClipInfo, PriorInfo, clip_mismatches, clip_requirements
from unclip.training.attention import SDPA_BACKENDS, sdpa_backend
from unclip.training.base import to_container
from unclip.training.conditioning import ClipConditioner
from unclip.training.diffusion_stage import DiffusionStageModule
from unclip.training.fsdp import ForwardOnly, is_fsdp

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


class PriorModule(DiffusionStageModule):
    """Trains a :class:`PriorTransformer` on CLIP embeddings with the Gaussian diffusion of ``diffusion``.

    :param model: ``conf/model/prior`` dict (CLIP sizes may be null: taken from the CLIP).
    :param clip_ckpt: the frozen CLIP (embeds on the fly when no embeddings are given).
    :param embeddings: ``data.embeddings``, the ``unclip-embed`` folder (checked against ``clip_ckpt``).
    :param cond_drop_prob: probability of replacing the caption by the learned null (0.1, §2.2).
    :param val_sampling: ``{"sampler", "steps", "guidance_scale", "candidates", "seed"}`` for validation.
    :param attention: scaled-dot-product-attention kernel: auto | efficient | cudnn | math (flash takes no mask).
    :param dry_run: the runner's dry run (``dry_run``): the module is built on the meta device and reads no CLIP
        checkpoint (the config's CLIP sizes build the network).
    :param kwargs: the :class:`~unclip.training.diffusion_stage.DiffusionStageModule` arguments (``diffusion``:
        1000 cosine steps, mean_type x0, loss mse in §2.2; ``optimizer``: AdamW, Table 3; ``sampling``: the
        ``sample_prior`` defaults stored in the checkpoint).
    """

    stage = "prior"
    net: PriorTransformer

    def __init__(self, model: Any, clip_ckpt: str | None, embeddings: str | None, diffusion: Any, sampling: Any,
                 cond_drop_prob: float, optimizer: Any, no_decay_keywords: Sequence[str], scheduler: Any, ema: Any,
                 val_sampling: Any, grad_checkpointing: bool, compile: bool, attention: str, dry_run: bool):
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ConfigError(f"module.cond_drop_prob must be in [0, 1), got {cond_drop_prob}")
        if attention not in SDPA_BACKENDS or attention == "flash":
            raise ConfigError(f"module.attention must be one of auto, efficient, cudnn, math (flash attention takes "
                              f"no mask; the prior's is causal with caption padding), got {attention!r}")
        clip = None if dry_run and clip_ckpt is not None else clip_info(clip_ckpt, embeddings)
        clip_source = f"data.embeddings={embeddings}" if embeddings else f"clip_ckpt={clip_ckpt}"
        filled = fill_clip_sizes(to_container(model), clip, clip_source)
        super().__init__(filled, diffusion, sampling, optimizer, no_decay_keywords, scheduler, ema, grad_checkpointing,
                         compile, {"clip_ckpt": clip_ckpt, "embeddings": embeddings, "cond_drop_prob": cond_drop_prob,
                                   "val_sampling": val_sampling, "attention": attention})
        self.clip_source = clip_source
        self.val_sampling: dict = to_container(val_sampling)
        self.attention = attention
        self.conditioner = ClipConditioner(clip_ckpt, embeddings, True) if (clip_ckpt or embeddings) else None
        self.cond_drop_prob = cond_drop_prob
        self._val_sums: dict[str, torch.Tensor] = {}

    def build_network(self) -> PriorTransformer:
        return PriorTransformer.from_config(self.model_config)

    # ---- set-up --------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        fill_clip_sizes(self.model_config, self._conditioner().load(), self.clip_source)  # raises on a mismatch

    def _conditioner(self) -> ClipConditioner:
        if self.conditioner is None:  # neither clip_ckpt nor data.embeddings given
            return ClipConditioner(None, None, True)  # raises the ConfigError naming both ways to give them
        return self.conditioner

    def condition(self, batch: dict) -> dict[str, torch.Tensor]:
        """CLIP conditioning of a batch on this module's device (see ``ClipConditioner``)."""
        cond = self._conditioner()(batch)
        return {k: v.to(self.device) for k, v in cond.items()}

    def forward_context(self) -> contextlib.AbstractContextManager:
        return sdpa_backend(self.attention)

    # ---- training ------------------------------------------------------------------------------------

    def training_inputs(self, batch: dict) -> tuple[torch.Tensor, dict[str, Any]]:
        cond = self.condition(batch)
        x0 = self.net.scale(cond["image_embed"])  # [B, D] (§2.2: × 17.2)
        extra: dict[str, Any] = {k: cond[k] for k in TEXT_KEYS}
        extra["cond_drop_mask"] = torch.rand(x0.shape[0], device=x0.device) < self.cond_drop_prob  # §2.2: 10%
        return x0, extra

    # ---- validation ----------------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._val_sums = {k: torch.zeros((), dtype=torch.float64, device=self.device) for k in VAL_SUMS}

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        with self.forward_context():
            self._validation_sums(batch, batch_idx)

    def _validation_sums(self, batch: dict, batch_idx: int) -> None:
        cond = self.condition(batch)
        z_i, z_t = cond["image_embed"], cond["text_embed"]
        b = z_i.shape[0]
        net = self.ema_net
        vs = self.val_sampling
        seed = int(vs["seed"]) + 1000 * batch_idx + self.global_rank
        generator = torch.Generator(self.device).manual_seed(seed)

        # FSDP gathers weights only inside forward(): no cached-prefix shortcut there.
        sampling_net = ForwardOnly(net, ["with_cached_prefix"]) if is_fsdp(net) else net

        def draw(c: dict) -> torch.Tensor:
            return sample_prior(sampling_net, c, self.process, sampler=vs["sampler"], steps=vs["steps"],
                                guidance_scale=vs["guidance_scale"], candidates=vs["candidates"], generator=generator)

        shuffled = {k: torch.roll(cond[k], 1, dims=0) for k in TEXT_KEYS}  # each image gets another's caption
        t = torch.randint(0, self.process.num_timesteps, (b,), device=self.device, generator=generator)
        extra = {k: cond[k] for k in TEXT_KEYS}
        x0 = self.net.scale(z_i)  # the EMA copy has the same (config) embed scale
        mse = self.process.training_losses(net, x0, t, extra, generator=generator)["mse"]
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
            self.validation_metrics = metrics

    # ---- checkpoints ---------------------------------------------------------------------------------

    def stage_info(self) -> PriorInfo:
        """This prior's description (``checkpoint["unclip"]``)."""
        return PriorInfo(**self._info_fields(), clip=self.conditioner.load() if self.conditioner is not None else None)
