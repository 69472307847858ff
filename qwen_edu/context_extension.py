"""Reading past the training length: switch context-extension methods on, and measure them.

:func:`extend_context` returns a copy of a dense Qwen model with any combination of

- a RoPE scaling rule (``"linear"`` position interpolation, static ``"ntk"``, ``"dynamic"`` NTK as in
  transformers, Qwen-1's ``"qwen1_ntk"`` with alpha fixed at prefill, ``"yarn"``),
- Qwen-1's LogN attention scaling,
- layer-wise window attention (shorter windows in lower layers),
- Dual Chunk Attention,

and :func:`per_position_nll` measures the loss at every position of long sequences, the curve that
shows whether the model still uses (or at least survives) the extra context. The attention-level
pieces live in :mod:`qwen_edu.models.long_context_attention` and are re-exported here.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qwen_edu.models.long_context_attention import (
    DualChunk,
    DualChunkTables,
    dca_position_tables,
    dual_chunk_attention,
    layer_window_sizes,
    logn_scale,
    window_mask,
)
from qwen_edu.models.rope import ROPE_INIT_FUNCTIONS, RotaryEmbedding

__all__ = [
    "DualChunk",
    "DualChunkTables",
    "dca_position_tables",
    "dual_chunk_attention",
    "extend_context",
    "layer_window_sizes",
    "logn_scale",
    "per_position_nll",
    "window_mask",
]


def extend_context(model: nn.Module, training_length: int, *, rope: str | None = None, factor: float = 1.0,
                   logn: bool = False, window_sizes: Sequence[int | None] | None = None,
                   dual_chunk: tuple[int, int] | None = None, **rope_options: Any) -> nn.Module:
    """A copy of ``model`` configured to read sequences longer than ``training_length``.

    Args:
        model: a dense Qwen causal LM from :mod:`qwen_edu.models` (left untouched).
        training_length: the context length the model was trained at (``T``).
        rope: ``None`` (keep plain RoPE), ``"linear"``, ``"ntk"``, ``"dynamic"``, ``"qwen1_ntk"`` or
            ``"yarn"``; ``factor`` is the extension factor (>= 1) for those that take one, and
            ``rope_options`` go into the ``rope_scaling`` dict (e.g. ``beta_fast`` for YaRN).
        logn: scale queries by ``log(p + 1) / log(T)`` beyond ``T`` (Qwen-1's LogN).
        window_sizes: one attention window per layer (``None`` = full attention), e.g. from
            :func:`layer_window_sizes`.
        dual_chunk: ``(chunk_size, local_size)`` to attend with Dual Chunk Attention (with or without a KV
            cache), rotating with whatever frequencies the ``rope`` rule gives (YaRN + DCA is Qwen2's
            recipe for 128K).
    """
    if training_length < 2:
        raise ValueError(f"training_length must be >= 2, got {training_length}")
    if factor < 1:
        raise ValueError(f"factor must be >= 1 (it extends the context), got {factor}")
    layers = model.model.layers
    if window_sizes is not None and len(window_sizes) != len(layers):
        raise ValueError(f"window_sizes has {len(window_sizes)} entries but the model has {len(layers)} layers")
    if window_sizes is not None and any(w is not None and w < 1 for w in window_sizes):
        raise ValueError(f"window sizes must be >= 1 token or None, got {list(window_sizes)}")
    if dual_chunk is not None:
        chunk_size, local_size = dual_chunk
        if chunk_size > training_length:
            raise ValueError(f"DCA chunk_size {chunk_size} exceeds the training length {training_length}")
        dca_position_tables(1, chunk_size, local_size)  # validates the sizes
        if window_sizes is not None or logn:
            raise ValueError("dual_chunk replaces the attention pattern; combine it with rope scaling only")

    extended = copy.deepcopy(model)
    old = extended.model.rotary_emb
    if rope is not None:
        if rope not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"unknown rope scaling {rope!r}; known: {sorted(ROPE_INIT_FUNCTIONS)}")
        scaling: dict[str, Any] = {"rope_type": rope, "factor": float(factor), **rope_options}
        if rope == "yarn":
            scaling.setdefault("original_max_position_embeddings", training_length)
        if rope == "qwen1_ntk":
            scaling["seq_length"] = training_length
        extended.model.rotary_emb = RotaryEmbedding(
            old.head_dim, old.rope_theta, scaling, max_position_embeddings=training_length,
            rotate_in_fp32=old.rotate_in_fp32,
        ).to(old.inv_freq.device)
    rotary = extended.model.rotary_emb
    for index, layer in enumerate(extended.model.layers):
        attention = layer.self_attn
        attention.logn_seq_length = training_length if logn else None
        attention.sliding_window = window_sizes[index] if window_sizes is not None else None
        if dual_chunk is not None:
            # A reference to the rotary embedding, not a copy of its frequencies: "dynamic" and
            # "qwen1_ntk" recompute them from the input length at every forward pass.
            attention.dual_chunk = DualChunk(dual_chunk[0], dual_chunk[1], rotary)
    return extended


@torch.inference_mode()
def per_position_nll(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Mean next-token negative log-likelihood at each position, over a batch of sequences.

    ``input_ids [N, L]`` -> ``[L - 1]``: entry ``t`` is the loss of predicting token ``t + 1`` from the
    first ``t + 1`` tokens, averaged over the ``N`` sequences. Runs the whole sequence in one pass per
    batch (no cache), so every method sees exactly the same inputs.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [num_sequences, length >= 2], got {tuple(input_ids.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    total = torch.zeros(input_ids.shape[1] - 1, dtype=torch.float64)
    for start in range(0, input_ids.shape[0], batch_size):
        batch = input_ids[start : start + batch_size].to(device)
        logits = model(batch).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")  # [b, L-1]
        total += nll.sum(dim=0).double().cpu()
    return (total / input_ids.shape[0]).float()
