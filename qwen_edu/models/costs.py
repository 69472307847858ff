"""What a Qwen model costs, from its config alone: parameters, FLOPs per token, KV-cache and weight memory.

Works for dense configs (:class:`~qwen_edu.models.config.QwenConfig`) and MoE configs alike (any
config with ``num_experts`` / ``num_experts_per_tok`` / ``moe_intermediate_size`` and optionally a
shared expert, like :class:`~qwen_edu.models.qwen2_moe.Qwen2MoeConfig`); nothing is allocated.

Conventions (the usual back-of-the-envelope ones):

* a matmul with an ``[out, in]`` weight costs ``2 * out * in`` FLOPs per token (a multiply and an add);
* forward FLOPs per token = ``2 *`` (matmul weights one token *activates*: attention projections,
  the dense MLP or the router + its ``k`` routed experts + the shared expert, and the LM head; the
  input embedding is a lookup) ``+ 4 * layers * heads * head_dim * context`` for ``q k^T`` and
  ``p v`` over ``context`` cached keys;
* training costs three forwards (the backward pass is two matmuls per forward matmul);
* norms, softmaxes, activations, RoPE and biases are lower-order terms and are left out of FLOPs
  (biases and norm weights *are* counted as parameters).

The public API is four functions: :func:`count_parameters`, :func:`flops_per_token`,
:func:`kv_cache_bytes_per_token` and :func:`memory_estimate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ParameterCounts", "MemoryEstimate", "count_parameters", "flops_per_token",
           "kv_cache_bytes_per_token", "memory_estimate"]


@dataclass(frozen=True)
class ParameterCounts:
    """``total``: every parameter (a tied head once); ``activated``: those one token uses (of the
    routed experts only its ``k``); ``embedding``: input embedding plus an untied LM head."""

    total: int
    activated: int
    embedding: int

    @property
    def total_non_embedding(self) -> int:
        return self.total - self.embedding

    @property
    def activated_non_embedding(self) -> int:
        return self.activated - self.embedding


def _attention_matmul(c: Any) -> int:
    """Weights of q, k, v and o projections of one layer."""
    q = c.num_attention_heads * c.head_dim
    kv = c.num_key_value_heads * c.head_dim
    return c.hidden_size * (q + 2 * kv) + q * c.hidden_size


def _attention_vectors(c: Any) -> int:
    """Biases of one attention block, its q/k norm weights (Qwen3: one ``[head_dim]`` vector each) and the
    layer's two RMSNorm weights."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    return (q + 2 * kv) * bool(getattr(c, "qkv_bias", True)) + c.hidden_size * bool(getattr(c, "o_bias", False)) \
        + 2 * c.head_dim * bool(getattr(c, "qk_norm", False)) + 2 * c.hidden_size


def _is_sparse(c: Any, layer: int) -> bool:
    if not getattr(c, "num_experts", 0):
        return False
    rule = getattr(c, "is_sparse_layer", None)
    return bool(rule(layer)) if rule is not None else True


def _mlp(c: Any, layer: int) -> tuple[int, int, int]:
    """``(total parameters, activated parameters, activated matmul weights)`` of one layer's MLP."""
    h = c.hidden_size
    if not _is_sparse(c, layer):
        width = c.intermediate_size
        bias = (2 * width + h) if getattr(c, "mlp_bias", False) else 0
        return 3 * h * width + bias, 3 * h * width + bias, 3 * h * width
    experts, k, width = c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size
    shared = getattr(c, "shared_expert_intermediate_size", 0) or 0
    router, expert = experts * h, 3 * h * width
    shared_params = 3 * h * shared + h if shared else 0  # the shared SwiGLU plus its [1, H] sigmoid gate
    total = router + experts * expert + shared_params
    active = router + k * expert + shared_params
    return total, active, active


def count_parameters(config: Any) -> ParameterCounts:
    """Exact parameter counts of the model ``config`` describes (equal to ``model.num_parameters()``)."""
    c = config
    embedding = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    total = activated = embedding + c.hidden_size  # + the final norm
    for layer in range(c.num_hidden_layers):
        attention = _attention_matmul(c) + _attention_vectors(c)
        mlp_total, mlp_active, _ = _mlp(c, layer)
        total += attention + mlp_total
        activated += attention + mlp_active
    return ParameterCounts(total=total, activated=activated, embedding=embedding)


def flops_per_token(config: Any, context: int = 0, *, training: bool = False) -> int:
    """Forward FLOPs for one token that attends to ``context`` keys (itself included); ``training``
    multiplies by 3. For a whole sequence of ``n`` tokens the mean context is ``(n + 1) / 2``."""
    c = config
    matmul = c.vocab_size * c.hidden_size  # LM head
    for layer in range(c.num_hidden_layers):
        matmul += _attention_matmul(c) + _mlp(c, layer)[2]
    attention = 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * context
    forward = 2 * matmul + attention
    return 3 * forward if training else forward


def _bytes(dtype: torch.dtype | str) -> int:
    if isinstance(dtype, str):
        from qwen_edu.models.config import dtype_from_str

        dtype = dtype_from_str(dtype) or torch.float32
    return torch.empty((), dtype=dtype).element_size()


def kv_cache_bytes_per_token(config: Any, dtype: torch.dtype | str = torch.bfloat16) -> int:
    """Bytes one token adds to the KV cache: keys and values of every layer's KV heads."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * _bytes(dtype)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of the weights and of the KV cache (activations and framework overhead not included)."""

    weights: int
    kv_cache: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache

    def gib(self) -> tuple[float, float, float]:
        """``(weights, kv_cache, total)`` in GiB."""
        return tuple(x / 2**30 for x in (self.weights, self.kv_cache, self.total))  # type: ignore[return-value]


def memory_estimate(config: Any, context_length: int, batch_size: int = 1, *,
                    weight_dtype: torch.dtype | str = torch.bfloat16,
                    cache_dtype: torch.dtype | str | None = None) -> MemoryEstimate:
    """Memory to serve ``batch_size`` sequences of ``context_length`` tokens: all weights (an MoE
    keeps every expert resident, not just the activated ones) plus the KV cache."""
    weights = count_parameters(config).total * _bytes(weight_dtype)
    cache = kv_cache_bytes_per_token(config, cache_dtype or weight_dtype) * context_length * batch_size
    return MemoryEstimate(weights=weights, kv_cache=cache)
