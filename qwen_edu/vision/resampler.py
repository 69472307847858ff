"""Qwen-VL's position-aware adapter: 256 learned queries read the ViT's patch features in one cross-attention.

The ViT of Qwen-VL produces one feature per 14x14 patch: 1,024 of them for a 448x448 image. Feeding all
of them to the 7B language model would cost 1,024 sequence positions per image, so Qwen-VL compresses
them with a single cross-attention layer (``attn_pool`` in the checkpoint, reference §11.3 step 5):

* 256 learned query vectors (``query``, normalised by ``ln_q``) ask the questions;
* the patch features, projected to the LLM width (``kv_proj``) and normalised (``ln_kv``), answer;
* a **fixed 2D sin-cos table** (``pos_embed``) is added to the queries (on their 16x16 grid) and to
  the keys (the same table resized bicubically to the patch grid), but *not* to the values. That
  tells each query where a patch sits, so the 256 outputs keep the image's layout.

Three quirks of the reference code are kept exactly and each has a test:

1. The sin-cos table is **column first**: ``np.meshgrid(w, h)`` puts the column coordinate in the
   first half of the channels although the source comment says "h" (:func:`sincos_2d_table`).
2. Position tables are resized with ``F.interpolate(mode="bicubic", align_corners=False)`` **in fp32**
   and cast back (:func:`resize_position_table`); resizing in bf16 would give different numbers.
3. The attention is ``torch.nn.MultiheadAttention``'s: one packed ``in_proj_weight`` whose row blocks
   are q | k | v, an ``in_proj_bias`` and an ``out_proj`` (:class:`PackedMultiheadAttention` keeps those
   names, so the checkpoint keys load as they are).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["sincos_2d_table", "resize_position_table", "grid_of", "PackedMultiheadAttention", "Resampler"]


def sincos_2d_table(embed_dim: int, grid_size: int) -> torch.Tensor:
    """The fixed ``[grid_size**2, embed_dim]`` 2D sin-cos table of the resampler, in fp32.

    Row ``r * grid_size + c`` is grid point (row r, column c). Its first ``embed_dim/2`` channels encode
    the **column** c and the last half the row r; each half is ``[sin(p w_k), cos(p w_k)]`` with
    ``w_k = 10000 ** (-k / (embed_dim/4))``. Computed in float32, like the reference's numpy code.
    """
    if embed_dim % 4:
        raise ValueError(f"the 2D sin-cos table needs embed_dim divisible by 4, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    coords = torch.arange(grid_size, dtype=torch.float32)

    def encode(pos: torch.Tensor) -> torch.Tensor:  # [M] -> [M, embed_dim/2]
        angles = pos[:, None] * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    rows = coords.repeat_interleave(grid_size)  # r of point r*G + c
    cols = coords.repeat(grid_size)  # c of point r*G + c
    return torch.cat([encode(cols), encode(rows)], dim=1)


def grid_of(length: int) -> tuple[int, int]:
    """The square grid a flattened position table of ``length`` rows lives on (the reference's ``sqrt``)."""
    side = math.isqrt(length)
    if side * side != length:
        raise ValueError(f"a position table of {length} rows is not a square grid")
    return side, side


def resize_position_table(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize a ``[G*G, C]`` table on a square grid to ``grid = (h, w)``: bicubic, in fp32, cast back.

    This is the reference's ``get_abs_pos``: the table is viewed as a ``[1, C, G, G]`` image,
    interpolated with ``align_corners=False`` and flattened row-major again. If the grid already
    matches, the table is returned unchanged (no interpolation round trip).
    """
    if table.dim() != 2:
        raise ValueError(f"expected a [positions, channels] table, got shape {tuple(table.shape)}")
    src = grid_of(table.shape[0])
    if tuple(grid) == src:
        return table
    image = table.float().reshape(1, *src, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(image, size=tuple(grid), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).flatten(0, 2).to(table.dtype)


class PackedMultiheadAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameters and maths, written out.

    ``in_proj_weight [3D, D]`` holds the q, k and v projections as contiguous row blocks (each head's
    slice of a block is contiguous too), ``in_proj_bias [3D]`` likewise, then ``out_proj``. Batch-first
    tensors; ``attn_implementation="eager"`` computes the softmax explicitly in the input dtype (as
    the reference does), ``"sdpa"`` calls the fused kernel. ``need_weights`` also returns the
    head-averaged attention probabilities ``[B, Lq, Lk]``.
    """

    def __init__(self, embed_dim: int, num_heads: int, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        if num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be a positive multiple of num_heads={num_heads}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.attn_implementation = attn_implementation
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def _heads(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """Project ``x [B, L, D]`` with row block ``block`` (0=q, 1=k, 2=v) -> ``[B, heads, L, head_dim]``."""
        d = self.embed_dim
        rows = slice(block * d, (block + 1) * d)
        y = F.linear(x, self.in_proj_weight[rows], self.in_proj_bias[rows])
        return y.view(*x.shape[:2], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        q, k, v = self._heads(query, 0), self._heads(key, 1), self._heads(value, 2)
        weights = None
        if need_weights or self.attn_implementation == "eager":
            scores = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
            probs = scores.softmax(dim=-1)
            out = probs @ v
            weights = probs.mean(dim=1) if need_weights else None
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(query.shape[0], query.shape[1], self.embed_dim)
        return self.out_proj(out), weights


class Resampler(nn.Module):
    """``attn_pool``: ``n_queries`` learned queries cross-attend to the patch features (reference §11.3).

    ``forward(x [B, L, kv_dim], grid=(h, w)) -> [B, n_queries, embed_dim]``. ``kv_proj`` is a bias-free
    linear map from the ViT width to the LLM width, or the identity when both are equal (then the
    checkpoint has no ``kv_proj.weight``, as in the reference). LayerNorms use eps 1e-6.
    """

    def __init__(self, grid_size: int, embed_dim: int, num_heads: int, kv_dim: int | None = None,
                 eps: float = 1e-6, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        self.grid_size = grid_size
        self.num_queries = grid_size**2
        self.embed_dim = embed_dim
        # A frozen *parameter* (not a buffer) because the checkpoint stores it under attn_pool.pos_embed.
        self.pos_embed = nn.Parameter(sincos_2d_table(embed_dim, grid_size), requires_grad=False)
        self.query = nn.Parameter(torch.empty(self.num_queries, embed_dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.kv_proj: nn.Module = (nn.Linear(kv_dim, embed_dim, bias=False)
                                   if kv_dim is not None and kv_dim != embed_dim else nn.Identity())
        self.attn = PackedMultiheadAttention(embed_dim, num_heads, attn_implementation)
        self.ln_q = nn.LayerNorm(embed_dim, eps=eps)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=eps)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(features [B, Q, D], attention [B, Q, L] or None)``; ``grid`` defaults to square."""
        if x.dim() != 3:
            raise ValueError(f"the resampler expects patch features [batch, patches, width], got {tuple(x.shape)}")
        grid = grid if grid is not None else grid_of(x.shape[1])
        if grid[0] * grid[1] != x.shape[1]:
            raise ValueError(f"grid {grid} does not hold {x.shape[1]} patches")
        key_pos = resize_position_table(self.pos_embed, grid)
        kv = self.ln_kv(self.kv_proj(x))
        query = (self.ln_q(self.query) + self.pos_embed).expand(x.shape[0], -1, -1)
        return self.attn(query, kv + key_pos, kv, need_weights=need_weights)
