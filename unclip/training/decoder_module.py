"""Stages ``decoder`` and ``upsampler``: diffusion training of the unCLIP decoder cascade (Ramesh et al. §2.1).

:class:`DiffusionImageModule` adds to the shared :class:`~unclip.training.diffusion_stage.DiffusionStageModule`
(network, process, EMA, optimiser, per-quartile training losses, checkpoints) what both image stages validate with:
per-timestep-quartile losses of the EMA network on the val set, and periodic sample grids from a fixed set of
validation examples, handed to the ``SampleGrids`` callback (``run_dir/samples/``, PNG).

* :class:`DecoderModule`: x₀ = the image; conditioning = the CLIP image embedding (and caption token encodings)
  from ``ClipConditioner``, with the guidance drops of the network's config.
* :class:`UpsamplerModule`: x₀ = a random crop of the image (``crop_fraction`` of the target size); conditioning =
  the image downsampled to ``input_size``, corrupted (``degradation``), optionally noise-augmented, upsampled back;
  with ``residual``, x₀ = the crop minus that conditioning image (SRDiff).

The EMA copy (``ema.module``) is what validation, the sample grids and ``load_decoder``/``load_upsampler`` use.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, TypeVar, cast

import torch
from hydra.utils import instantiate

from unclip.config import ConfigError
from unclip.decoder_sampling import sample_decoder, sample_upsampler
from unclip.evaluation.metrics import psnr
from unclip.models.degradations import downsample, noise_augment, paired_random_crop, upsample
from unclip.models.unet import DecoderUNet, SuperResUNet, UNet, build_unet
from unclip.stages import DecoderInfo, UpsamplerInfo, clip_mismatches, input_size_mismatch, out_channels_for
from unclip.training.base import SampleGrid, to_container
from unclip.training.conditioning import ClipConditioner
from unclip.training.diffusion_stage import QUARTILES, DiffusionStageModule, quartile_metrics, quartile_sums
from unclip.training.preflight import previous_output_size

_Net = TypeVar("_Net", bound=UNet)


class DiffusionImageModule(DiffusionStageModule, abc.ABC):
    """Shared by both image stages; see the subclasses for the stage-specific arguments.

    :param channels_last: keep the network (and its inputs) in channels-last memory format.
    :param val_samples: ``{"num", "every", "seed"}``: grid of ``num`` fixed val examples every ``every``
        validations, sampled from a generator seeded with ``seed``.
    :param kwargs: the :class:`~unclip.training.diffusion_stage.DiffusionStageModule` arguments.
    """

    network_cls: type[UNet] = UNet
    _rows = 2  # rows of a sample grid (see sample_fixed)

    def __init__(self, model: Any, diffusion: Any, sampling: Any, optimizer: Any, no_decay_keywords: Sequence[str],
                 scheduler: Any, ema: Any, grad_checkpointing: bool, channels_last: bool, compile: bool,
                 val_samples: Any, stage_hparams: dict[str, Any]):
        super().__init__(model, diffusion, sampling, optimizer, no_decay_keywords, scheduler, ema, grad_checkpointing,
                         compile, {"channels_last": channels_last, "val_samples": val_samples, **stage_hparams})
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.val_samples = to_container(val_samples)
        self._val_sums: dict[str, torch.Tensor] = {}
        self._fixed: dict[str, Any] | None = None
        self._validations = 0

    def build_network(self) -> UNet:
        out_channels = out_channels_for(self.diffusion_config, self.model_config["in_channels"])
        try:
            return build_unet(self.network_cls, self.model_config, out_channels)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc

    # ---- stage hooks -------------------------------------------------------------------------------------

    @abc.abstractmethod
    def validation_inputs(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
        """(x₀, network kwargs) for a validation batch, without guidance drops, random crops or random order."""

    @abc.abstractmethod
    def keep_fixed(self, batch: dict, n: int) -> dict[str, Any]:
        """The first n examples of the first val batch, kept for every sample grid."""

    @abc.abstractmethod
    def sample_fixed(self, fixed: dict[str, Any], generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """(grid rows [R·n, 3, S, S] in [-1, 1], metrics) sampled from the EMA network."""

    def _ema_net_as(self, cls: type[_Net]) -> _Net:
        """:attr:`ema_net` typed as the stage's network class ``cls`` (a cast: under FSDP it is a wrapping unit)."""
        return cast(_Net, self.ema_net)

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
        for name, value in quartile_sums(terms, t, self.process.num_timesteps).items():
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
        if not sums["count"].sum():
            return
        metrics: dict[str, float] = {"val/num_samples": float(sums["count"].sum()), **quartile_metrics("val", sums)}
        if not self.trainer.sanity_checking:
            self._validations += 1
            due = (self._validations - 1) % int(self.val_samples["every"]) == 0
            if self._fixed is not None and due and self.trainer.is_global_zero:  # no collectives inside
                metrics.update(self._sample_grid())
        self.log_dict(metrics, sync_dist=False)
        if not self.trainer.sanity_checking:
            self.validation_metrics = metrics

    def _sample_grid(self) -> dict:
        """Sample the fixed examples with the EMA network; the grid is handed to the SampleGrids callback."""
        assert self._fixed is not None
        generator = torch.Generator(device=self.device).manual_seed(int(self.val_samples["seed"]))
        was_training = self.ema_net.training
        self.ema_net.eval()
        rows, metrics = self.sample_fixed(self._fixed, generator)
        self.ema_net.train(was_training)
        self.sample_grid = SampleGrid(rows.float().cpu(), rows.shape[0] // self._rows,
                                      list(self._fixed.get("caption") or []))
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
                 val_samples: Any, clip_ckpt: str | None, embeddings: str | None):
        super().__init__(model, diffusion, sampling, optimizer, no_decay_keywords, scheduler, ema, grad_checkpointing,
                         channels_last, compile, val_samples, {"clip_ckpt": clip_ckpt, "embeddings": embeddings})
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
    :param residual: diffuse x₀ = target − conditioning image (SRDiff, Li et al. 2022), not the target; recorded
        in the stage description, so sampling adds the upsampled input back (``sample_upsampler``).
    :param kwargs: the :class:`DiffusionImageModule` arguments.
    """

    stage = "upsampler"
    network_cls = SuperResUNet
    net: SuperResUNet
    _rows = 3

    def __init__(self, model: Any, diffusion: Any, sampling: Any, optimizer: Any, no_decay_keywords: Sequence[str],
                 scheduler: Any, ema: Any, grad_checkpointing: bool, channels_last: bool, compile: bool,
                 val_samples: Any, input_size: int, crop_fraction: float, degradation: Any,
                 noise_aug_max_level: float, decoder_ckpt: str | None, upsampler_ckpts: Sequence[str] | None,
                 residual: bool = False):
        super().__init__(model, diffusion, sampling, optimizer, no_decay_keywords, scheduler, ema, grad_checkpointing,
                         channels_last, compile, val_samples,
                         {"input_size": input_size, "crop_fraction": crop_fraction, "degradation": degradation,
                          "noise_aug_max_level": noise_aug_max_level, "decoder_ckpt": decoder_ckpt,
                          "upsampler_ckpts": upsampler_ckpts, "residual": residual})
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
        self.residual = bool(residual)
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

    def _x0(self, target: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The diffused data: the target, or its residual over the network's conditioning image."""
        return target - cond if self.residual else target

    def training_inputs(self, batch: dict) -> tuple[torch.Tensor, dict[str, Any]]:
        target = batch["image"]  # [N, 3, S, S]
        level = self._levels(target.shape[0], None, fixed=False)
        cond = upsample(self._low_res(target, None, level), target.shape[-1])  # [N, 3, S, S]
        if self.crop_size < target.shape[-1]:
            target, cond = paired_random_crop(target, cond, self.crop_size)  # [N, 3, c, c] each
        return self._x0(target, cond), {"low_res": cond, **({"aug_level": level} if level is not None else {})}

    def validation_inputs(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
        target = batch["image"]
        level = self._levels(target.shape[0], generator, fixed=True)
        cond = upsample(self._low_res(target, generator, level), target.shape[-1])
        return self._x0(target, cond), {"low_res": cond, **({"aug_level": level} if level is not None else {})}

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
        return UpsamplerInfo(**self._info_fields(), input_size=self.input_size, residual=self.residual,
                             training={"crop_size": self.crop_size, "degradation": self.degradation_config})
