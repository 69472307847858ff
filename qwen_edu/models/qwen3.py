"""Qwen3 dense (``model_type: "qwen3"``): the Qwen2 decoder with three attention options changed.

What changed from Qwen2/Qwen2.5 (reference ``qwen_architectures.md`` §6), all inside the attention:

* **QK-norm instead of QKV bias.** ``q_norm`` and ``k_norm`` are RMSNorms over one head's features
  (one ``[head_dim]`` weight shared by all heads), applied after the projection and before RoPE. A
  normalised query or key has a bounded length, so an attention logit ``q.k / sqrt(d)`` can only grow
  through the norm weights -- not by the projections drifting to large norms, which is what makes
  long or high-learning-rate runs of unnormalised attention blow up.
* **No bias** on q/k/v (nor o): one ``attention_bias`` flag, false in every released model.
* **head_dim decoupled from the width**: ``head_dim`` (128 in every size) is a config field, and
  ``num_attention_heads * head_dim`` need not equal ``hidden_size`` (Qwen3-0.6B: 16 x 128 = 2048 query
  features from a 1024-wide residual stream).

Everything else -- RMSNorm, SwiGLU, RoPE, GQA, the KV cache, tied embeddings in the small sizes --
is the Qwen2 code: :class:`Qwen3ForCausalLM` *is* :class:`~qwen_edu.models.qwen2.Qwen2ForCausalLM`,
built from a :class:`Qwen3Config` whose options (``qk_norm``, no bias, explicit ``head_dim``) the
shared :class:`~qwen_edu.models.layers.DecoderLayer` reads. Checkpoint keys are the Qwen2 ones plus
``self_attn.q_norm.weight`` and ``self_attn.k_norm.weight``.

``qk_norm=False`` is a qwen_edu switch for experiments (a Qwen3 without QK-norm); a ``config.json``
then carries ``"qk_norm": false``, which transformers ignores.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from qwen_edu.models.config import QwenConfig
from qwen_edu.models.qwen2 import Qwen2ForCausalLM
from qwen_edu.models.registry import ModelEntry, register_model

__all__ = ["Qwen3Config", "Qwen3ForCausalLM", "FULL_ATTENTION", "SLIDING_ATTENTION", "attention_logit_stats"]

FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"


def read_qwen3_attention(config: Any, hf: dict[str, Any]) -> dict[str, Any]:
    """The Qwen3 attention fields of a ``config.json`` (``attention_bias``, ``qk_norm``) as config changes;
    also removes them from ``config.extra``. Shared by the dense and the MoE config."""
    extra = dict(config.extra)
    bias = bool(extra.pop("attention_bias", hf.get("attention_bias", False)))
    return dict(qkv_bias=bias, o_bias=bias, qk_norm=bool(extra.pop("qk_norm", True)), extra=extra)


def write_qwen3_attention(config: Any, out: dict[str, Any], architecture: str) -> dict[str, Any]:
    """Put the Qwen3 attention fields into a ``config.json`` dict (the inverse of :func:`read_qwen3_attention`)."""
    if config.qkv_bias != config.o_bias:
        raise ValueError(f"a {config.model_type} config.json has one attention_bias for q/k/v and o; "
                         f"got qkv_bias={config.qkv_bias}, o_bias={config.o_bias}")
    out.pop("qkv_bias", None)
    out.update(model_type=config.model_type, head_dim=config.head_dim, attention_bias=config.qkv_bias)
    if not config.qk_norm:
        out["qk_norm"] = False
    if "architectures" not in config.extra:
        out["architectures"] = [architecture]
    return out


@dataclass
class Qwen3Config(QwenConfig):
    """:class:`QwenConfig` with Qwen3's attention; the defaults are transformers' ``Qwen3Config`` ones.

    ``qkv_bias`` and ``o_bias`` mirror the single ``attention_bias`` flag of the checkpoint.
    ``layer_types[i]`` is ``"full_attention"`` or ``"sliding_attention"`` (only with
    ``use_sliding_window``, from layer ``max_window_layers`` on; off in every released model).
    """

    model_type: str = "qwen3"
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    head_dim: int | None = 128
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = True
    max_window_layers: int | None = 28
    layer_types: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.use_sliding_window:
            self.sliding_window = None
        if self.layer_types is None:
            start = self.max_window_layers if self.max_window_layers is not None else 0
            self.layer_types = [SLIDING_ATTENTION if self.sliding_window is not None and i >= start
                                else FULL_ATTENTION for i in range(self.num_hidden_layers)]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                             f"num_hidden_layers={self.num_hidden_layers}")
        unknown = sorted(set(self.layer_types) - {FULL_ATTENTION, SLIDING_ATTENTION})
        if unknown:
            raise ValueError(f"unknown layer_types {unknown}; expected {FULL_ATTENTION!r} or {SLIDING_ATTENTION!r}")

    def sliding_window_of(self, layer_idx: int) -> int | None:
        """The attention window of layer ``layer_idx`` (``None``: full causal attention)."""
        assert self.layer_types is not None
        return self.sliding_window if self.layer_types[layer_idx] == SLIDING_ATTENTION else None

    @classmethod
    def _from_qwen2(cls, hf: dict[str, Any]) -> Qwen3Config:
        base = super()._from_qwen2(hf)
        layer_types = hf.get("layer_types")
        return dataclasses.replace(base, **read_qwen3_attention(base, hf),
                                   max_window_layers=hf.get("max_window_layers", cls.max_window_layers),
                                   layer_types=list(layer_types) if layer_types is not None else None)

    def to_hf_config(self) -> dict[str, Any]:
        out = write_qwen3_attention(self, super().to_hf_config(), "Qwen3ForCausalLM")
        out["layer_types"] = list(self.layer_types or [])
        return out


class Qwen3ForCausalLM(Qwen2ForCausalLM):
    """Qwen3 dense: the Qwen2 model built from a :class:`Qwen3Config` (QK-norm, no bias, ``head_dim``)."""

    def __init__(self, config: Qwen3Config) -> None:
        super().__init__(config)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.sliding_window = config.sliding_window_of(i)


@torch.no_grad()
def attention_logit_stats(model: Qwen2ForCausalLM, input_ids: torch.Tensor) -> list[dict[str, float]]:
    """Per layer: the largest attention logit ``|q.k| / sqrt(d)`` over all heads and causal (query, key)
    pairs of ``input_ids``, and the mean query and key lengths ``|q|``, ``|k|`` after the q/k norms and RoPE.

    This is the quantity whose growth destabilises training without QK-norm: the softmax saturates
    into a one-hot and its gradient vanishes. Works for any model built on the shared decoder layers.
    """
    from qwen_edu.models.rope import apply_rotary_pos_emb

    captured: list[torch.Tensor] = []
    hooks = [layer.self_attn.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
             for layer in model.model.layers]
    try:
        model(input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    length = input_ids.shape[1]
    positions = torch.arange(length, device=input_ids.device)[None].expand(input_ids.shape[0], length)
    hidden = model.model.embed_tokens(input_ids)
    cos, sin = model.model.rotary_emb(hidden, positions, 0)
    causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
    stats = []
    for layer, x in zip(model.model.layers, captured, strict=True):
        attn = layer.self_attn
        b = x.shape[0]
        q = attn.q_proj(x).view(b, length, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, length, -1, attn.head_dim).transpose(1, 2)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(attn.num_heads // attn.num_kv_heads, dim=1)
        logits = (q @ k.transpose(-1, -2)) * attn.scale
        stats.append({"max_logit": float(logits.abs().masked_fill(~causal, 0).amax()),
                      "q_norm": float(q.norm(dim=-1).mean()), "k_norm": float(k.norm(dim=-1).mean())})
    return stats


register_model(ModelEntry("qwen3", Qwen3ForCausalLM, config_from_hf=Qwen3Config.from_hf_config,
                          description="Qwen3 dense (QK-norm, no attention bias, explicit head_dim)"))
