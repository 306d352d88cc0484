"""Stages ``decoder`` and ``upsampler``: diffusion training of the unCLIP decoder cascade (Ramesh et al. §2.1).

:class:`DiffusionImageModule` holds what both stages share: the network built from ``model`` (a
``conf/model/{decoder,upsampler}`` dict), the diffusion process, an EMA copy of the weights, AdamW with the shared
parameter groups and warm-up + cosine schedule, per-timestep-quartile losses (improved-diffusion's log_loss_dict),
and periodic sample grids from a fixed set of validation examples written to ``run_dir/samples/`` (PNG).

* :class:`DecoderModule`: x₀ = the image; conditioning = the CLIP image embedding (and caption token encodings)
  from ``ClipConditioner``, with the guidance drops of the network's config.
* :class:`UpsamplerModule`: x₀ = a random crop of the image (``crop_fraction`` of the target size); conditioning =
  the image downsampled to ``input_size``, corrupted (``degradation``), optionally noise-augmented, upsampled back.

The EMA copy (``ema.module``) is what validation, the sample grids and ``load_decoder``/``load_upsampler`` use. It is
created in ``setup`` (before Lightning restores a checkpoint), so a dry run on the meta device counts the network
once.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from hydra.utils import instantiate
from pytorch_lightning.utilities.types import OptimizerLRSchedulerConfig
from torch.optim.swa_utils import AveragedModel
from torchvision.utils import make_grid, save_image

from unclip.config import ConfigError
from unclip.diffusion import create_diffusion
from unclip.evaluation.metrics import psnr
from unclip.models.decoder_sampling import sample_decoder, sample_upsampler
from unclip.models.degradations import downsample, noise_augment, paired_random_crop, upsample
from unclip.models.unet import DecoderUNet, SuperResUNet, UNet, build_unet
from unclip.stages import DecoderInfo, StageInfo, UpsamplerInfo, clip_mismatches, input_size_mismatch, out_channels_for
from unclip.training.base import UnclipModule, to_container
from unclip.training.conditioning import ClipConditioner
from unclip.training.ema import make_ema
from unclip.training.optim import build_optimizer, lightning_optimizers, warmup_cosine
from unclip.training.preflight import previous_output_size
from unclip.version import version_info

log = logging.getLogger(__name__)
QUARTILES = 4


_Net = TypeVar("_Net", bound=UNet)


class DiffusionImageModule(UnclipModule, abc.ABC):
    """Shared by both stages; see the subclasses for the stage-specific arguments.

    :param model: the network config dict (every key a constructor argument of the stage's network).
    :param diffusion: ``create_diffusion`` arguments of the training chain (steps, schedule, mean/var/loss types).
    :param sampling: sampler options of the stage (``sample_decoder`` / ``sample_upsampler``).
    :param optimizer: AdamW with ``_partial_: true`` (Table 3: lr, betas, eps, weight decay).
    :param no_decay_keywords: parameter-name fragments kept out of weight decay (besides all <2-d params).
    :param scheduler: ``{"warmup_steps", "total_steps", "min_lr_ratio"}`` for ``warmup_cosine``.
    :param ema: ``{"decay", "warmup"}`` for ``make_ema`` (Table 3: 0.9999).
    :param grad_checkpointing: recompute each UNet block's activations in backward.
    :param channels_last: keep the network (and its inputs) in channels-last memory format.
    :param compile: ``torch.compile`` the training forward.
    :param val_samples: ``{"num", "every", "seed"}``: grid of ``num`` fixed val examples every ``every``
        validations, sampled from a generator seeded with ``seed``.
    :param run_dir: where ``samples/`` and ``metrics.json`` go (None: nowhere).
    """

    network_cls: type[UNet] = UNet
    _rows = 2  # rows of a sample grid (see sample_fixed)

    def __init__(self, model: Any, diffusion: Any, sampling: Any, optimizer: Any, no_decay_keywords: Sequence[str],
                 scheduler: Any, ema: Any, grad_checkpointing: bool, channels_last: bool, compile: bool,
                 val_samples: Any, run_dir: str | None):
        super().__init__()
        self.model_config: dict = to_container(model)
        self.diffusion_config: dict = to_container(diffusion)
        self.sampling_config: dict = to_container(sampling)
        self.process = create_diffusion(**self.diffusion_config)
        out_channels = out_channels_for(self.diffusion_config, self.model_config["in_channels"])
        try:
            self.net = build_unet(self.network_cls, self.model_config, out_channels)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        self.net.set_grad_checkpointing(grad_checkpointing)
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.ema_config, self.use_compile, self.run_dir = to_container(ema), compile, run_dir
        self.val_samples = to_container(val_samples)
        self.optimizer_config, self.scheduler_config = to_container(optimizer), to_container(scheduler)
        self.no_decay_keywords = list(no_decay_keywords)
        self.ema: AveragedModel | None = None  # created in setup()
        self._train_net: list[Any] = []  # the compiled forward, kept out of the module tree
        self._val_sums: dict[str, torch.Tensor] = {}
        self._fixed: dict[str, Any] | None = None
        self._validations = 0

    # ---- stage hooks -------------------------------------------------------------------------------------

    @abc.abstractmethod
    def training_inputs(self, batch: dict) -> tuple[torch.Tensor, dict[str, Any]]:
        """(x₀ [N, 3, S, S], network kwargs) for a training batch."""
        ...

    @abc.abstractmethod
    def validation_inputs(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
        """(x₀, network kwargs) for a validation batch, without guidance drops, random crops or random order."""
        ...

    @abc.abstractmethod
    def keep_fixed(self, batch: dict, n: int) -> dict[str, Any]:
        """The first n examples of the first val batch, kept for every sample grid."""
        ...

    @abc.abstractmethod
    def sample_fixed(self, fixed: dict[str, Any], generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """(grid rows [R·n, 3, S, S] in [-1, 1], metrics) sampled from the EMA network."""
        ...

    @abc.abstractmethod
    def stage_info(self) -> StageInfo:
        """This stage's description (``checkpoint["unclip"]``)."""
        ...

    def _info_fields(self) -> dict[str, Any]:
        return {"model": dict(self.model_config), "diffusion": dict(self.diffusion_config),
                "sampling": dict(self.sampling_config), "provenance": version_info()}

    # ---- set-up ------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if self.ema is None:
            self.ema = make_ema(self.net, float(self.ema_config["decay"]), bool(self.ema_config["warmup"]))
        if self.use_compile and not self._train_net:
            self._train_net.append(torch.compile(self.net))

    @property
    def ema_net(self) -> UNet:
        """The EMA network (the training network before setup() builds the EMA).

        A cast, not an isinstance check: under FSDP (conf/trainer/fsdp.yaml) the network is a
        FullyShardedDataParallel unit wrapping the UNet, which forwards the UNet's attributes.
        """
        return cast(UNet, self.ema.module if self.ema is not None else self.net)

    def _ema_net_as(self, cls: type[_Net]) -> _Net:
        """:attr:`ema_net` typed as the stage's network class ``cls`` (a cast, as there)."""
        return cast(_Net, self.ema_net)

    def checkpoint_metadata(self) -> dict:
        return self.stage_info().to_meta()

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        optimizer = build_optimizer(instantiate(self.optimizer_config, _convert_="all"), self.net,
                                    self.no_decay_keywords)
        return lightning_optimizers(optimizer, warmup_cosine(optimizer, **self.scheduler_config))

    # ---- training ----------------------------------------------------------------------------------------

    def _quartile_terms(self, terms: dict[str, torch.Tensor], t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-example terms → sums [Q] and counts [Q] per timestep quartile (improved-diffusion log_loss_dict)."""
        q = (t * QUARTILES // self.process.num_timesteps).clamp(max=QUARTILES - 1)
        out = {"count": torch.bincount(q, minlength=QUARTILES).float()}
        for name, value in terms.items():
            out[name] = torch.zeros(QUARTILES, device=t.device).index_add_(0, q, value.detach().float())
        return out

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.log_data_stats(batch)
        x0, kwargs = self.training_inputs(batch)
        n = x0.shape[0]
        t_cpu = torch.randint(0, self.process.num_timesteps, (n,))  # quartile counts without a device sync
        t = t_cpu.to(x0.device)
        model = self._train_net[0] if self._train_net else self.net
        terms = self.process.training_losses(model, x0, t, kwargs)
        loss = terms["loss"].mean()
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=n)
        sums = self._quartile_terms(terms, t)
        counts = torch.bincount((t_cpu * QUARTILES // self.process.num_timesteps), minlength=QUARTILES).tolist()
        for name in terms:
            if name != "loss":
                self.log(f"train/{name}", terms[name].detach().mean(), batch_size=n)
            for k in range(QUARTILES):
                if counts[k]:
                    self.log(f"train/{name}_q{k}", sums[name][k] / counts[k], batch_size=counts[k])
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update_parameters(self.net)

    # ---- validation --------------------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._val_sums = {}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # Same timesteps and noise at every validation (seeded by batch index), so curves compare across steps.
        generator = torch.Generator(device=self.device).manual_seed(10_000 + batch_idx)
        x0, kwargs = self.validation_inputs(batch, generator)
        t = torch.randint(0, self.process.num_timesteps, (x0.shape[0],), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        terms = self.process.training_losses(self.ema_net, x0, t, kwargs, noise=noise)
        for name, value in self._quartile_terms(terms, t).items():
            self._val_sums[name] = self._val_sums.get(name, 0) + value
        if self._fixed is None and batch_idx == 0:
            self._fixed = self.keep_fixed(batch, int(self.val_samples["num"]))

    def _val_names(self) -> list[str]:
        """The validation sums' names over all ranks: a rank that got no val batch must still join every reduce."""
        names = set(self._val_sums)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            everyone: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(everyone, sorted(names))
            names = set().union(*everyone)
        return sorted(names)

    def on_validation_epoch_end(self) -> None:
        names = self._val_names()
        if not names:
            return
        zeros = torch.zeros(QUARTILES, device=self.device)
        sums = {k: self.trainer.strategy.reduce(self._val_sums.get(k, zeros), reduce_op="sum") for k in names}
        counts = sums.pop("count")
        if not counts.sum():
            return
        metrics = {"val/num_samples": float(counts.sum())}
        for name, value in sums.items():
            metrics[f"val/{name}"] = float(value.sum() / counts.sum())
            metrics.update({f"val/{name}_q{k}": float(value[k] / counts[k]) for k in range(QUARTILES) if counts[k]})
        if not self.trainer.sanity_checking:
            self._validations += 1
            due = (self._validations - 1) % int(self.val_samples["every"]) == 0
            if self._fixed is not None and due and self.trainer.is_global_zero:  # no collectives inside
                metrics.update(self._write_grid())
        self.log_dict(metrics, sync_dist=False)
        if not self.trainer.sanity_checking:
            self.write_metrics(metrics, self.run_dir)

    def _write_grid(self) -> dict:
        assert self._fixed is not None
        generator = torch.Generator(device=self.device).manual_seed(int(self.val_samples["seed"]))
        was_training = self.ema_net.training
        self.ema_net.eval()
        rows, metrics = self.sample_fixed(self._fixed, generator)
        self.ema_net.train(was_training)
        if self.run_dir is None:
            return metrics
        grid = make_grid((rows.float().cpu() + 1) / 2, nrow=rows.shape[0] // self._rows, padding=1)
        path = Path(self.run_dir) / "samples" / f"step{self.global_step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        if self._fixed.get("caption"):
            path.with_suffix(".txt").write_text("\n".join(self._fixed["caption"]) + "\n")
        for logger in self.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="val/samples", images=[grid], step=self.global_step)
        log.info("sample grid written to %s", path)
        return metrics


class DecoderModule(DiffusionImageModule):
    """Stage ``decoder``: the base decoder p(x | z_i, y) (unCLIP §2.1).

    :param clip_ckpt: the CLIP to embed with on the fly (None with precomputed ``embeddings``).
    :param embeddings: ``data.embeddings``, precomputed by ``unclip-embed`` (None: embed on the fly).
    :param kwargs: the :class:`DiffusionImageModule` arguments.
    """

    stage = "decoder"
    network_cls = DecoderUNet
    net: DecoderUNet

    def __init__(self, model: Any, diffusion: Any, sampling: Any, optimizer: Any, no_decay_keywords: Sequence[str],
                 scheduler: Any, ema: Any, grad_checkpointing: bool, channels_last: bool, compile: bool,
                 val_samples: Any, run_dir: str | None, clip_ckpt: str | None, embeddings: str | None):
        super().__init__(model, diffusion, sampling, optimizer, no_decay_keywords, scheduler, ema, grad_checkpointing,
                         channels_last, compile, val_samples, run_dir)
        self.clip_ckpt, self.embeddings = clip_ckpt, embeddings
        self.uses_text = self.model_config["text"] is not None
        self.cond: ClipConditioner | None = None  # created in setup(): a dry run needs no CLIP

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.cond is None:
            self.cond = ClipConditioner(self.clip_ckpt, self.embeddings, need_text_tokens=self.uses_text)
        source = f"data.embeddings={self.embeddings}" if self.embeddings else f"clip_ckpt={self.clip_ckpt}"
        for mismatch in clip_mismatches(DecoderInfo.stage, self.model_config, self.cond.load()):
            raise ConfigError(mismatch.message("", source))

    def _conditioning(self, batch: dict) -> dict[str, torch.Tensor]:
        assert self.cond is not None, "setup() builds the conditioner"
        cond = self.cond(batch)
        kwargs = {"image_embed": cond["image_embed"]}
        if self.uses_text:
            kwargs.update(text_tokens=cond["text_tokens"], text_mask=cond["text_mask"])
        return kwargs

    def _target(self, image: torch.Tensor) -> torch.Tensor:
        """The decoder's x₀: the batch image, downsampled when the data is loaded larger (at the CLIP's input size,
        as the paper embeds 256px images for a 64px decoder)."""
        size = self.net.image_size
        if image.shape[-1] < size:
            raise ConfigError(f"batch images are {image.shape[-1]}px, smaller than model.image_size={size}")
        return downsample(image, size) if image.shape[-1] > size else image

    def training_inputs(self, batch: dict) -> tuple[torch.Tensor, dict[str, Any]]:
        x0 = self._target(batch["image"])
        return x0, {**self._conditioning(batch), **self.net.drop_masks(x0.shape[0], x0.device)}

    def validation_inputs(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
        return self._target(batch["image"]), self._conditioning(batch)

    def keep_fixed(self, batch: dict, n: int) -> dict[str, Any]:
        kwargs = self._conditioning(batch)
        return {"image": self._target(batch["image"][:n]), "caption": list(batch["caption"][:n]),
                **{k: v[:n] for k, v in kwargs.items()}}

    def sample_fixed(self, fixed: dict[str, Any], generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        samples = sample_decoder(self._ema_net_as(DecoderUNet), self.stage_info(), fixed["image_embed"],
                                 fixed.get("text_tokens"), fixed.get("text_mask"), generator=generator)
        return torch.cat([fixed["image"], samples.to(fixed["image"].dtype)]), {}  # rows: targets, samples

    def stage_info(self) -> DecoderInfo:
        return DecoderInfo(**self._info_fields(), clip=self.cond.load() if self.cond is not None else None)


class UpsamplerModule(DiffusionImageModule):
    """Stage ``upsampler``: one super-resolution step of the cascade (unCLIP §2.1, ADM SuperResModel).

    :param input_size: side of the low-res conditioning image (the previous stage's output size).
    :param crop_fraction: training crops are this fraction of the target size (Table 3: 0.25; 1 = no crop).
    :param degradation: a ``_target_`` config of the conditioning-image corruption (``conf/degradation``:
        ``GaussianBlur``, ``BSRDegradation``), or None / empty for none.
    :param noise_aug_max_level: training noise-augmentation levels s ~ U[0, this] (needs ``model.noise_aug``).
    :param decoder_ckpt, upsampler_ckpts: the chain so far; the last of them must output ``input_size`` images.
    :param kwargs: the :class:`DiffusionImageModule` arguments.
    """

    stage = "upsampler"
    network_cls = SuperResUNet
    net: SuperResUNet
    _rows = 3

    def __init__(self, model: Any, diffusion: Any, sampling: Any, optimizer: Any, no_decay_keywords: Sequence[str],
                 scheduler: Any, ema: Any, grad_checkpointing: bool, channels_last: bool, compile: bool,
                 val_samples: Any, run_dir: str | None, input_size: int, crop_fraction: float,
                 degradation: Any, noise_aug_max_level: float, decoder_ckpt: str | None,
                 upsampler_ckpts: Sequence[str] | None):
        super().__init__(model, diffusion, sampling, optimizer, no_decay_keywords, scheduler, ema, grad_checkpointing,
                         channels_last, compile, val_samples, run_dir)
        size = int(self.model_config["image_size"])
        if not 0 < input_size < size:
            raise ConfigError(f"module.input_size={input_size} must be smaller than model.image_size={size}")
        self.input_size, self.crop_size = int(input_size), round(crop_fraction * size)
        if not 0 < crop_fraction <= 1 or self.crop_size % self.net.size_multiple:
            raise ConfigError(f"module.crop_fraction={crop_fraction} gives {self.crop_size}px crops of "
                              f"{size}px images; it must be in (0, 1] with crops divisible by {self.net.size_multiple}")
        if noise_aug_max_level > 0 and not self.model_config["noise_aug"]:
            raise ConfigError(f"module.noise_aug_max_level={noise_aug_max_level} needs model.noise_aug=true")
        self.noise_aug_max_level = float(noise_aug_max_level)
        self.degradation_config = to_container(degradation) or None  # conf/degradation/none.yaml is empty
        self.degradation = instantiate(degradation) if self.degradation_config else None
        previous = previous_output_size(decoder_ckpt, upsampler_ckpts)
        mismatch = input_size_mismatch(self.input_size, None if previous is None else previous[2])
        if previous is not None and mismatch is not None:
            raise ConfigError(mismatch.message("", f"{previous[0]}={previous[1]}"))

    def _low_res(self, image: torch.Tensor, generator: torch.Generator | None,
                 level: torch.Tensor | None) -> torch.Tensor:
        low = downsample(image, self.input_size)  # [N, 3, s, s]
        if self.degradation is not None:
            low = self.degradation(low, generator)
        if level is not None:
            low = noise_augment(low, level, generator)
        return low

    def _levels(self, n: int, generator: torch.Generator | None, fixed: bool) -> torch.Tensor | None:
        if not self.model_config["noise_aug"]:
            return None
        if fixed:
            return torch.full((n,), float(self.sampling_config["noise_aug_level"]), device=self.device)
        return torch.rand(n, device=self.device, generator=generator) * self.noise_aug_max_level

    def training_inputs(self, batch: dict) -> tuple[torch.Tensor, dict[str, Any]]:
        target = batch["image"]  # [N, 3, S, S]
        level = self._levels(target.shape[0], None, fixed=False)
        cond = upsample(self._low_res(target, None, level), target.shape[-1])  # [N, 3, S, S]
        if self.crop_size < target.shape[-1]:
            target, cond = paired_random_crop(target, cond, self.crop_size)  # [N, 3, c, c] each
        return target, {"low_res": cond, **({"aug_level": level} if level is not None else {})}

    def validation_inputs(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
        target = batch["image"]
        level = self._levels(target.shape[0], generator, fixed=True)
        cond = upsample(self._low_res(target, generator, level), target.shape[-1])
        return target, {"low_res": cond, **({"aug_level": level} if level is not None else {})}

    def keep_fixed(self, batch: dict, n: int) -> dict[str, Any]:
        generator = torch.Generator(device=self.device).manual_seed(int(self.val_samples["seed"]))
        image = batch["image"][:n]
        return {"image": image, "low_res": self._low_res(image, generator, None), "caption": []}

    def sample_fixed(self, fixed: dict[str, Any], generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        target, low = fixed["image"], fixed["low_res"]
        samples = sample_upsampler(self._ema_net_as(SuperResUNet), self.stage_info(), low, generator=generator)
        bicubic = upsample(low, target.shape[-1])
        metrics = {"val/psnr": float(psnr(samples, target).mean()),
                   "val/psnr_bicubic": float(psnr(bicubic, target).mean())}
        return torch.cat([bicubic, samples.to(target.dtype), target]), metrics  # rows: bicubic, sample, target

    def stage_info(self) -> UpsamplerInfo:
        return UpsamplerInfo(**self._info_fields(), input_size=self.input_size,
                             training={"crop_size": self.crop_size, "degradation": self.degradation_config})
