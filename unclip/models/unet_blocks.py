"""Building blocks of the ADM UNet (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs", App. A; improved-diffusion
unet.py) with GLIDE's attention over extra context tokens (Nichol et al. 2021, App. A).

* :func:`timestep_embedding`: sinusoidal features of a (possibly fractional) timestep.
* :class:`ResBlock`: GroupNorm-SiLU-conv twice, with the conditioning embedding applied as scale and shift of the
  second normalisation (ADM's ``use_scale_shift_norm``), optional BigGAN-style up/down-sampling inside the block.
* :class:`AttentionBlock`: multi-head self-attention over the H·W positions whose keys and values also include a
  projected context sequence (GLIDE's ``encoder_kv``), through ``scaled_dot_product_attention``.
* :class:`TextEncoder`: an optional non-causal transformer over CLIP's caption token encodings (GLIDE's text
  transformer takes token ids; ours takes the frozen CLIP's per-token outputs, see unet.py).

Residual-out layers (``ResBlock.out_conv``, ``AttentionBlock.proj_out``, ``TextBlock`` outputs) are zeroed by the
UNet's ``initialize_weights``, so each block starts as the identity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features [cos(t·f_k), sin(t·f_k)] with f_k = max_period^(-k/half) (ADM's timestep_embedding).

    Shared by the UNets and the prior.

    :param t: [N] timesteps (int or float).
    :param dim: output width (an odd width gets a zero last feature).
    :return: [N, dim] float32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # [N, half]
    return F.pad(torch.cat([torch.cos(args), torch.sin(args)], dim=-1), (0, dim % 2))


def _resample(x: Tensor, up: bool, down: bool) -> Tensor:
    if up:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    if down:
        return F.avg_pool2d(x, 2)
    return x


class ResBlock(nn.Module):
    """ADM residual block with scale-shift normalisation: out = skip(x) + conv(SiLU(GN(h)·(1+s) + b)).

    :param channels: input channels.
    :param emb_channels: width of the conditioning embedding (4 × model channels).
    :param out_channels: output channels.
    :param dropout: dropout before the second convolution.
    :param num_groups: GroupNorm groups.
    :param up: upsample ×2 (nearest) inside the block (BigGAN-style, ADM ``resblock_updown``).
    :param down: downsample ×2 (average pooling) inside the block.
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float, num_groups: int,
                 up: bool = False, down: bool = False):
        super().__init__()
        self.up, self.down = up, down
        self.in_norm = nn.GroupNorm(num_groups, channels)
        self.in_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, 2 * out_channels)
        self.out_norm = nn.GroupNorm(num_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = nn.Conv2d(out_channels, out_channels, 3, padding=1)  # zero-initialised
        self.skip = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """:param x: [N, C, H, W].
        :param emb: [N, E] conditioning embedding, already passed through SiLU (ADM applies SiLU first in every
            block's emb_layers; the UNet does it once).
        :return: [N, C_out, H', W'] (H' = 2H up, H/2 down)."""
        h = F.silu(self.in_norm(x))
        h, x = _resample(h, self.up, self.down), _resample(x, self.up, self.down)
        h = self.in_conv(h)  # [N, C_out, H', W']
        scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)  # 2 × [N, C_out, 1, 1]
        h = torch.addcmul(shift, self.out_norm(h), scale + 1)
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Strided 3×3 convolution (ADM's Downsample with conv, used when ``resblock_updown`` is off)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.conv(x)  # [N, C, H/2, W/2]


class Upsample(nn.Module):
    """Nearest ×2 then a 3×3 convolution (ADM's Upsample with conv)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # [N, C, 2H, 2W]


class AttentionBlock(nn.Module):
    """Multi-head attention of every position over all positions and the context tokens (GLIDE App. A).

    :param channels: feature channels C (a multiple of ``num_head_channels``).
    :param num_head_channels: channels per head (64 in ADM/GLIDE).
    :param num_groups: GroupNorm groups.
    :param context_channels: width of the context sequence, or None for self-attention only.
    """

    def __init__(self, channels: int, num_head_channels: int, num_groups: int, context_channels: int | None):
        super().__init__()
        if channels % num_head_channels:
            raise ValueError(f"attention channels {channels} are not a multiple of head channels {num_head_channels}")
        self.heads = channels // num_head_channels
        self.norm = nn.GroupNorm(num_groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.context_kv = nn.Linear(context_channels, 2 * channels) if context_channels else None
        self.proj_out = nn.Linear(channels, channels)  # zero-initialised

    def forward(self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        """:param x: [N, C, H, W].
        :param context: [N, L, C_ctx] extra key/value tokens (None: self-attention only).
        :param context_mask: [N, L] bool, True for tokens to attend to.
        :return: [N, C, H, W]."""
        n, c, height, width = x.shape
        heads, hc = self.heads, c // self.heads
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [N, HW, C] (free for channels_last inputs)
        q, k, v = self.qkv(tokens).view(n, -1, 3, heads, hc).permute(2, 0, 3, 1, 4)  # 3 × [N, h, HW, hc]
        mask = None
        if self.context_kv is not None and context is not None:
            ck, cv = self.context_kv(context).view(n, -1, 2, heads, hc).permute(2, 0, 3, 1, 4)  # 2 × [N, h, L, hc]
            k, v = torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)  # [N, h, L+HW, hc]
            if context_mask is not None:
                own = torch.ones(n, height * width, dtype=torch.bool, device=x.device)
                mask = torch.cat([context_mask, own], dim=1)[:, None, None, :]  # [N, 1, 1, L+HW]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [N, h, HW, hc]
        out = self.proj_out(out.transpose(1, 2).reshape(n, height * width, c))  # [N, HW, C]
        return x + out.transpose(1, 2).reshape(n, c, height, width)


class TextBlock(nn.Module):
    """Pre-LayerNorm transformer block over caption tokens, padding masked out of the keys.

    :param width: token width.
    :param heads: attention heads.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.attn_out = nn.Linear(width, width)  # zero-initialised
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))  # last zeroed

    @property
    def mlp_out(self) -> nn.Linear:
        """The MLP's output layer (zero-initialised)."""
        layer = self.mlp[-1]
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"TextBlock.mlp ends in {type(layer).__name__}, expected nn.Linear")
        return layer

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """:param x: [N, L, W]. :param mask: [N, L] bool, True for real tokens. :return: [N, L, W]."""
        n, length, width = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(n, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # [N, h, L, d]
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # [N, h, L, d]
        x = x + self.attn_out(attn.transpose(1, 2).reshape(n, length, width))
        return x + self.mlp(self.ln_2(x))


class TextEncoder(nn.Module):
    """Caption encoder: project CLIP's token encodings to ``width``, add positions, ``layers`` transformer blocks,
    final LayerNorm (GLIDE's text transformer, reading CLIP token encodings instead of token ids).

    :param input_width: width of the frozen CLIP's token encodings.
    :param context_length: caption tokens L.
    :param width: encoder (and context) width.
    :param layers: transformer blocks (0: projection and LayerNorm only).
    :param heads: attention heads per block.
    """

    def __init__(self, input_width: int, context_length: int, width: int, layers: int, heads: int):
        super().__init__()
        self.context_length = context_length
        self.proj_in = nn.Linear(input_width, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.blocks = nn.ModuleList(TextBlock(width, heads) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """:param tokens: [N, L, input_width]. :param mask: [N, L] bool. :return: [N, L, width]."""
        x = self.proj_in(tokens) + self.positional_embedding  # [N, L, W]
        # A row whose mask is all False would make attention NaN; such rows are replaced by the null caption.
        safe = mask | ~mask.any(dim=1, keepdim=True)
        for block in self.blocks:
            x = block(x, safe)
        return self.ln_final(x)
