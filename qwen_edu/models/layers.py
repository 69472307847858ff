"""The building blocks of a dense Qwen decoder, each small enough to rebuild by hand in a notebook.

Module and parameter names equal the Hugging Face checkpoint keys (``self_attn.q_proj``,
``mlp.gate_proj``, ``input_layernorm`` ...), so loading a Qwen2-layout checkpoint is a plain mapping.
Numerics follow HF Qwen2 op for op (see reference §1 and §13): RMSNorm normalises in fp32 and casts
back *before* the weight multiply, the eager softmax runs in fp32, masks add ``finfo.min``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qwen_edu.models.config import QwenConfig
from qwen_edu.models.long_context_attention import (
    DualChunk,
    dual_chunk_attention,
    logn_scale,
    rotate_dca_keys,
    window_mask,
)
from qwen_edu.models.rope import apply_rotary_pos_emb

__all__ = [
    "RMSNorm",
    "ZeroCenteredRMSNorm",
    "MLP",
    "KVCache",
    "Attention",
    "DecoderLayer",
    "repeat_kv",
    "eager_attention",
    "causal_mask",
]


class RMSNorm(nn.Module):
    """Root-mean-square norm: ``x / rms(x) * weight``, no mean subtraction and no bias.

    The statistics are computed in fp32 for accuracy; the result is cast back to the input dtype
    *before* multiplying by the weight, which is what the reference does (so in bf16 the multiply is a
    bf16 multiply -- doing it in fp32 would be "more accurate" but would not match).
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(in_dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class ZeroCenteredRMSNorm(RMSNorm):
    """Qwen3-Next's norm: ``x / rms(x) * (1 + weight)``, with the weight stored as an offset from 1.

    The weight starts at zero (so the norm starts as the identity scale) and weight decay pulls it
    towards a gain of 1 rather than 0. Unlike :class:`RMSNorm`, the multiply by ``1 + weight`` runs in
    fp32 *before* the cast back to the input dtype (HF ``Qwen3NextRMSNorm``); in bf16 the two orders
    give different bits.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__(dim, eps)
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.to(torch.float32))).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``. The gate decides how much of ``up`` passes."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[B, n_kv, L, d] -> [B, n_kv * n_rep, L, d]``: query head h reads kv head ``h // n_rep`` (GQA)."""
    if n_rep == 1:
        return x
    b, n_kv, length, d = x.shape
    return x[:, :, None].expand(b, n_kv, n_rep, length, d).reshape(b, n_kv * n_rep, length, d)


def causal_mask(q_len: int, kv_len: int, dtype: torch.dtype, device: torch.device | str | None = None,
                padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Additive mask ``[B or 1, 1, q_len, kv_len]``: 0 where a query may look, ``finfo(dtype).min`` elsewhere.

    The queries are the *last* ``q_len`` positions (bottom-right alignment), so the same mask serves
    prefill, chunked prefill on top of a cache and single-token decoding. ``padding_mask [B, kv_len]``
    (1 = real token) additionally hides padding keys. The reference uses ``finfo.min`` rather than
    ``-inf`` so that a fully masked row (a padding query) gives a uniform softmax instead of NaN.
    """
    past = kv_len - q_len
    q_pos = torch.arange(past, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None]  # [1, 1, q, kv]
    if padding_mask is not None:
        allowed = allowed & padding_mask[:, None, None, :kv_len].to(device=device, dtype=torch.bool)
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    scale: float) -> torch.Tensor:
    """Explicit attention, op for op like HF's eager path: ``softmax(q k^T * scale + mask) v``.

    ``q [B, H, L, d]``, ``k, v [B, n_kv, S, d]``. The softmax is computed in fp32 and cast back.
    """
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


class KVCache:
    """Rotated keys and values of every layer, kept so each new token costs one row, not a recompute.

    Storage is preallocated in chunks of ``chunk`` positions and grown by doubling, so appending a
    token is amortised O(1) (no ``torch.cat`` of the whole history every step). ``update`` returns
    views of the filled part. Layout is ``[B, n_kv_heads, S, head_dim]``, as in HF.
    """

    def __init__(self, num_layers: int, chunk: int = 256) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers
        self.chunk = chunk

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of cached positions (of layer ``layer_idx``)."""
        return self.lengths[layer_idx]

    def __len__(self) -> int:
        return self.lengths[0]

    def crop(self, length: int) -> None:
        """Forget every position after the first ``length`` (e.g. rejected speculative drafts)."""
        self.lengths = [min(n, length) for n in self.lengths]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k, v [B, n_kv, L, d]`` and return all keys and values so far."""
        start = self.lengths[layer_idx]
        end = start + k.shape[2]
        buf_k, buf_v = self.keys[layer_idx], self.values[layer_idx]
        if buf_k is None or buf_v is None or end > buf_k.shape[2]:
            capacity = max(end, 2 * (buf_k.shape[2] if buf_k is not None else 0))
            capacity = math.ceil(capacity / self.chunk) * self.chunk
            new_k = k.new_empty(k.shape[0], k.shape[1], capacity, k.shape[3])
            new_v = v.new_empty(v.shape[0], v.shape[1], capacity, v.shape[3])
            if buf_k is not None and buf_v is not None and start:
                new_k[:, :, :start] = buf_k[:, :, :start]
                new_v[:, :, :start] = buf_v[:, :, :start]
            self.keys[layer_idx], self.values[layer_idx] = buf_k, buf_v = new_k, new_v
        buf_k[:, :, start:end] = k
        buf_v[:, :, start:end] = v
        self.lengths[layer_idx] = end
        return buf_k[:, :, :end], buf_v[:, :, :end]


class Attention(nn.Module):
    """Causal self-attention with q/k/v bias, RoPE, grouped-query heads and an optional KV cache.

    ``attn_implementation="eager"`` spells attention out (see :func:`eager_attention`);
    ``"sdpa"`` calls ``F.scaled_dot_product_attention``, which is faster and equal up to rounding.
    ``logn_seq_length`` switches on Qwen-1's logN query scaling (reference §5.5).
    ``qk_norm`` (a norm class such as :class:`RMSNorm` or :class:`ZeroCenteredRMSNorm`) adds
    ``q_norm``/``k_norm`` over each head's features before RoPE (Qwen3, Qwen3-Next): bounded q and k
    keep the attention logits from growing. ``output_gate=True`` (Qwen3-Next) doubles ``q_proj``: per
    head, ``hd`` query rows then ``hd`` gate rows, and the attention output is multiplied by
    ``sigmoid(gate)`` before ``o_proj``, so a head can switch itself off for a token. Two more
    context-extension switches are plain attributes, set per layer by
    :func:`qwen_edu.context_extension.extend_context`: ``sliding_window`` (attend to the last N keys only)
    and ``dual_chunk`` (Dual Chunk Attention, with or without a KV cache).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, qkv_bias: bool = True, o_bias: bool = False,
                 layer_idx: int = 0, attn_implementation: str = "sdpa",
                 logn_seq_length: int | None = None, qk_norm: type[RMSNorm] | None = None,
                 norm_eps: float = 1e-6, output_gate: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = head_dim or hidden_size // num_heads
        self.scale = self.head_dim**-0.5
        self.layer_idx = layer_idx
        self.attn_implementation = attn_implementation
        self.logn_seq_length = logn_seq_length
        self.sliding_window: int | None = None
        self.dual_chunk: DualChunk | None = None
        self.output_gate = output_gate
        q_rows = num_heads * self.head_dim * (2 if output_gate else 1)
        self.q_proj = nn.Linear(hidden_size, q_rows, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=o_bias)
        if qk_norm is not None:
            self.q_norm = qk_norm(self.head_dim, norm_eps)
            self.k_norm = qk_norm(self.head_dim, norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, L, hidden]`` -> ``[B, L, hidden]``.

        ``attention_mask`` is an additive ``[B|1, 1, L, S]`` mask, or ``None`` for "plain causal".
        """
        b, length, _ = x.shape
        gate = None
        if self.output_gate:  # per head: [query (hd) | gate (hd)]
            q, gate = self.q_proj(x).view(b, length, -1, 2 * self.head_dim).chunk(2, dim=-1)
            q, gate = q.transpose(1, 2), gate.reshape(b, length, -1)
        else:
            q = self.q_proj(x).view(b, length, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, length, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, length, -1, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if self.dual_chunk is not None:
            return self._dual_chunk_forward(q, k, v, attention_mask, cache, position_ids, gate)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)  # before caching: the cache holds rotated keys
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        kv_len = k.shape[2]
        if self.logn_seq_length is not None and kv_len > self.logn_seq_length and position_ids is not None:
            q = q * self._logn(position_ids).to(q.dtype)

        if attention_mask is None and length > 1 and (self.attn_implementation == "eager" or kv_len != length):
            attention_mask = causal_mask(length, kv_len, q.dtype, q.device)
        if self.sliding_window is not None and kv_len > self.sliding_window:
            window = window_mask(length, kv_len, self.sliding_window, q.dtype, q.device)
            attention_mask = window if attention_mask is None else torch.minimum(attention_mask, window)
        if self.attn_implementation == "eager":
            out = eager_attention(q, k, v, attention_mask, self.scale)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attention_mask, is_causal=attention_mask is None and length > 1,
                scale=self.scale, enable_gqa=self.num_kv_heads != self.num_heads,
            )
        return self._output(out, gate)

    def _output(self, out: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """Heads ``[B, H, L, d]`` -> ``o_proj(concat(heads) * sigmoid(gate))`` (no gate: plain ``o_proj``)."""
        b, _, length, _ = out.shape
        out = out.transpose(1, 2).reshape(b, length, -1)
        if gate is not None:
            out = out * torch.sigmoid(gate)
        return self.o_proj(out)

    def _logn(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Qwen-1 logN factor per query, ``[B, 1, L, 1]`` (see :func:`logn_scale`)."""
        assert self.logn_seq_length is not None
        return logn_scale(position_ids, self.logn_seq_length)[:, None, :, None]

    def _dual_chunk_forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            attention_mask: torch.Tensor | None, cache: KVCache | None,
                            position_ids: torch.Tensor | None, gate: torch.Tensor | None = None) -> torch.Tensor:
        """Dual Chunk Attention, for a whole sequence or step by step on top of a KV cache.

        Keys are rotated to their DCA position ``p mod chunk_len`` (which depends on ``p`` alone) and
        cached in that form; queries are rotated at attention time (see :func:`dual_chunk_attention`).
        Positions must be the plain ``past + arange(L)``: DCA here supports neither padding nor
        custom position ids.
        """
        assert self.dual_chunk is not None
        settings = self.dual_chunk
        b, _, length, _ = q.shape
        past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        if position_ids is not None:
            expected = torch.arange(past, past + length, device=position_ids.device)
            if not bool((position_ids == expected).all()):
                raise NotImplementedError("Dual Chunk Attention here needs positions past + arange(L) in every row "
                                          "(no left padding, no custom position_ids)")
        k = rotate_dca_keys(k, past, settings.inv_freq, settings.chunk_size, settings.local_size,
                            settings.attention_scaling)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if attention_mask is not None:  # the plain causal mask of the eager path is fine; padding is not
            causal = causal_mask(length, k.shape[2], attention_mask.dtype, attention_mask.device)
            if not torch.equal(attention_mask, causal.expand_as(attention_mask)):
                raise NotImplementedError("Dual Chunk Attention here does not support padding masks")
        out = dual_chunk_attention(q, k, v, settings.inv_freq, settings.chunk_size, settings.local_size,
                                   scale=self.scale, attention_scaling=settings.attention_scaling,
                                   keys_rotated=True)
        return self._output(out, gate)


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: ``h = x + attn(norm(x)); y = h + mlp(norm(h))``.

    The Qwen generations differ *inside* this block, so each difference is an option, chosen per layer:

    * ``mlp`` replaces the dense SwiGLU by any module mapping ``[B, L, H] -> [B, L, H]`` (a sparse MoE
      block in the MoE models); by default the layer builds the dense :class:`MLP` from the config.
    * ``qk_norm`` (a norm class) adds per-head ``q_norm``/``k_norm`` before RoPE (Qwen3). By default it
      is :class:`RMSNorm` when the config has ``qk_norm=True`` (the Qwen3 configs) and none otherwise.
    * ``qkv_bias`` / ``o_bias`` override the config's bias flags (Qwen2: q/k/v bias; Qwen3: none).
    """

    def __init__(self, config: QwenConfig, layer_idx: int = 0, mlp: nn.Module | None = None, *,
                 qk_norm: type[RMSNorm] | None = None, qkv_bias: bool | None = None,
                 o_bias: bool | None = None) -> None:
        super().__init__()
        if qk_norm is None and getattr(config, "qk_norm", False):
            qk_norm = RMSNorm
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(
            config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
            qkv_bias=config.qkv_bias if qkv_bias is None else qkv_bias,
            o_bias=config.o_bias if o_bias is None else o_bias, layer_idx=layer_idx,
            attn_implementation=config.attn_implementation,
            logn_seq_length=config.seq_length if config.use_logn_attn else None,
            qk_norm=qk_norm, norm_eps=config.rms_norm_eps,
        )
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = mlp if mlp is not None else MLP(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, attention_mask, cache, position_ids)
        return h + self.mlp(self.post_attention_layernorm(h))
