"""The ADM UNet family of the unCLIP decoder cascade (Ramesh et al. 2022 §2.1, App. C).

* :class:`UNet`: the ADM backbone (Dhariwal & Nichol 2021 App. A): residual blocks with scale-shift normalisation,
  channel multipliers per resolution, attention at configured resolutions, BigGAN up/down-sampling blocks, skip
  connections from the encoder to the decoder half, zero-initialised output and residual-out layers.
* :class:`DecoderUNet`: the 64px base decoder, GLIDE's text-conditional UNet (Nichol et al. 2021) modified as in
  unCLIP §2.1: the CLIP image embedding z_i is projected and added to the timestep embedding, and projected into
  ``clip_tokens`` (4) extra context tokens concatenated with the caption's encoded tokens, which every attention
  layer attends to. Learned nulls replace z_i and the caption for classifier-free guidance.
* :class:`SuperResUNet`: the upsamplers (ADM's SuperResModel): the noisy high-res image concatenated with the
  upsampled low-res conditioning image, no attention, no caption, optionally conditioned on the noise-augmentation
  level (Saharia et al. 2022 §2.5, "noise conditioning augmentation"). Fully convolutional: any size divisible by
  2^(levels−1) works, so it trains on crops and samples at full size.

Inpainting decoder (``inpaint: true``; GLIDE §3.3, unCLIP §3 edits). Mask convention, everywhere in unclip:
``mask`` [N, 1, H, W] is 1 where the image is to be generated and 0 where it is kept. The network sees 4 extra
input channels: the known image with the masked region zeroed, and the keep indicator 1 − mask. They enter through
their own bias-free 3×3 convolution ``inpaint_in`` whose output is added to ``conv_in``'s: the same function as
concatenating 4 channels to the input convolution, but the base decoder's ``conv_in`` keeps its shape, so a base
checkpoint loads as it is. ``inpaint_in`` is zero-initialised: a freshly loaded inpainting decoder is exactly its
base decoder for any mask, and (no bias, keep indicator 0) a mask covering the whole image feeds it exact zeros.

Caption encoder. GLIDE's decoder reads the caption through its own 1.2B-parameter text transformer (ctx 128-256,
width 2048, 24 blocks) over token ids. Ours reads the frozen CLIP's per-token encodings (``ClipConditioner``'s
``text_tokens``) through :class:`~unclip.models.unet_blocks.TextEncoder`: a projection to ``context_width``,
``text.layers`` transformer blocks (GLIDE-sized in ``conf/model/decoder/paper.yaml``, so the parameter count
includes a text transformer of the paper's size, minus GLIDE's 50k×2048 token-embedding table, which CLIP's
token encoder replaces) and a LayerNorm. ``text: null`` builds a decoder conditioned on z_i only. GLIDE also adds
the pooled caption to the timestep embedding; we do not (unCLIP adds z_i there).

Networks are called as ``net(x_t, t, **conditioning)`` (the diffusion core's model convention) and return
``out_channels`` channels: the ε/x₀/v prediction, then the variance logits when the process learns its variance.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from unclip.models.unet_blocks import (
    AttentionBlock,
    Downsample,
    ResBlock,
    TextBlock,
    TextEncoder,
    Upsample,
    timestep_embedding,
)


class EmbedSequential(nn.ModuleList):
    """Layers run in order; residual blocks get the embedding, attention blocks the context."""

    def forward(self, h: Tensor, emb: Tensor, context: Tensor | None, context_mask: Tensor | None) -> Tensor:
        for layer in self:
            h = layer(h, context, context_mask) if isinstance(layer, AttentionBlock) else layer(h, emb)
        return h


class UNet(nn.Module):
    """ADM backbone; subclasses turn their conditioning into ``(input, emb, context, mask)`` for :meth:`backbone`.

    :param image_size: the side the network is trained for (attention resolutions are relative to it).
    :param in_channels: image channels (3).
    :param out_channels: output channels (3, or 6 with learned-variance logits).
    :param model_channels: base width; the timestep embedding is 4× this.
    :param channel_mult: width multiplier per resolution level (each level after the first halves the size).
    :param num_res_blocks: residual blocks per level in the encoder (decoder half: one more).
    :param attention_resolutions: sides (in pixels, at ``image_size``) where attention blocks follow the residual
        blocks; empty for none (the upsamplers). The middle block has attention when this is non-empty.
    :param num_head_channels: channels per attention head.
    :param dropout: dropout inside residual blocks.
    :param num_groups: GroupNorm groups.
    :param resblock_updown: down/up-sample with residual blocks (BigGAN, ADM/GLIDE) instead of (strided) convs.
    :param extra_in_channels: channels concatenated to the input (the upsamplers' low-res image).
    :param context_channels: width of the context tokens attention attends to (None: self-attention only).
    """

    def __init__(self, *, image_size: int, in_channels: int, out_channels: int, model_channels: int,
                 channel_mult: Sequence[int], num_res_blocks: int, attention_resolutions: Sequence[int],
                 num_head_channels: int, dropout: float, num_groups: int, resblock_updown: bool,
                 extra_in_channels: int, context_channels: int | None):
        super().__init__()
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.model_channels, self.channel_mult = model_channels, list(channel_mult)
        bad = [r for r in attention_resolutions if image_size % r or (image_size // r) & (image_size // r - 1)]
        if bad:
            raise ValueError(f"attention resolutions {bad} are not power-of-two divisions of image_size {image_size}")
        attention_ds = {image_size // r for r in attention_resolutions}
        emb_ch = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))

        def res(ch_in: int, ch_out: int, **updown: bool) -> ResBlock:
            return ResBlock(ch_in, emb_ch, ch_out, dropout, num_groups, **updown)

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, num_head_channels, num_groups, context_channels)

        ch = model_channels * channel_mult[0]
        self.conv_in = nn.Conv2d(in_channels + extra_in_channels, ch, 3, padding=1)
        self.input_blocks, skip_channels, ds = nn.ModuleList(), [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_ds:
                    layers.append(attn(ch))
                self.input_blocks.append(EmbedSequential(layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch)
                self.input_blocks.append(EmbedSequential([down]))
                skip_channels.append(ch)
                ds *= 2
        self.middle_block = EmbedSequential([res(ch, ch), *([attn(ch)] if attention_ds else []), res(ch, ch)])
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_ds:
                    layers.append(attn(ch))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(layers))
        self.out_norm = nn.GroupNorm(num_groups, ch)
        self.out_conv = nn.Conv2d(ch, out_channels, 3, padding=1)  # zero-initialised
        self.size_multiple = 2 ** (len(channel_mult) - 1)
        self.grad_checkpointing = False

    def initialize_weights(self) -> None:
        """All initialisation in one place: PyTorch defaults for convolutions and linears, then zeros for every
        residual-out layer and the output convolution (ADM's zero_module), so each block starts as the identity
        and the network's initial prediction is exactly 0. Subclasses extend this for their conditioning."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.LayerNorm)):
                module.reset_parameters()
        zeroed: list[nn.Conv2d | nn.Linear] = [self.out_conv]
        for module in self.modules():
            if isinstance(module, ResBlock):
                zeroed.append(module.out_conv)
            elif isinstance(module, AttentionBlock):
                zeroed.append(module.proj_out)
            elif isinstance(module, TextBlock):
                zeroed += [module.attn_out, module.mlp_out]
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    def set_grad_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations in backward instead of storing them (saves memory, ~30% slower)."""
        self.grad_checkpointing = enabled

    def check_size(self, height: int, width: int) -> None:
        if height % self.size_multiple or width % self.size_multiple:
            raise ValueError(f"image size {height}x{width} is not divisible by {self.size_multiple} "
                             f"(2^(levels-1) for channel_mult {self.channel_mult})")

    def _run(self, block: nn.Module, h: Tensor, *args: Tensor | None) -> Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, *args, use_reentrant=False)
        return block(h, *args)

    def backbone(self, x: Tensor, emb: Tensor, context: Tensor | None, context_mask: Tensor | None,
                 input_residual: Tensor | None = None) -> Tensor:
        """:param x: [N, C_in + C_extra, H, W] network input.
        :param emb: [N, 4·model_channels] timestep (+ conditioning) embedding.
        :param context: [N, L, C_ctx] tokens for attention, or None.
        :param context_mask: [N, L] bool (True: attend), or None for all.
        :param input_residual: [N, ch, H, W] added to the input convolution's output (the inpainting channels).
        :return: [N, out_channels, H, W]."""
        self.check_size(x.shape[-2], x.shape[-1])
        if _channels_last(self.conv_in.weight):  # a network converted with .to(memory_format=channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        emb = F.silu(emb)  # the SiLU at the start of every block's emb_layers in ADM, computed once
        h = self.conv_in(x)  # [N, ch, H, W]
        if input_residual is not None:
            h = h + input_residual
        skips = [h]
        for block in self.input_blocks:
            h = self._run(block, h, emb, context, context_mask)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context, context_mask)  # [N, ch_max, H/2^(levels-1), ...]
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)
        return self.out_conv(F.silu(self.out_norm(h)))  # [N, out_channels, H, W]

    def timestep_features(self, t: Tensor) -> Tensor:
        """[N] timesteps → [N, 4·model_channels] embedding (ADM's time_embed MLP)."""
        return self.time_embed(timestep_embedding(t, self.model_channels))


class DecoderUNet(UNet):
    """The base decoder: ADM UNet conditioned on the CLIP image embedding and (optionally) the caption.

    :param clip_embed_dim: size D of the CLIP image embedding z_i it is trained on.
    :param clip_tokens: number of context tokens projected from z_i (4 in unCLIP).
    :param context_width: width of the context tokens (the caption encoder's width; GLIDE: 2048).
    :param text: caption encoder ``{"input_width", "context_length", "layers", "heads"}`` (see
        :class:`~unclip.models.unet_blocks.TextEncoder`), or None for no caption conditioning.
    :param image_drop_prob: training probability of replacing z_i by the learned null (unCLIP §2.1: 10%).
    :param text_drop_prob: training probability of replacing the caption by the learned null (50%).
    :param inpaint: take the known image and the mask as 4 extra input channels (module docstring); forward then
        needs ``inpaint_image`` and ``inpaint_mask``.
    :param backbone: the :class:`UNet` arguments.
    """

    def __init__(self, *, clip_embed_dim: int, clip_tokens: int, context_width: int, text: dict | None,
                 image_drop_prob: float, text_drop_prob: float, inpaint: bool, **backbone: Any):
        super().__init__(**backbone, extra_in_channels=0, context_channels=context_width)
        for name, p in (("image_drop_prob", image_drop_prob), ("text_drop_prob", text_drop_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"model.{name} must be in [0, 1], got {p}")
        self.clip_embed_dim, self.clip_tokens, self.context_width = clip_embed_dim, clip_tokens, context_width
        self.image_drop_prob, self.text_drop_prob = image_drop_prob, text_drop_prob
        emb_ch = 4 * self.model_channels
        self.clip_to_emb = nn.Linear(clip_embed_dim, emb_ch)
        self.clip_to_tokens = nn.Linear(clip_embed_dim, clip_tokens * context_width)
        self.null_image_embed = nn.Parameter(torch.empty(clip_embed_dim))
        self.text_encoder = TextEncoder(width=context_width, **text) if text else None
        self.null_text = nn.Parameter(torch.empty(text["context_length"], context_width)) if text else None
        self.inpaint = bool(inpaint)
        self.inpaint_in = (nn.Conv2d(self.in_channels + 1, self.conv_in.out_channels, 3, padding=1, bias=False)
                           if inpaint else None)  # zero-initialised: starts as the base decoder
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Backbone initialisation (zeroed residual outs), then the nulls: z_i's null at the scale of a unit-norm
        embedding, the caption's at the scale of the encoder's LayerNorm output, and small positions; the
        inpainting input convolution at zero."""
        super().initialize_weights()
        if self.inpaint_in is not None:
            nn.init.zeros_(self.inpaint_in.weight)
        nn.init.normal_(self.null_image_embed, std=self.clip_embed_dim**-0.5)
        if self.text_encoder is not None and self.null_text is not None:  # both exist with caption conditioning
            nn.init.normal_(self.null_text, std=1.0)
            nn.init.normal_(self.text_encoder.positional_embedding, std=0.01)

    def drop_masks(self, n: int, device: torch.device | str,
                   generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Independent training drops for guidance (unCLIP §2.1): ``{"image_drop": [n], "text_drop": [n]}`` bool."""
        u = torch.rand(2, n, device=device, generator=generator)
        return {"image_drop": u[0] < self.image_drop_prob, "text_drop": u[1] < self.text_drop_prob}

    def forward(self, x: Tensor, t: Tensor, image_embed: Tensor, text_tokens: Tensor | None = None,
                text_mask: Tensor | None = None, cond_drop: Tensor | None = None, image_drop: Tensor | None = None,
                text_drop: Tensor | None = None, inpaint_image: Tensor | None = None,
                inpaint_mask: Tensor | None = None) -> Tensor:
        """:param x: [N, 3, H, W] noisy image x_t.
        :param t: [N] timesteps (original chain).
        :param image_embed: [N, D] unit-norm CLIP image embeddings z_i.
        :param text_tokens: [N, L, W_clip] CLIP caption token encodings (None: the null caption for all).
        :param text_mask: [N, L] bool, True for real tokens (None: all real).
        :param cond_drop: [N] bool, True drops all conditioning (the unconditional half of guidance).
        :param image_drop, text_drop: [N] bool, True replaces z_i / the caption by its learned null (training).
        :param inpaint_image: [N, 3, H, W] the image being edited, in [-1, 1] (inpainting decoders only); its pixels
            under the mask are zeroed here, so they never reach the network.
        :param inpaint_mask: [N, 1, H, W] 1 = generate, 0 = keep (inpainting decoders only).
        :return: [N, out_channels, H, W]."""
        n, dim = image_embed.shape
        if dim != self.clip_embed_dim:
            raise ValueError(f"image_embed has size {dim} but this decoder was built for model.clip_embed_dim="
                             f"{self.clip_embed_dim}")
        image_drop = _either(image_drop, cond_drop)
        text_drop = _either(text_drop, cond_drop)
        z = image_embed.to(self.null_image_embed.dtype)
        if image_drop is not None:  # where, not indexing: the null stays in the graph (DDP sees it every step)
            z = torch.where(image_drop[:, None], self.null_image_embed, z)
        z = z * math.sqrt(self.clip_embed_dim)  # unit-norm z_i → entries of unit scale before the projections
        emb = self.timestep_features(t) + self.clip_to_emb(z)  # [N, 4·mc]
        context = self.clip_to_tokens(z).view(n, self.clip_tokens, self.context_width)  # [N, 4, W_ctx]
        mask = None
        if self.text_encoder is not None:
            caption, mask = self._caption(n, text_tokens, text_mask, text_drop)  # [N, L, W_ctx], [N, L] | None
            context = torch.cat([context, caption], dim=1)  # [N, 4 + L, W_ctx]
            if mask is not None:
                mask = torch.cat([torch.ones(n, self.clip_tokens, dtype=torch.bool, device=x.device), mask], dim=1)
        elif text_tokens is not None:
            raise ValueError("this decoder has no caption conditioning (model.text is null) but got text_tokens")
        return self.backbone(x, emb, context, mask, self._inpaint_features(x, inpaint_image, inpaint_mask))

    def _inpaint_features(self, x: Tensor, image: Tensor | None, mask: Tensor | None) -> Tensor | None:
        if self.inpaint_in is None:
            if image is not None or mask is not None:
                raise ValueError("this decoder is not an inpainting decoder (model.inpaint is false) but got "
                                 "inpaint_image/inpaint_mask; edit with it by RePaint instead")
            return None
        if image is None or mask is None:
            raise ValueError("this inpainting decoder needs inpaint_image [N, 3, H, W] and inpaint_mask [N, 1, H, W]")
        if image.shape != x.shape or mask.shape != (x.shape[0], 1, *x.shape[2:]):
            raise ValueError(f"inpaint_image {tuple(image.shape)} and inpaint_mask {tuple(mask.shape)} must be "
                             f"{tuple(x.shape)} and {(x.shape[0], 1, *x.shape[2:])}")
        keep = 1 - mask.to(x.dtype)  # [N, 1, H, W]
        cond = torch.cat([image.to(x.dtype) * keep, keep], dim=1)  # [N, 4, H, W]
        if _channels_last(self.conv_in.weight):
            cond = cond.contiguous(memory_format=torch.channels_last)
        return self.inpaint_in(cond)  # [N, ch, H, W]

    def _caption(self, n: int, tokens: Tensor | None, mask: Tensor | None,
                 drop: Tensor | None) -> tuple[Tensor, Tensor | None]:
        assert self.text_encoder is not None and self.null_text is not None
        null = self.null_text[None].expand(n, -1, -1)  # [N, L, W_ctx]
        if tokens is None:
            return null, None
        if tokens.shape[1] != self.text_encoder.context_length:
            raise ValueError(f"text_tokens have {tokens.shape[1]} positions but model.text.context_length is "
                             f"{self.text_encoder.context_length}")
        if mask is None:
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        encoded = self.text_encoder(tokens.to(null.dtype), mask)  # [N, L, W_ctx]
        if drop is None:
            return encoded, mask
        return torch.where(drop[:, None, None], null, encoded), mask | drop[:, None]


class SuperResUNet(UNet):
    """An upsampler: ADM UNet on [x_t, upsampled low-res image] (ADM SuperResModel), no attention or caption.

    :param noise_aug: condition on the noise-augmentation level of the low-res image (Saharia et al. 2022).
    :param backbone: the :class:`UNet` arguments.
    """

    def __init__(self, *, noise_aug: bool, **backbone: Any):
        super().__init__(**backbone, extra_in_channels=backbone["in_channels"], context_channels=None)
        emb_ch = 4 * self.model_channels
        self.noise_aug = noise_aug
        self.aug_embed = (nn.Sequential(nn.Linear(self.model_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
                          if noise_aug else None)
        self.initialize_weights()

    def forward(self, x: Tensor, t: Tensor, low_res: Tensor, aug_level: Tensor | None = None) -> Tensor:
        """:param x: [N, 3, H, W] noisy high-res image x_t.
        :param t: [N] timesteps (original chain).
        :param low_res: [N, 3, h, w] conditioning image in [-1, 1]; resized (bicubic) to H×W when h, w differ.
        :param aug_level: [N] noise-augmentation level in [0, 1] (required when built with ``noise_aug``).
        :return: [N, out_channels, H, W]."""
        if low_res.shape[-2:] != x.shape[-2:]:
            low_res = F.interpolate(low_res, size=x.shape[-2:], mode="bicubic", align_corners=False)
        emb = self.timestep_features(t)  # [N, 4·mc]
        if self.aug_embed is not None:
            if aug_level is None:
                raise ValueError("this upsampler conditions on the noise-augmentation level: pass aug_level [N]")
            emb = emb + self.aug_embed(timestep_embedding(aug_level * 1000.0, self.model_channels))
        return self.backbone(torch.cat([x, low_res.to(x.dtype)], dim=1), emb, None, None)  # [N, out, H, W]


def _channels_last(weight: Tensor) -> bool:
    return weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def _either(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None or b is None:
        return a if b is None else b
    return a | b


def build_unet(cls: type[UNet], config: dict, out_channels: int) -> UNet:
    """Build ``cls`` from a ``conf/model/{decoder,upsampler}`` dict, refusing unknown or missing keys by name.

    :param cls: :class:`DecoderUNet` or :class:`SuperResUNet`.
    :param config: the model config (every key a constructor argument of ``cls`` or :class:`UNet`).
    :param out_channels: 3, or 6 when the diffusion process learns its variance (set from the diffusion config).
    """
    accepted = set()
    for klass in (cls, UNet):
        accepted |= {p for p in inspect.signature(klass.__init__).parameters if p not in ("self", "backbone")}
    accepted -= {"out_channels", "extra_in_channels", "context_channels"}
    unknown = sorted(set(config) - accepted)
    missing = sorted(accepted - set(config))
    if unknown or missing:
        raise ValueError(f"model config for {cls.__name__}: unknown keys {unknown}, missing keys {missing}; "
                         f"valid keys: {', '.join(sorted(accepted))}")
    return cls(**config, out_channels=out_channels)
