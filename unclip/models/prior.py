"""The unCLIP diffusion prior network (Ramesh et al. 2022 §2.2): a decoder-only transformer that predicts a
clean CLIP image embedding from a noised one, conditioned on the caption.

The sequence, in order (§2.2)::

    [caption token encodings (≤ context_length), text embedding z_t, timestep, noised z_i, learned query]

attended causally, with the caption's padding mask; the output at the learned query predicts x₀ = scale · z_i
(mean_type "x0"). Embeddings enter the diffusion multiplied by ``embed_scale`` (17.2 in §2.2, or √D), and
:meth:`PriorTransformer.unscale` undoes it.

Classifier-free guidance (§2.2, 10% drop in training): where ``cond_drop_mask`` is True the caption becomes a
learned one-token null caption (its other positions masked, so the caption's length does not leak) and z_t a
learned null embedding. One batched forward can thus hold conditional and unconditional rows.

Two exact shortcuts keep CPU training fast: captions are cut to the batch's longest real caption (padded keys
are masked anyway; positions of z_t, timestep, z_i and query keep fixed position embeddings), and the last
block computes its attention and MLP for the query row only (no later block reads the other rows). Sampling
encodes the [caption, z_t] rows once per run (:meth:`PriorTransformer.with_cached_prefix`): under the causal mask
they never see x_t or t, so each step only processes the last three rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from unclip.models.unet_blocks import timestep_embedding

SPECIAL_TOKENS = 4  # z_t, timestep, noised z_i, learned query
KV = tuple[Tensor, Tensor]  # one block's keys and values [B, H, S, hd]
MODEL_KEYS = ("embed_dim", "text_width", "context_length", "width", "depth", "heads", "mlp_ratio", "embed_scale")


def resolve_embed_scale(embed_scale: float | str, embed_dim: int) -> float:
    """The scale factor as a number: a float as given (17.2 in §2.2), or ``"sqrt_dim"`` for √D (DALLE2-pytorch).

    :raises ValueError: for anything else or a non-positive value.
    """
    if embed_scale == "sqrt_dim":
        return math.sqrt(embed_dim)
    if isinstance(embed_scale, str) or not float(embed_scale) > 0:
        raise ValueError(f"model.embed_scale must be a positive number or 'sqrt_dim', got {embed_scale!r}")
    return float(embed_scale)


class Block(nn.Module):
    """Pre-LN transformer block; attention through ``scaled_dot_product_attention`` with a boolean mask."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"model.width={width} is not divisible by model.heads={heads}")
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, int(width * mlp_ratio))
        self.fc2 = nn.Linear(int(width * mlp_ratio), width)

    def _heads(self, x: Tensor) -> Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.heads, -1).transpose(1, 2)  # [B, H, S, hd]

    def forward(self, x: Tensor, attn_mask: Tensor, past: KV | None = None,
                last_only: bool = False) -> tuple[Tensor, KV]:
        """:param x: [B, S, W] rows to process.
        :param attn_mask: [B, 1, S (or 1), P + S] bool over (past keys, these rows' keys); True = may attend.
        :param past: keys and values [B, H, P, hd] of P earlier rows (the cached caption prefix), or None.
        :param last_only: compute attention and MLP for the last row only (keys and values from all rows).
        :return: ([B, S (or 1), W], this block's keys and values [B, H, P + S, hd] for later rows)."""
        b, s, w = x.shape
        h = self.ln_1(x)
        if last_only:
            k, v = F.linear(h, self.qkv.weight[w:], self.qkv.bias[w:]).chunk(2, dim=-1)  # [B, S, W] each
            q = F.linear(h[:, -1:], self.qkv.weight[:w], self.qkv.bias[:w])  # [B, 1, W]
            x, attn_mask = x[:, -1:], attn_mask[:, :, -1:]
        else:
            q, k, v = self.qkv(h).chunk(3, dim=-1)  # [B, S, W] each
        q, k, v = self._heads(q), self._heads(k), self._heads(v)  # [B, H, S, hd]
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # [B, H, P + S, hd]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, H, S (or 1), hd]
        x = x + self.proj(y.transpose(1, 2).reshape(b, -1, w))
        return x + self.fc2(F.gelu(self.fc1(self.ln_2(x)))), (k, v)


class PriorTransformer(nn.Module):
    """Decoder-only prior transformer (§2.2, Table 3: width 2048, 24 blocks at 1B parameters).

    :param embed_dim: CLIP embedding size D (z_i and z_t).
    :param text_width: width W_t of the CLIP text transformer's token encodings.
    :param context_length: caption positions the prior holds; captions may be shorter.
    :param width: transformer width.
    :param depth: number of blocks.
    :param heads: attention heads.
    :param mlp_ratio: MLP hidden size / width.
    :param embed_scale: factor applied to unit-norm embeddings before diffusion (17.2, or "sqrt_dim").
    """

    def __init__(self, embed_dim: int, text_width: int, context_length: int, width: int, depth: int, heads: int,
                 mlp_ratio: float, embed_scale: float | str):
        super().__init__()
        self.embed_dim, self.context_length, self.width = embed_dim, context_length, width
        self.embed_scale = resolve_embed_scale(embed_scale, embed_dim)
        self.text_proj = nn.Linear(text_width, width)  # CLIP text width -> model width
        self.text_embed_proj = nn.Linear(embed_dim, width)
        self.x_proj = nn.Linear(embed_dim, width)
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.query = nn.Parameter(torch.empty(width))
        self.pos_embed = nn.Parameter(torch.empty(context_length + SPECIAL_TOKENS, width))
        self.null_text_token = nn.Parameter(torch.empty(width))  # the one-token null caption
        self.null_text_embed = nn.Parameter(torch.empty(width))  # null z_t, in model width
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.ln_out = nn.LayerNorm(width)
        self.out = nn.Linear(width, embed_dim)
        self.grad_checkpointing = False  # set_grad_checkpointing: recompute block activations in backward
        self.initialize_weights()

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> PriorTransformer:
        """Build from a ``conf/model/prior`` dict whose CLIP sizes are filled in; unknown keys are refused."""
        unknown = sorted(set(config) - set(MODEL_KEYS))
        missing = [k for k in MODEL_KEYS if config.get(k) is None]
        if unknown or missing:
            raise ValueError(f"prior model config: unknown keys {unknown}, unset keys {missing}; "
                             f"valid: {list(MODEL_KEYS)}")
        return cls(**{k: config[k] for k in MODEL_KEYS})

    def initialize_weights(self) -> None:
        """GPT-2 style: N(0, 0.02) weights, zero biases, residual projections scaled by 1/√(2·depth), zero output
        layer (the first prediction of x₀ is 0, the data mean)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        residual_std = 0.02 / math.sqrt(2 * len(self.blocks))
        for block in self.modules():
            if not isinstance(block, Block):
                continue
            nn.init.normal_(block.proj.weight, std=residual_std)
            nn.init.normal_(block.fc2.weight, std=residual_std)
        for param in (self.query, self.pos_embed, self.null_text_token, self.null_text_embed):
            nn.init.normal_(param, std=0.02)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them (training memory ~ 1 block)."""
        self.grad_checkpointing = enabled

    def _block(self, block: nn.Module, h: Tensor, mask: Tensor, last_only: bool = False) -> Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, mask, None, last_only, use_reentrant=False)[0]
        return block(h, mask, last_only=last_only)[0]

    # ---- embedding scale (§2.2) ----------------------------------------------------------------------

    def scale(self, z: Tensor) -> Tensor:
        """Unit-norm CLIP embeddings [B, D] -> diffusion space (× embed_scale)."""
        return z * self.embed_scale

    def unscale(self, x: Tensor) -> Tensor:
        """Diffusion space [B, D] -> CLIP embedding scale (÷ embed_scale); callers normalise if needed."""
        return x / self.embed_scale

    # ---- forward -------------------------------------------------------------------------------------

    def _caption(self, text_tokens: Tensor, text_mask: Tensor, drop: Tensor | None) -> tuple[Tensor, Tensor]:
        """Projected caption and its mask, null caption where ``drop``, cut to the longest real caption.

        :return: ([B, L, W], [B, L] bool) with L ≥ 1.
        """
        if text_tokens.shape[1] > self.context_length:
            raise ValueError(f"captions of {text_tokens.shape[1]} tokens exceed the prior's "
                             f"context_length={self.context_length}")
        mask = text_mask.bool()
        if drop is not None:
            null_mask = torch.zeros_like(mask)
            null_mask[:, 0] = True
            mask = torch.where(drop[:, None], null_mask, mask)
        length = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1
        tokens = self.text_proj(text_tokens[:, :length])  # [B, L, W]
        mask = mask[:, :length]
        if drop is not None:
            null = torch.zeros_like(tokens)
            null[:, 0] = self.null_text_token
            tokens = torch.where(drop[:, None, None], null, tokens)
        return tokens, mask

    def _prefix(self, text_embed: Tensor, text_tokens: Tensor, text_mask: Tensor,
                cond_drop_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """The rows that do not depend on x_t or t: [caption, z_t] with position embeddings.

        :return: (h [B, P, W], key validity [B, P] bool) with P = L + 1.
        """
        b = text_embed.shape[0]
        drop = None if cond_drop_mask is None else cond_drop_mask.bool().view(b)
        caption, caption_mask = self._caption(text_tokens, text_mask, drop)  # [B, L, W], [B, L]
        z_t = self.text_embed_proj(self.scale(text_embed.to(caption.dtype)))  # [B, W]
        if drop is not None:
            z_t = torch.where(drop[:, None], self.null_text_embed.to(z_t.dtype), z_t)
        length = caption.shape[1]
        pos = torch.cat([self.pos_embed[:length], self.pos_embed[self.context_length:self.context_length + 1]])
        h = torch.cat([caption, z_t[:, None]], dim=1) + pos  # [B, P, W]
        return h, torch.cat([caption_mask, caption_mask.new_ones(b, 1)], dim=1)

    def _suffix(self, x: Tensor, t: Tensor) -> Tensor:
        """The rows [timestep, noised z_i, learned query] with position embeddings: [B, 3, W]."""
        time = self.time_mlp(timestep_embedding(t, self.width).to(x.dtype))  # [B, W]
        h = torch.stack([time, self.x_proj(x), self.query.to(x.dtype).expand(x.shape[0], -1)], dim=1)
        return h + self.pos_embed[self.context_length + 1:]  # [B, 3, W]

    def forward(self, x: Tensor, t: Tensor, text_embed: Tensor, text_tokens: Tensor, text_mask: Tensor,
                cond_drop_mask: Tensor | None = None) -> Tensor:
        """Predict the clean (scaled) image embedding.

        :param x: [B, D] noised image embedding x_t (diffusion space).
        :param t: [B] int64 timesteps of the original 1000-step chain.
        :param text_embed: [B, D] unit-norm CLIP text embedding z_t.
        :param text_tokens: [B, ctx, W_t] caption token encodings, ctx ≤ context_length.
        :param text_mask: [B, ctx] bool, True for real caption tokens.
        :param cond_drop_mask: [B] bool, True where the caption is replaced by the learned null (guidance).
        :return: [B, D] predicted x₀ (× embed_scale).
        """
        prefix, keys = self._prefix(text_embed, text_tokens, text_mask, cond_drop_mask)  # [B, P, W], [B, P]
        h = torch.cat([prefix, self._suffix(x, t)], dim=1)  # [B, S, W]
        mask = attention_mask(torch.cat([keys, keys.new_ones(keys.shape[0], 3)], dim=1), h.shape[1])
        for block in self.blocks[:-1]:
            h = self._block(block, h, mask)  # [B, S, W]
        h = self._block(self.blocks[-1], h, mask, last_only=True)  # [B, 1, W]: the query row
        return self.out(self.ln_out(h[:, 0]))  # [B, D]

    def hidden_states(self, x: Tensor, t: Tensor, text_embed: Tensor, text_tokens: Tensor, text_mask: Tensor,
                      cond_drop_mask: Tensor | None = None) -> Tensor:
        """Final states of every position (``forward`` computes the query row only): [B, L + 4, W]."""
        prefix, keys = self._prefix(text_embed, text_tokens, text_mask, cond_drop_mask)
        h = torch.cat([prefix, self._suffix(x, t)], dim=1)  # [B, S, W]
        mask = attention_mask(torch.cat([keys, keys.new_ones(keys.shape[0], 3)], dim=1), h.shape[1])
        for block in self.blocks:
            h = self._block(block, h, mask)
        return self.ln_out(h)

    # ---- sampling with a cached caption prefix -------------------------------------------------------

    def encode_prefix(self, text_embed: Tensor, text_tokens: Tensor, text_mask: Tensor,
                      cond_drop_mask: Tensor | None = None) -> dict[str, Any]:
        """Every block's keys and values of the [caption, z_t] rows, which no later row changes (causal mask).

        :return: ``{"kv": [(k, v) [B, H, P, hd]] per block, "keys": [B, P] bool}`` for :meth:`forward_cached`.
        """
        h, keys = self._prefix(text_embed, text_tokens, text_mask, cond_drop_mask)  # [B, P, W]
        mask = attention_mask(keys, h.shape[1])
        kvs = []
        for block in self.blocks:
            h, kv = block(h, mask)
            kvs.append(kv)
        return {"kv": kvs, "keys": keys}

    def forward_cached(self, x: Tensor, t: Tensor, prefix: dict[str, Any]) -> Tensor:
        """``forward`` for a batch whose conditioning was encoded once by :meth:`encode_prefix` (same rows).

        :return: [B, D] predicted x₀ (× embed_scale).
        """
        h = self._suffix(x, t)  # [B, 3, W]
        keys = prefix["keys"]
        mask = attention_mask(torch.cat([keys, keys.new_ones(keys.shape[0], 3)], dim=1), 3)  # [B, 1, 3, P + 3]
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            h, _ = block(h, mask, past=prefix["kv"][i], last_only=i == last)
        return self.out(self.ln_out(h[:, 0]))  # [B, D]

    def with_cached_prefix(self) -> Callable[..., Tensor]:
        """A callable with ``forward``'s signature for ONE fixed conditioning (one sampling run): the prefix is
        encoded at the first call and reused, so each later step costs 3 rows instead of L + 4."""
        cache: dict[str, Any] = {}

        def model(x: Tensor, t: Tensor, text_embed: Tensor, text_tokens: Tensor, text_mask: Tensor,
                  cond_drop_mask: Tensor | None = None) -> Tensor:
            if not cache:
                cache.update(self.encode_prefix(text_embed, text_tokens, text_mask, cond_drop_mask))
            return self.forward_cached(x, t, cache)

        return model


def attention_mask(keys: Tensor, rows: int) -> Tensor:
    """Causal AND key-padding mask for the last ``rows`` positions of a sequence.

    A padded position still attends to itself, so no row is fully masked (SDPA would return NaN for it);
    no other row attends to it.

    :param keys: [B, K] bool, True for real positions (all K positions, earlier ones included).
    :return: [B, 1, rows, K] bool, True = may attend.
    """
    k = keys.shape[1]
    row = torch.arange(k - rows, k, device=keys.device)[:, None]  # [rows, 1] absolute positions
    col = torch.arange(k, device=keys.device)[None]  # [1, K]
    return (col <= row) & (keys[:, None, None, :] | (col == row))
