"""Training-free context extension: the pieces Qwen used to read past its training length.

Qwen-1 trained at 2,048 tokens and read 8,192 at inference by combining NTK-aware RoPE (and its
dynamic variant, see :mod:`qwen_edu.models.rope`), LogN attention scaling and layer-wise window
attention; Qwen2 added YaRN and Dual Chunk Attention (DCA). This module holds what is not a RoPE
frequency rule:

- :func:`logn_scale`: the query multiplier ``log(p + 1) / log(T)`` beyond the training length ``T``.
- :func:`layer_window_sizes` and :func:`window_mask`: shorter attention windows in lower layers.
- :func:`dca_position_tables` and :func:`dual_chunk_attention`: DCA's remapped positions, so that no
  query-key distance ever exceeds ``chunk_size``, which is chosen no larger than the training length.

They live under ``qwen_edu.models`` because the attention layer uses them;
:mod:`qwen_edu.context_extension` switches them on for a whole model and measures the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qwen_edu.models.rope import RotaryEmbedding, rotate_half

__all__ = [
    "logn_scale",
    "layer_window_sizes",
    "window_mask",
    "DualChunk",
    "DualChunkTables",
    "dca_position_tables",
    "rotate_dca_keys",
    "dual_chunk_attention",
]


def logn_scale(positions: torch.Tensor, training_length: int) -> torch.Tensor:
    """Qwen-1's LogN factor per query position: ``log(p + 1) / log(T)`` once ``p + 1 > T``, else 1.

    Multiplying the query by it keeps the attention entropy from growing as more keys compete for
    the softmax. The result is float32 with the shape of ``positions``.
    """
    if training_length < 2:
        raise ValueError(f"training_length must be >= 2, got {training_length}")
    p1 = (positions + 1).to(torch.float32)
    return torch.where(p1 > training_length, torch.log(p1) / math.log(training_length), torch.ones_like(p1))


def layer_window_sizes(num_layers: int, smallest: int, largest: int, schedule: str = "linear") -> list[int]:
    """Per-layer attention windows, short in the lower layers and long in the upper ones.

    The Qwen report observed that lower layers are more sensitive to context extension than higher
    ones, and gave them shorter windows. ``schedule="linear"`` interpolates from ``smallest`` (layer 0)
    to ``largest`` (last layer); ``"step"`` gives the lower half ``smallest`` and the upper half
    ``largest``. A window at least as long as the sequence is full causal attention.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if smallest < 1:
        raise ValueError(f"window sizes must be >= 1 token, got smallest={smallest}")
    if largest < smallest:
        raise ValueError(f"largest window {largest} is smaller than the smallest {smallest}")
    if schedule == "step":
        return [smallest if i < num_layers // 2 else largest for i in range(num_layers)]
    if schedule != "linear":
        raise ValueError(f"unknown window schedule {schedule!r}; use 'linear' or 'step'")
    if num_layers == 1:
        return [largest]
    return [round(smallest + (largest - smallest) * i / (num_layers - 1)) for i in range(num_layers)]


def window_mask(q_len: int, kv_len: int, window: int | None, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Additive causal mask ``[1, 1, q_len, kv_len]`` that also hides keys more than ``window - 1`` back.

    Key ``j`` is visible to the query at (bottom-right aligned) position ``i`` when
    ``i - window < j <= i``: the last ``window`` tokens including the query's own, as in the
    reference's sliding-window attention. ``window=None`` is plain causal attention; a window longer
    than the sequence is an error (it is almost always a mix-up of window and sequence length).
    """
    if q_len > kv_len:
        raise ValueError(f"q_len={q_len} exceeds kv_len={kv_len}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 token (or None for full attention), got {window}")
    if window is not None and window > kv_len:
        raise ValueError(f"a window of {window} tokens is longer than the {kv_len}-token sequence; "
                         "pass window=None for full causal attention")
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[None, None]


@dataclass(frozen=True)
class DualChunk:
    """DCA switched on for one attention layer: the chunk sizes and the model's rotary embedding.

    The frequencies are *read from* ``rotary`` at every forward pass, not copied when DCA is switched
    on: rules that change them with the input length (HF ``dynamic`` NTK, Qwen-1's ``qwen1_ntk``) run
    in the model's rotary embedding before the layers, and DCA must rotate with what they chose.
    """

    chunk_size: int
    local_size: int
    rotary: RotaryEmbedding

    @property
    def inv_freq(self) -> torch.Tensor:
        """The rotary embedding's current fp32 inverse frequencies ``[head_dim / 2]``."""
        return self.rotary.inv_freq

    @property
    def attention_scaling(self) -> float:
        """The factor on cos and sin (YaRN's ``0.1 ln s + 1``; 1 for the other rules)."""
        return float(self.rotary.attention_scaling)


@dataclass(frozen=True)
class DualChunkTables:
    """DCA's position tables for a sequence (all ``[seq_len]`` long integer tensors).

    Chunks are ``chunk_len = chunk_size - local_size`` tokens long (not ``chunk_size``).

    - ``key``: every key sits at ``p mod chunk_len``, so keys only ever use positions
      ``0 .. chunk_len - 1``.
    - ``intra``: a query attending inside its own chunk uses the same numbering, so those distances are
      the true ones.
    - ``successive``: a query attending to the previous chunk sits at ``p mod chunk_len + chunk_len``,
      clamped at ``chunk_size``. Without the clamp its distances would be the true ones; with it they
      stay true for the queries with ``p mod chunk_len <= local_size`` and are shortened, never beyond
      ``chunk_size``, for the later queries of a chunk.
    - ``inter``: a query attending to any earlier chunk sits at one fixed position,
      ``min(2 * chunk_len - 1, chunk_size)``: the ``successive`` value of a chunk's last token, as in
      vLLM's tables. It is *not* the last position of the training window (``T - 1``); it only
      guarantees that every such distance lies between ``1`` and ``chunk_size``.
    """

    chunk_size: int
    local_size: int
    key: torch.Tensor
    intra: torch.Tensor
    successive: torch.Tensor
    inter: torch.Tensor

    @property
    def chunk_len(self) -> int:
        return self.chunk_size - self.local_size


def dca_position_tables(seq_len: int, chunk_size: int, local_size: int,
                        device: torch.device | str | None = None) -> DualChunkTables:
    """Position ids for Dual Chunk Attention (An et al., 2024), laid out as vLLM's Qwen2 backend does.

    ``chunk_size`` is the largest query-key distance DCA may produce (choose it no larger than the
    training length); ``local_size`` (< ``chunk_size``) is the room left above each chunk so that the
    first ``local_size + 1`` queries of a chunk see the previous chunk at its true distances. Chunks
    are therefore ``chunk_len = chunk_size - local_size`` tokens long.
    """
    if not 0 <= local_size < chunk_size:
        raise ValueError(f"need 0 <= local_size < chunk_size, got local_size={local_size}, chunk_size={chunk_size}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    chunk_len = chunk_size - local_size
    positions = torch.arange(seq_len, device=device)
    within = positions % chunk_len
    return DualChunkTables(
        chunk_size=chunk_size,
        local_size=local_size,
        key=within,
        intra=within,
        successive=(within + chunk_len).clamp(max=chunk_size),
        inter=torch.full_like(within, min(2 * chunk_len - 1, chunk_size)),
    )


def _rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float) -> torch.Tensor:
    """RoPE (half-split) of ``x [B, H, L, d]`` at integer ``positions [L]``, computed in fp32.

    ``scaling`` multiplies cos and sin, as :class:`~qwen_edu.models.rope.RotaryEmbedding` does for
    YaRN: applied to queries and keys, it scales every logit by ``scaling ** 2``.
    """
    angles = positions.to(torch.float32)[:, None] * inv_freq.to(x.device)[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos() * scaling, emb.sin() * scaling
    x32 = x.to(torch.float32)
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


def rotate_dca_keys(k: torch.Tensor, start: int, inv_freq: torch.Tensor, chunk_size: int, local_size: int,
                    attention_scaling: float = 1.0) -> torch.Tensor:
    """Keys ``[B, H_kv, L, d]`` at absolute positions ``start .. start + L - 1``, rotated to DCA's key
    positions ``p mod chunk_len``.

    A key's DCA position depends on its own position only, never on the query, so rotated keys can be
    cached exactly like ordinary rotated keys: this is what a DCA layer stores in its KV cache.
    """
    dca_position_tables(1, chunk_size, local_size)  # validates the sizes
    positions = torch.arange(start, start + k.shape[-2], device=k.device) % (chunk_size - local_size)
    return _rotate(k, positions, inv_freq, attention_scaling)


def dual_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inv_freq: torch.Tensor,
                         chunk_size: int, local_size: int, scale: float | None = None,
                         attention_scaling: float = 1.0, *, keys_rotated: bool = False) -> torch.Tensor:
    """Causal attention with DCA's positions; ``q`` is *not* yet rotated.

    ``k, v [B, H_kv, S, d]`` hold all ``S`` positions so far; ``q [B, H, L, d]`` holds the *last* ``L`` of
    them (``L = S`` for a whole sequence, ``L = 1`` for a decoding step on top of a cache).
    ``keys_rotated=True`` says ``k`` already went through :func:`rotate_dca_keys` (the cached form).

    The queries are processed one chunk at a time. A query in chunk ``c`` is rotated three times:
    at its ``intra`` position for the keys of chunk ``c`` (causal), at its ``successive`` position for
    chunk ``c - 1``, and at the ``inter`` position for chunks ``0 .. c - 2``
    (see :class:`DualChunkTables`). The three blocks of scores are concatenated and go through *one*
    softmax, so this is exact attention with remapped positions; the work is that of one causal
    attention over ``S`` keys plus two extra rotations of the queries.
    """
    batch, heads, length, dim = q.shape
    total = k.shape[-2]
    if v.shape[-2] != total or length > total:
        raise ValueError(f"need q length <= k length == v length, got q {length}, k {total}, v {v.shape[-2]}")
    if heads % k.shape[1]:
        raise ValueError(f"{heads} query heads cannot share {k.shape[1]} key/value heads")
    dca_position_tables(1, chunk_size, local_size)  # validates the sizes
    chunk_len = chunk_size - local_size
    scale = dim**-0.5 if scale is None else scale
    if not keys_rotated:
        k = rotate_dca_keys(k, 0, inv_freq, chunk_size, local_size, attention_scaling)
    n_rep = heads // k.shape[1]
    k = k.repeat_interleave(n_rep, dim=1).float()
    v = v.repeat_interleave(n_rep, dim=1)
    start = total - length  # absolute position of q's first row

    outputs = []
    row = start
    while row < total:
        chunk = row // chunk_len
        first = chunk * chunk_len
        end = min(total, first + chunk_len)  # this block: query positions row .. end - 1
        positions = torch.arange(row, end, device=q.device)
        within = positions % chunk_len
        q_block = q[:, :, row - start : end - start]
        parts = []
        if chunk >= 2:  # inter: one fixed position for every query
            inter = torch.full_like(within, min(2 * chunk_len - 1, chunk_size))
            parts.append(_rotate(q_block, inter, inv_freq, attention_scaling).float()
                         @ k[:, :, : first - chunk_len].transpose(-1, -2))
        if chunk >= 1:  # successive: shifted up by chunk_len, clamped at chunk_size
            successive = (within + chunk_len).clamp(max=chunk_size)
            parts.append(_rotate(q_block, successive, inv_freq, attention_scaling).float()
                         @ k[:, :, first - chunk_len : first].transpose(-1, -2))
        intra = _rotate(q_block, within, inv_freq, attention_scaling).float() @ k[:, :, first:end].transpose(-1, -2)
        causal = positions[:, None] >= torch.arange(first, end, device=q.device)[None, :]
        parts.append(intra.masked_fill(~causal, float("-inf")))
        probs = (torch.cat(parts, dim=-1) * scale).softmax(dim=-1).to(v.dtype)
        outputs.append(probs @ v[:, :, :end])
        row = end
    return torch.cat(outputs, dim=2)
