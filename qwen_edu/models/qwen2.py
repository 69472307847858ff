"""The dense Qwen decoder (Qwen-1, Qwen1.5, Qwen2, Qwen2.5): embeddings, N blocks, final norm, LM head.

Attribute names equal the Hugging Face checkpoint keys (``model.embed_tokens``, ``model.layers.N``,
``model.norm``, ``lm_head``), so a Qwen2-layout ``state_dict`` loads as is and Qwen-1 weights load
through a key mapping (:mod:`qwen_edu.models.layouts`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qwen_edu.models.config import QwenConfig
from qwen_edu.models.layers import DecoderLayer, KVCache, RMSNorm, causal_mask
from qwen_edu.models.rope import RotaryEmbedding

__all__ = ["CausalLMOutput", "Qwen2Model", "Qwen2ForCausalLM", "build_attention_mask"]


@dataclass
class CausalLMOutput:
    """What the causal LM returns: ``logits [B, L, vocab]`` and the KV cache (if one was used)."""

    logits: torch.Tensor
    past_key_values: KVCache | None = None
    last_hidden_state: torch.Tensor | None = None

    @property
    def cache(self) -> KVCache | None:
        return self.past_key_values


def build_attention_mask(attention_mask: torch.Tensor | None, q_len: int, past_len: int, dtype: torch.dtype,
                         device: torch.device, explicit: bool) -> torch.Tensor | None:
    """The additive 4D mask for one forward pass, or ``None`` when plain causal attention suffices.

    ``attention_mask [B, past+L]`` is the usual 2D padding mask (1 = token, 0 = padding). With no
    padding, SDPA needs no mask for prefill (``is_causal``) or single-token decoding; the eager path
    (``explicit=True``) always gets one, exactly as the reference builds it.
    """
    kv_len = past_len + q_len
    if attention_mask is not None:
        if attention_mask.shape[-1] != kv_len:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, expected past+new={kv_len}")
        if bool(attention_mask.all()):
            attention_mask = None
    if attention_mask is None and not explicit and (q_len == 1 or past_len == 0):
        return None
    return causal_mask(q_len, kv_len, dtype, device, attention_mask)


class Qwen2Model(nn.Module):
    """The decoder stack without the LM head: token ids -> final normalised hidden states."""

    def __init__(self, config: QwenConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = self.build_rotary_embedding(config)

    def build_rotary_embedding(self, config: QwenConfig) -> nn.Module:
        """The module that turns ``position_ids`` into ``(cos, sin)``; M-RoPE models override this."""
        scaling = config.rope_scaling
        if config.use_dynamic_ntk:
            scaling = {"rope_type": "qwen1_ntk", "seq_length": config.seq_length}
        return RotaryEmbedding(config.head_dim, config.rope_theta, scaling,
                               config.max_position_embeddings, rotate_in_fp32=config.rope_in_fp32)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: KVCache | None = None,
                use_cache: bool = False, inputs_embeds: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, KVCache | None]:
        """Return ``(hidden [B, L, H], cache)``.

        Without ``position_ids`` positions are ``past + arange(L)`` for every row, like HF ``forward``
        (left-padded batches should pass ``cumsum(mask) - 1``, as :func:`qwen_edu.generate` does).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = x.shape[:2]
        cache = past_key_values
        if use_cache and cache is None:
            cache = KVCache(len(self.layers))
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=x.device)[None].expand(batch, length)
        cos, sin = self.rotary_emb(x, position_ids, past)
        mask = build_attention_mask(attention_mask, length, past, x.dtype, x.device,
                                    explicit=self.config.attn_implementation == "eager")
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache, position_ids)
        return self.norm(x), cache


class Qwen2ForCausalLM(nn.Module):
    """Decoder plus LM head. With ``tie_word_embeddings`` the head *is* the embedding matrix."""

    #: The decoder stack class (a model with another position scheme swaps in a subclass).
    decoder_class: type[Qwen2Model] = Qwen2Model

    def __init__(self, config: QwenConfig) -> None:
        super().__init__()
        self.config = config
        self.model = self.decoder_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share one tensor between input embedding and output head when the config says so."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def set_attn_implementation(self, name: str) -> None:
        """Switch every layer between ``"eager"`` and ``"sdpa"`` attention."""
        self.config.attn_implementation = name
        self.config.__post_init__()
        for layer in self.model.layers:
            layer.self_attn.attn_implementation = name

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied head counts once); works on the meta device too."""
        params = dict(self.named_parameters())  # named_parameters() already drops the tied duplicate
        if exclude_embeddings:
            params.pop("model.embed_tokens.weight", None)
            params.pop("lm_head.weight", None)
        return sum(p.numel() for p in params.values())

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: KVCache | None = None,
                use_cache: bool = False, *, cache: KVCache | None = None,
                inputs_embeds: torch.Tensor | None = None, logits_to_keep: int = 0) -> CausalLMOutput:
        """``input_ids [B, L]`` -> :class:`CausalLMOutput` with ``logits [B, L, vocab]``.

        ``cache`` is an alias of ``past_key_values``. ``logits_to_keep=k > 0`` computes logits for the
        last k positions only (generation needs just the last one; the full head is the biggest matmul).
        """
        if cache is None:
            cache = past_key_values
        hidden, cache = self.model(input_ids, attention_mask, position_ids, cache,
                                   use_cache or cache is not None, inputs_embeds)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return CausalLMOutput(logits=self.lm_head(hidden), past_key_values=cache, last_hidden_state=hidden)
