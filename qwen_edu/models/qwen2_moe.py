"""Qwen1.5-MoE and Qwen2-MoE (``model_type: "qwen2_moe"``): the Qwen2 decoder with sparse MoE layers.

Everything but the MLP is the dense Qwen2 model (:mod:`qwen_edu.models.qwen2`): the same attention
(MHA in Qwen1.5-MoE-A2.7B, GQA in Qwen2-57B-A14B, q/k/v bias), RMSNorm, RoPE and untied head. Layer
``i`` replaces its SwiGLU by a :class:`~qwen_edu.models.moe.SparseMoeBlock` when
``i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0`` (every layer of the released
models), so dense and sparse layers can be mixed.

With ``output_router_logits`` the model returns each sparse layer's router logits and the Switch
auxiliary loss; with ``labels`` it returns ``cross-entropy + router_aux_loss_coef * aux_loss``, as
transformers' ``Qwen2MoeForCausalLM`` does.

Checkpoints come in two layouts, both loaded (:class:`~qwen_edu.models.layouts.MoeLayout`): the
per-expert keys of the hub files (``mlp.experts.{e}.gate_proj.weight`` ...), which
``save_pretrained`` still writes by default, and the fused 5.x tensors (``mlp.experts.gate_up_proj``,
``save_pretrained(save_original_format=False)``). :func:`qwen_edu.checkpoint.save_model` writes the
per-expert layout unless told otherwise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qwen_edu.models.config import QwenConfig
from qwen_edu.models.layers import DecoderLayer, KVCache
from qwen_edu.models.layouts import MoeLayout
from qwen_edu.models.moe import EXPERT_IMPLEMENTATIONS, SparseMoeBlock, load_balancing_loss
from qwen_edu.models.qwen2 import CausalLMOutput, Qwen2ForCausalLM, Qwen2Model
from qwen_edu.models.registry import ModelEntry, register_model

__all__ = ["Qwen2MoeConfig", "MoeCausalLMOutput", "Qwen2MoeModel", "Qwen2MoeForCausalLM"]

# config.json keys of qwen2_moe beyond the dense Qwen2 ones.
_MOE_KEYS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
             "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef",
             "output_router_logits", "qkv_bias")


@dataclass
class Qwen2MoeConfig(QwenConfig):
    """:class:`QwenConfig` plus the MoE fields; the defaults are Qwen1.5-MoE-A2.7B's (reference §4.2).

    ``intermediate_size`` is the width of the *dense* layers (those in ``mlp_only_layers`` or skipped
    by ``decoder_sparse_step``); ``moe_intermediate_size`` the width of one routed expert;
    ``shared_expert_intermediate_size=0`` means no shared expert. ``experts_implementation`` is
    qwen_edu's own switch (:data:`~qwen_edu.models.moe.EXPERT_IMPLEMENTATIONS`), not a config.json key.
    """

    model_type: str = "qwen2_moe"
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None  # = num_attention_heads (MHA, as in A2.7B)
    max_position_embeddings: int = 8192
    rope_theta: float = 1e6
    num_experts: int = 60
    num_experts_per_tok: int = 4
    moe_intermediate_size: int = 1408
    shared_expert_intermediate_size: int = 5632
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False
    experts_implementation: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.mlp_only_layers = [int(i) for i in self.mlp_only_layers or []]
        if self.num_experts < 0:
            raise ValueError(f"num_experts={self.num_experts} must be >= 0")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be between 1 and "
                             f"num_experts={self.num_experts}")
        if self.num_experts and self.moe_intermediate_size < 1:
            raise ValueError(f"moe_intermediate_size={self.moe_intermediate_size} must be positive")
        if self.shared_expert_intermediate_size < 0:
            raise ValueError(f"shared_expert_intermediate_size={self.shared_expert_intermediate_size} must be >= 0")
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step={self.decoder_sparse_step} must be >= 1")
        if any(i < 0 for i in self.mlp_only_layers):
            raise ValueError(f"mlp_only_layers={self.mlp_only_layers} must hold layer indices >= 0")
        if self.experts_implementation not in EXPERT_IMPLEMENTATIONS:
            raise ValueError(f"experts_implementation must be one of {EXPERT_IMPLEMENTATIONS}, "
                             f"got {self.experts_implementation!r}")

    def is_sparse_layer(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` has an MoE block (the transformers rule)."""
        return (layer_idx not in self.mlp_only_layers and self.num_experts > 0
                and (layer_idx + 1) % self.decoder_sparse_step == 0)

    @property
    def sparse_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_sparse_layer(i)]

    @classmethod
    def _from_qwen2(cls, hf: dict[str, Any]) -> Qwen2MoeConfig:
        base = super()._from_qwen2(hf)  # the dense fields; the MoE keys land in .extra
        assert isinstance(base, Qwen2MoeConfig)
        extra = dict(base.extra)
        moe = {key: extra.pop(key) for key in _MOE_KEYS if key in extra}
        if moe.get("mlp_only_layers") is None:
            moe.pop("mlp_only_layers", None)
        if moe.get("shared_expert_intermediate_size") is None:
            moe.pop("shared_expert_intermediate_size", None)
        return dataclasses.replace(base, extra=extra, **moe)

    def to_hf_config(self) -> dict[str, Any]:
        out = super().to_hf_config()
        out.update({key: getattr(self, key) for key in _MOE_KEYS})
        out["mlp_only_layers"] = list(self.mlp_only_layers)
        if "architectures" not in self.extra:
            out["architectures"] = ["Qwen2MoeForCausalLM"]
        return out


@dataclass
class MoeCausalLMOutput(CausalLMOutput):
    """:class:`CausalLMOutput` plus ``loss`` (with ``labels``), ``aux_loss`` and per-layer ``router_logits``."""

    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


class Qwen2MoeModel(Qwen2Model):
    """The Qwen2 decoder stack with a sparse MoE block in every layer that ``is_sparse_layer``."""

    def __init__(self, config: Qwen2MoeConfig) -> None:
        # The parent builds embeddings, final norm and RoPE; the layers (dense or sparse) are built here.
        super().__init__(config.replace(num_hidden_layers=0))
        self.config = config
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, mlp=SparseMoeBlock.from_config(config) if config.is_sparse_layer(i) else None)
            for i in range(config.num_hidden_layers)
        )

    def sparse_blocks(self) -> list[SparseMoeBlock]:
        """The MoE blocks, in layer order."""
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, SparseMoeBlock)]


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    """Qwen2-MoE decoder plus LM head; ``forward`` adds router logits, the aux loss and the LM loss."""

    def __init__(self, config: Qwen2MoeConfig) -> None:
        nn.Module.__init__(self)
        self.config = config
        self.model = Qwen2MoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def sparse_blocks(self) -> list[SparseMoeBlock]:
        return self.model.sparse_blocks()

    def set_experts_implementation(self, name: str) -> None:
        """Switch every MoE block between the grouped dispatch kernels (``"loop"``, ``"grouped_mm"``, ``"auto"``)."""
        self.config.experts_implementation = name
        self.config.__post_init__()
        for block in self.sparse_blocks():
            block.experts.implementation = name

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: KVCache | None = None,
                use_cache: bool = False, *, cache: KVCache | None = None,
                inputs_embeds: torch.Tensor | None = None, logits_to_keep: int = 0,
                labels: torch.Tensor | None = None, output_router_logits: bool | None = None) -> MoeCausalLMOutput:
        """Like :meth:`Qwen2ForCausalLM.forward`, plus ``labels`` (unshifted, ``-100`` ignored) and
        ``output_router_logits`` (default: the config's)."""
        out = super().forward(input_ids, attention_mask, position_ids, past_key_values, use_cache, cache=cache,
                              inputs_embeds=inputs_embeds, logits_to_keep=logits_to_keep)
        want_router = self.config.output_router_logits if output_router_logits is None else output_router_logits
        router_logits = aux_loss = loss = None
        if want_router and self.sparse_blocks():
            router_logits = tuple(b.router_logits for b in self.sparse_blocks())  # type: ignore[misc]
            aux_loss = load_balancing_loss(router_logits, self.config.num_experts_per_tok, attention_mask)
        if labels is not None:
            from qwen_edu.training.loss import causal_lm_loss

            loss = causal_lm_loss(out.logits, labels)
            if aux_loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss
        return MoeCausalLMOutput(logits=out.logits, past_key_values=out.past_key_values,
                                 last_hidden_state=out.last_hidden_state, loss=loss, aux_loss=aux_loss,
                                 router_logits=router_logits)


register_model(ModelEntry("qwen2_moe", Qwen2MoeForCausalLM, config_from_hf=Qwen2MoeConfig.from_hf_config,
                          layout=MoeLayout(), description="Qwen1.5-MoE / Qwen2-MoE (sparse MoE, shared expert)"))
