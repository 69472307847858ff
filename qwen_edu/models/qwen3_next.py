"""Qwen3-Next: a hybrid decoder, three Gated DeltaNet layers then one gated full-attention layer, repeated.

What is new compared with the dense Qwen decoder (reference ``qwen_later_generations.md`` §1):

* **The token mixer alternates.** ``layer_types[i]`` is ``"linear_attention"`` (a
  :class:`~qwen_edu.models.gated_deltanet.GatedDeltaNet`, fixed-size state) or ``"full_attention"``
  (softmax attention, a KV cache that grows); by default every 4th layer is full (L L L F ...).
* **Gated full attention.** The shared :class:`~qwen_edu.models.layers.Attention` with three options:
  zero-centred ``q_norm``/``k_norm``, an output gate ``sigmoid(gate)`` folded into ``q_proj``, and
  partial RoPE (only the first quarter of each head's features rotate).
* **Zero-centred norms** (``1 + weight``) everywhere except the DeltaNet's gated norm.
* **Sparse MoE** in every layer (512 experts, 10 routed + 1 gated shared expert in the 80B model),
  the shared block of :mod:`qwen_edu.models.moe`; a layer can also be a dense SwiGLU (``mlp_only_layers``).
* **Multi-token prediction (MTP).** ``mtp.*`` weights: from the main model's last hidden state at
  position t and the embedding of token t+1, one more full-attention layer predicts token t+2. It
  drafts tokens for self-speculative decoding (:mod:`qwen_edu.speculative`). transformers 5.24 drops
  these weights on load; here they are loaded and usable (:meth:`Qwen3NextForCausalLM.mtp_logits`).

Module names equal the checkpoint keys, so the 5.24 layout loads as is; the hub's per-expert expert
keys are mapped onto the fused expert tensors by :class:`Qwen3NextLayout`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qwen_edu.models.config import _normalise_rope_scaling
from qwen_edu.models.gated_deltanet import DeltaNetState, GatedDeltaNet
from qwen_edu.models.layers import MLP, Attention, KVCache, ZeroCenteredRMSNorm
from qwen_edu.models.layouts import MoeLayout
from qwen_edu.models.moe import SparseMoeBlock
from qwen_edu.models.qwen2 import build_attention_mask
from qwen_edu.models.qwen2_moe import Qwen2MoeConfig, Qwen2MoeForCausalLM
from qwen_edu.models.registry import ModelEntry, register_model
from qwen_edu.models.rope import RotaryEmbedding

__all__ = [
    "Qwen3NextConfig",
    "HybridCache",
    "Qwen3NextDecoderLayer",
    "Qwen3NextMTP",
    "Qwen3NextModel",
    "Qwen3NextForCausalLM",
    "LINEAR",
    "FULL",
]

LINEAR, FULL = "linear_attention", "full_attention"

# config.json keys that Qwen3NextConfig reads (everything else is kept in `extra` for round trips).
_KEYS = {
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
    "rope_scaling", "rope_parameters", "partial_rotary_factor", "tie_word_embeddings", "attention_bias",
    "attention_dropout", "layer_types", "full_attention_interval", "linear_conv_kernel_dim",
    "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads",
    "num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
    "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef", "output_router_logits",
    "mtp_num_hidden_layers", "num_nextn_predict_layers", "bos_token_id", "eos_token_id", "pad_token_id",
    "torch_dtype", "dtype",
}


@dataclass
class Qwen3NextConfig(Qwen2MoeConfig):
    """Hyper-parameters of Qwen3-Next; the defaults are transformers' class defaults (80B-A3B shapes).

    The MoE fields and their checks are :class:`~qwen_edu.models.qwen2_moe.Qwen2MoeConfig`'s.
    ``layer_types=None`` means "every ``full_attention_interval``-th layer is full attention".
    ``mtp_num_hidden_layers`` counts the MTP layers: the hub configs do not say (and vLLM assumes 1),
    so a ``config.json`` without the key means 1; set it to 0 for a checkpoint without ``mtp.*``
    weights (``save_pretrained`` of transformers 5.24 writes none).
    """

    model_type: str = "qwen3_next"
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 48
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 2
    head_dim: int | None = 256
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    qkv_bias: bool = False
    partial_rotary_factor: float = 0.25
    layer_types: list[str] | None = None
    full_attention_interval: int = 4
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    num_experts: int = 512
    num_experts_per_tok: int = 10
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    norm_topk_prob: bool = True
    mtp_num_hidden_layers: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer_types is None:
            self.layer_types = [FULL if (i + 1) % self.full_attention_interval == 0 else LINEAR
                                for i in range(self.num_hidden_layers)]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                             f"num_hidden_layers={self.num_hidden_layers}")
        unknown = sorted(set(self.layer_types) - {LINEAR, FULL})
        if unknown:
            raise ValueError(f"unknown layer_types {unknown}; expected {LINEAR!r} or {FULL!r}")

    @property
    def rotary_dim(self) -> int:
        assert self.head_dim is not None
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_hf_config(cls, hf: Any) -> Qwen3NextConfig:  # type: ignore[override]
        """Read a ``qwen3_next`` ``config.json`` (dict, file, folder or ``PretrainedConfig``)."""
        if isinstance(hf, str | os.PathLike):
            path = os.path.join(hf, "config.json") if os.path.isdir(hf) else os.fspath(hf)
            with open(path, encoding="utf-8") as fh:
                hf = json.load(fh)
        elif not isinstance(hf, dict):  # a transformers PretrainedConfig
            hf = hf.to_dict()
        if hf.get("model_type", "qwen3_next") != "qwen3_next":
            raise ValueError(f"not a qwen3_next config: model_type={hf.get('model_type')!r}")
        params = dict(hf.get("rope_parameters") or {})
        rope_theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.25))
        scaling = hf.get("rope_scaling")
        if scaling is None and params.get("rope_type", params.get("type", "default")) != "default":
            scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
        if isinstance(scaling, dict):
            scaling = {k: v for k, v in scaling.items() if k != "partial_rotary_factor"}
        mtp = hf.get("mtp_num_hidden_layers", hf.get("num_nextn_predict_layers", 1))
        picked = {name: hf[name] for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
            "layer_types", "full_attention_interval", "linear_conv_kernel_dim", "linear_key_head_dim",
            "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads", "num_experts",
            "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob",
            "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef", "output_router_logits",
            "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "attention_dropout",
        ) if hf.get(name) is not None}
        dtype = hf.get("torch_dtype", hf.get("dtype"))
        bias = bool(hf.get("attention_bias", False))
        return cls(**picked, rope_theta=float(rope_theta), rope_scaling=_normalise_rope_scaling(scaling),
                   partial_rotary_factor=float(partial), qkv_bias=bias, o_bias=bias,
                   mtp_num_hidden_layers=int(mtp or 0),
                   torch_dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
                   extra={k: v for k, v in hf.items() if k not in _KEYS})

    def to_hf_config(self) -> dict[str, Any]:
        """The ``config.json`` of transformers 5.x (``rope_parameters``), readable by ``Qwen3NextConfig``."""
        out: dict[str, Any] = dict(self.extra)
        rope = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta,
                "partial_rotary_factor": self.partial_rotary_factor}
        names = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                 "tie_word_embeddings", "attention_dropout", "layer_types", "linear_conv_kernel_dim",
                 "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads",
                 "num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                 "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef",
                 "output_router_logits", "mtp_num_hidden_layers", "bos_token_id", "eos_token_id", "pad_token_id")
        out.update({name: getattr(self, name) for name in names})
        out.update(model_type="qwen3_next", attention_bias=self.qkv_bias, rope_parameters=rope)
        if self.torch_dtype is not None:
            out["torch_dtype"] = self.torch_dtype
        out.setdefault("architectures", ["Qwen3NextForCausalLM"])
        return out


class HybridCache(KVCache):
    """The decoding cache of a hybrid stack: rotated keys/values for full-attention layers (growing by
    one row per token) and a :class:`DeltaNetState` for each linear layer (fixed size).

    ``mtp`` holds the MTP head's own KV cache during speculative decoding. :meth:`crop` forgets the
    newest tokens (rejected drafts): KV rows are simply dropped; DeltaNet states, which cannot be
    "un-added", are restored from the per-token history kept while ``keep_history`` is on.
    """

    def __init__(self, layer_types: list[str], chunk: int = 256) -> None:
        super().__init__(len(layer_types), chunk)
        self.layer_types = list(layer_types)
        self.linear_states = [DeltaNetState() if t == LINEAR else None for t in layer_types]
        self.mtp: KVCache | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        state = self.linear_states[layer_idx]
        return state.seen if state is not None else self.lengths[layer_idx]

    def __len__(self) -> int:
        return self.get_seq_length(0)

    def keep_history(self, on: bool = True) -> None:
        """Keep (or stop keeping) per-token DeltaNet states, so that the next call can be rolled back."""
        for state in self.linear_states:
            if state is not None:
                state.keep_history = on
                state.history = None

    def crop(self, length: int) -> None:
        """Forget every token after the first ``length`` (only tokens of the last call, for linear layers)."""
        for i, state in enumerate(self.linear_states):
            if state is not None:
                state.rollback(state.seen - length)
            else:
                self.lengths[i] = min(self.lengths[i], length)

    def nbytes(self) -> int:
        """Bytes of cache content: the filled KV rows plus every DeltaNet state."""
        total = 0
        for i, state in enumerate(self.linear_states):
            if state is not None:
                total += state.nbytes()
            elif self.keys[i] is not None:
                k = self.keys[i]
                assert k is not None
                total += 2 * k[:, :, :self.lengths[i]].numel() * k.element_size()
        return total


class Qwen3NextDecoderLayer(nn.Module):
    """``h = x + mixer(norm(x)); y = h + mlp(norm(h))`` where the mixer is DeltaNet or gated attention."""

    def __init__(self, config: Qwen3NextConfig, layer_idx: int, layer_type: str | None = None) -> None:
        super().__init__()
        assert config.layer_types is not None
        self.layer_type = layer_type or config.layer_types[layer_idx]
        self.layer_idx = layer_idx
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = ZeroCenteredRMSNorm(h, eps)
        if self.layer_type == LINEAR:
            self.linear_attn = GatedDeltaNet(h, config.linear_num_key_heads, config.linear_num_value_heads,
                                             config.linear_key_head_dim, config.linear_value_head_dim,
                                             config.linear_conv_kernel_dim, eps, layer_idx)
        else:
            self.self_attn = Attention(h, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                                       qkv_bias=config.qkv_bias, o_bias=config.qkv_bias, layer_idx=layer_idx,
                                       attn_implementation=config.attn_implementation,
                                       qk_norm=ZeroCenteredRMSNorm, norm_eps=eps, output_gate=True)
        self.post_attention_layernorm = ZeroCenteredRMSNorm(h, eps)
        self.mlp: nn.Module = (SparseMoeBlock.from_config(config) if config.is_sparse_layer(layer_idx)
                               else MLP(h, config.intermediate_size))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention_mask: torch.Tensor | None,
                padding_mask: torch.Tensor | None, cache: KVCache | None,
                position_ids: torch.Tensor | None) -> torch.Tensor:
        h = self.input_layernorm(x)
        if self.layer_type == LINEAR:
            state = cache.linear_states[self.layer_idx] if isinstance(cache, HybridCache) else None
            h = self.linear_attn(h, state, padding_mask)
        else:
            h = self.self_attn(h, cos, sin, attention_mask, cache, position_ids)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3NextModel(nn.Module):
    """Embeddings, the hybrid stack, the final norm; also builds the cache and the two kinds of masks."""

    def __init__(self, config: Qwen3NextConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen3NextDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = ZeroCenteredRMSNorm(config.hidden_size, config.rms_norm_eps)
        assert config.head_dim is not None
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling,
                                          config.max_position_embeddings,
                                          partial_rotary_factor=config.partial_rotary_factor)

    def sparse_blocks(self) -> list[SparseMoeBlock]:
        """The MoE blocks of the stack, in layer order."""
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, SparseMoeBlock)]

    def new_cache(self) -> HybridCache:
        assert self.config.layer_types is not None
        return HybridCache(self.config.layer_types)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: KVCache | None = None,
                use_cache: bool = False, inputs_embeds: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, KVCache | None]:
        """Return ``(hidden [B, L, H] after the final norm, cache)``.

        ``attention_mask [B, past+L]`` (1 = token) gives the full-attention layers their causal +
        padding mask and the DeltaNet layers the 2-D mask that zeroes padded inputs.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = x.shape[:2]
        cache = past_key_values
        if use_cache and cache is None:
            cache = self.new_cache()
        if cache is not None and not isinstance(cache, HybridCache):
            raise TypeError(f"Qwen3-Next needs a HybridCache (KV + DeltaNet states), got {type(cache).__name__}")
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=x.device)[None].expand(batch, length)
        cos, sin = self.rotary_emb(x, position_ids, past)
        mask = build_attention_mask(attention_mask, length, past, x.dtype, x.device,
                                    explicit=self.config.attn_implementation == "eager")
        padding = attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None
        for layer in self.layers:
            x = layer(x, cos, sin, mask, padding, cache, position_ids)
        return self.norm(x), cache


class Qwen3NextMTP(nn.Module):
    """The multi-token-prediction head (``mtp.*``): token t+2 from hidden state t and token t+1.

    ``x = fc([norm_e(embed(token_{t+1})) | norm_h(hidden_t)])`` goes through full-attention decoder
    layer(s) of the main model's kind and a final norm; the main model's ``lm_head`` turns the result
    into logits. ``hidden_t`` is the main model's output *after* its final norm. The head attends over
    its own KV cache of earlier positions, so it sees the whole prefix, not just one state.
    """

    def __init__(self, config: Qwen3NextConfig) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.pre_fc_norm_embedding = ZeroCenteredRMSNorm(h, eps)
        self.pre_fc_norm_hidden = ZeroCenteredRMSNorm(h, eps)
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.layers = nn.ModuleList(Qwen3NextDecoderLayer(config, j, layer_type=FULL)
                                    for j in range(config.mtp_num_hidden_layers))
        self.norm = ZeroCenteredRMSNorm(h, eps)

    def forward(self, hidden: torch.Tensor, embeds: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                position_ids: torch.Tensor | None = None, step: int = 0) -> torch.Tensor:
        """``hidden, embeds [B, L, H]`` -> ``[B, L, H]`` (normalised; feed to ``lm_head``)."""
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden)], dim=-1))
        layer = self.layers[step % len(self.layers)]
        x = layer(x, cos, sin, attention_mask, None, cache, position_ids)
        return self.norm(x)


class Qwen3NextForCausalLM(Qwen2MoeForCausalLM):
    """The hybrid decoder plus LM head, and (``mtp_num_hidden_layers > 0``) the MTP head ``mtp``.

    ``forward`` is :class:`~qwen_edu.models.qwen2_moe.Qwen2MoeForCausalLM`'s: logits, the cache, the
    final-normed ``last_hidden_state`` (what the MTP head reads), and with ``labels`` /
    ``output_router_logits`` the LM loss and the router's auxiliary loss.
    """

    def __init__(self, config: Qwen3NextConfig) -> None:
        nn.Module.__init__(self)
        self.config = config
        self.model = Qwen3NextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = Qwen3NextMTP(config) if config.mtp_num_hidden_layers > 0 else None
        self.tie_weights()

    def set_attn_implementation(self, name: str) -> None:
        """Switch every full-attention layer (MTP included) between ``"eager"`` and ``"sdpa"``."""
        self.config.attn_implementation = name
        self.config.__post_init__()
        for module in self.modules():
            if isinstance(module, Attention):
                module.attn_implementation = name

    def mtp_hidden_states(self, hidden: torch.Tensor, next_ids: torch.Tensor, cache: KVCache | None = None,
                          position_ids: torch.Tensor | None = None, step: int = 0) -> torch.Tensor:
        """The MTP head's normalised output ``[B, L, H]`` for ``hidden [B, L, H]`` (the main model's
        :attr:`last_hidden_state` at positions t) and ``next_ids [B, L]`` (the tokens t+1).

        ``cache`` is the head's own :class:`KVCache`: its attention sees every earlier position it was
        given. ``position_ids`` default to ``cached + arange(L)`` (the positions t). Feeding the output
        back as ``hidden`` with the head's own guess as ``next_ids`` drafts one more token.
        """
        if self.mtp is None:
            raise ValueError("this model has no MTP head (config.mtp_num_hidden_layers == 0)")
        batch, length = next_ids.shape
        past = cache.get_seq_length(0) if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=next_ids.device)[None].expand(batch, length)
        embeds = self.model.embed_tokens(next_ids)
        cos, sin = self.model.rotary_emb(embeds, position_ids, past)
        mask = build_attention_mask(None, length, past, embeds.dtype, embeds.device,
                                    explicit=self.config.attn_implementation == "eager")
        return self.mtp(hidden, embeds, cos, sin, mask, cache, position_ids, step)

    def mtp_logits(self, hidden: torch.Tensor, next_ids: torch.Tensor, cache: KVCache | None = None,
                   position_ids: torch.Tensor | None = None, step: int = 0) -> torch.Tensor:
        """Logits ``[B, L, vocab]`` for the tokens t+2 (see :meth:`mtp_hidden_states`)."""
        return self.lm_head(self.mtp_hidden_states(hidden, next_ids, cache, position_ids, step))


class Qwen3NextLayout(MoeLayout):
    """:class:`~qwen_edu.models.layouts.MoeLayout` (fused or per-expert experts, MTP layers included),
    which also says when the config expects an MTP head that the weights do not have."""

    def for_checkpoint(self, keys: Collection[str], config: Any) -> Qwen3NextLayout:
        base = super().for_checkpoint(keys, config)
        layout = Qwen3NextLayout(base.fused, base.checkpoint_keys)
        layout.ignorable = base.ignorable
        return layout

    def hints(self, config: Any, shapes: dict[str, tuple[int, ...]]) -> list[str]:
        hints = super().hints(config, shapes)
        if getattr(config, "mtp_num_hidden_layers", 0) and not any(k.startswith("mtp.") for k in shapes):
            hints.append(f"config implies mtp_num_hidden_layers={config.mtp_num_hidden_layers} (1 when "
                         "config.json does not say, as on the hub) but the weights have no mtp.* tensors; "
                         "set \"mtp_num_hidden_layers\": 0 in config.json to load the model without its MTP head")
        return hints


register_model(ModelEntry("qwen3_next", Qwen3NextForCausalLM, config_from_hf=Qwen3NextConfig.from_hf_config,
                          layout=Qwen3NextLayout(),
                          description="Qwen3-Next: Gated DeltaNet + gated attention (3:1), sparse MoE, MTP head"))
