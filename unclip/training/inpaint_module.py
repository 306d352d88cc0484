"""Stage ``decoder``, inpainting preset: fine-tune a base decoder into an inpainting decoder (GLIDE §3.3).

The network is the base decoder's with ``model.inpaint=true``: 4 extra input channels (the masked image and the
keep indicator, ``unclip.models.unet``) behind a zero-initialised convolution. ``init_from`` names the base
decoder checkpoint: its weights (EMA when present) load into every layer but that convolution, so training starts
from the base decoder's own behaviour. Each training example gets a mask from the configured mix
(``conf/masks``, ``unclip.data.masks``; 1 = generate, 0 = keep) and the loss is the base decoder's over the whole
image (GLIDE: the network learns to copy the kept region too; sampling composites it exactly anyway). Conditioning
is the base decoder's: the CLIP image embedding (and caption), with the same guidance drops.

Sample grids show three rows: the masked inputs (masked pixels grey), the composited edits, the targets; and log
``val/outside_mse_raw``, the mean squared error outside the mask before compositing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from hydra.utils import instantiate

from unclip.checkpoints import read_checkpoint
from unclip.config import ConfigError
from unclip.decoder_sampling import edit_decoder
from unclip.diffusion.inpaint import outside_mask_error
from unclip.models.unet import DecoderUNet
from unclip.stages import DecoderInfo, hash_mismatch, network_weights
from unclip.training.base import to_container
from unclip.training.decoder_module import DecoderModule

# Architecture keys that must match the base decoder (dropout and the guidance drop rates may change).
ARCHITECTURE_KEYS = ("image_size", "in_channels", "model_channels", "channel_mult", "num_res_blocks",
                     "attention_resolutions", "num_head_channels", "num_groups", "resblock_updown", "clip_embed_dim",
                     "clip_tokens", "context_width", "text")
# The parameterisation must match too, or the base decoder's outputs would be read as another quantity.
DIFFUSION_KEYS = ("steps", "noise_schedule", "mean_type", "var_type")


class InpaintDecoderModule(DecoderModule):
    """An inpainting decoder fine-tuned from a base decoder.

    :param init_from: the base decoder-stage checkpoint to start from (required to train; None only builds the
        module, e.g. for a dry run).
    :param masks: a ``_target_`` config of :class:`~unclip.data.masks.MaskGenerator` (``conf/masks``).
    :param kwargs: the :class:`~unclip.training.decoder_module.DecoderModule` arguments (``model.inpaint=true``).
    """

    _rows = 3

    def __init__(self, model: Any, diffusion: Any, sampling: Any, optimizer: Any, no_decay_keywords: Sequence[str],
                 scheduler: Any, ema: Any, grad_checkpointing: bool, channels_last: bool, compile: bool,
                 val_samples: Any, clip_ckpt: str | None, embeddings: str | None, init_from: str | None, masks: Any):
        super().__init__(model, diffusion, sampling, optimizer, no_decay_keywords, scheduler, ema, grad_checkpointing,
                         channels_last, compile, val_samples, clip_ckpt, embeddings)
        if not self.model_config["inpaint"]:
            raise ConfigError("the inpainting decoder module needs model.inpaint=true (4 extra input channels)")
        self.mask_config = to_container(masks)
        self.hparams.update({"init_from": init_from, "masks": self.mask_config})  # beside the decoder's
        try:
            self.masks = instantiate(masks, _convert_="all")
        except Exception as exc:  # noqa: BLE001 - hydra wraps the generator's ValueError
            raise ConfigError(f"module.masks: {exc}") from exc
        self.init_from = init_from
        self.base_meta = self._check_base(init_from) if init_from is not None else None
        self._initialised = False

    def _check_base(self, path: str) -> DecoderInfo:
        """The base checkpoint's description, refusing another stage or a mismatched architecture, naming both."""
        try:
            info = DecoderInfo.read(path)
        except (ValueError, FileNotFoundError, KeyError) as exc:
            raise ConfigError(f"module.init_from={path}: {exc}") from exc
        base = info.model
        diffs = [f"model.{k}: base {base.get(k)!r}, here {self.model_config[k]!r}"
                 for k in ARCHITECTURE_KEYS if base.get(k) != self.model_config[k]]
        diffs += [f"module.diffusion.{k}: base {info.diffusion.get(k)!r}, here {self.diffusion_config.get(k)!r}"
                  for k in DIFFUSION_KEYS if info.diffusion.get(k) != self.diffusion_config.get(k)]
        if diffs:
            raise ConfigError(f"module.init_from={path} does not match this inpainting decoder: {'; '.join(diffs)}")
        return info

    def setup(self, stage: str) -> None:
        if not self._initialised:  # before configure_model makes the EMA copy, so the EMA starts from the base too
            self._load_base()
            self._initialised = True
        super().setup(stage)
        base_clip = self.base_meta.clip if self.base_meta is not None else None
        if base_clip is not None and self.cond is not None:
            mismatch = hash_mismatch(base_clip.clip_hash, self.cond.load())
            if mismatch is not None:
                raise ConfigError(mismatch.message(f"module.init_from={self.init_from}",
                                                   f"this run's CLIP ({self.clip_ckpt or self.embeddings})"))

    def _load_base(self) -> None:
        if self.init_from is None:
            raise ConfigError("module.init_from is null: the inpainting decoder fine-tunes a base decoder; set "
                              "module.init_from=PATH/TO/decoder/checkpoints/last.ckpt")
        weights, _ = network_weights(read_checkpoint(self.init_from)["state_dict"], self.init_from)
        try:
            missing, unexpected = self.net.load_state_dict(weights, strict=False)
        except RuntimeError as exc:  # size mismatches the metadata check did not catch
            raise ConfigError(f"module.init_from={self.init_from}: {exc}") from exc
        extra = sorted(set(missing) - {"inpaint_in.weight"}) + sorted(unexpected)
        if extra:
            raise ConfigError(f"module.init_from={self.init_from}: weights do not fit this decoder (missing or "
                              f"unexpected: {extra[:5]})")

    # ---- stage hooks ------------------------------------------------------------------------------------------

    def training_inputs(self, batch: dict) -> tuple[torch.Tensor, dict[str, Any]]:
        x0, kwargs = super().training_inputs(batch)
        mask = self.masks(x0.shape[0], tuple(x0.shape[-2:]), device=x0.device)  # global RNG (seeded run)
        return x0, {**kwargs, "inpaint_image": x0, "inpaint_mask": mask}

    def _mask_generator(self, generator: torch.Generator) -> torch.Generator:
        # Masks are drawn on the CPU; seed a CPU generator from the (possibly CUDA) validation generator.
        seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
        return torch.Generator().manual_seed(seed)

    def validation_inputs(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
        x0, kwargs = super().validation_inputs(batch, generator)
        mask = self.masks(x0.shape[0], tuple(x0.shape[-2:]), self._mask_generator(generator), device=x0.device)
        return x0, {**kwargs, "inpaint_image": x0, "inpaint_mask": mask}

    def keep_fixed(self, batch: dict, n: int) -> dict[str, Any]:
        fixed = super().keep_fixed(batch, n)
        generator = torch.Generator().manual_seed(int(self.val_samples["seed"]))
        image = fixed["image"]
        return {**fixed, "mask": self.masks(image.shape[0], tuple(image.shape[-2:]), generator, device=image.device)}

    def sample_fixed(self, fixed: dict[str, Any], generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        image, mask = fixed["image"], fixed["mask"]
        out = edit_decoder(self._ema_net_as(DecoderUNet), self.stage_info(), image, mask, fixed["image_embed"],
                           fixed.get("text_tokens"), fixed.get("text_mask"), method="inpaint", generator=generator)
        errors = outside_mask_error(out.raw, image, mask)
        metrics = {}
        if torch.isfinite(errors).any():  # NaN for whole-image masks (nothing kept)
            metrics["val/outside_mse_raw"] = float(errors[torch.isfinite(errors)].mean())
        masked = image * (1 - mask)  # masked pixels at 0: mid-grey
        return torch.cat([masked, out.image.to(image.dtype), image]), metrics  # rows: input, edit, target

    def stage_info(self) -> DecoderInfo:
        info = super().stage_info()
        info.training = {"init_from": self.init_from, "masks": self.mask_config}
        return info
