"""Qwen model definitions: config, layers, RoPE, the dense decoder, presets and the model registry."""

from qwen_edu.models.config import QwenConfig
from qwen_edu.models.layers import (
    MLP,
    Attention,
    DecoderLayer,
    KVCache,
    RMSNorm,
    causal_mask,
    eager_attention,
    repeat_kv,
)
from qwen_edu.models.qwen2 import CausalLMOutput, Qwen2ForCausalLM, Qwen2Model
from qwen_edu.models.rope import RotaryEmbedding, apply_rotary_pos_emb, compute_rope_parameters, rotate_half

__all__ = [
    "QwenConfig",
    "RMSNorm",
    "MLP",
    "Attention",
    "DecoderLayer",
    "KVCache",
    "causal_mask",
    "eager_attention",
    "repeat_kv",
    "RotaryEmbedding",
    "apply_rotary_pos_emb",
    "compute_rope_parameters",
    "rotate_half",
    "CausalLMOutput",
    "Qwen2Model",
    "Qwen2ForCausalLM",
]
