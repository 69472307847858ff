"""Qwen3-MoE (``model_type: "qwen3_moe"``): Qwen3's attention on the Qwen2-MoE decoder, without a shared expert.

Compared with Qwen1.5-MoE / Qwen2-MoE (:mod:`qwen_edu.models.qwen2_moe`, chapter 8), reference
``qwen_architectures.md`` §7 and ``qwen_later_generations.md`` §5:

* the attention is Qwen3's (QK-norm, no bias, ``head_dim`` decoupled from ``hidden / heads``; the
  Qwen3-MoE ``config.json`` has a ``head_dim`` key even though transformers' class declares none);
* **no shared expert** and no shared-expert gate: every token's FFN output is the weighted sum of its
  top-k routed experts alone (128 experts, 8 active in the released models);
* the kept top-k probabilities are **renormalised** to sum to 1 (``norm_topk_prob`` true in the
  released configs; transformers' class default is false, so the value is always read from the config);
* training used a *global-batch* load-balancing loss (:mod:`qwen_edu.training.load_balancing`); the
  loss the model itself returns is transformers' per-call one, for parity.

There is no Qwen3-MoE code here beyond this config: the model is
:class:`~qwen_edu.models.qwen2_moe.Qwen2MoeForCausalLM` built from a :class:`Qwen3MoeConfig`, whose
``qk_norm=True`` and ``shared_expert_intermediate_size=0`` the shared layer and MoE block read. The
per-expert hub keys and the fused transformers 5.x tensors both load (:class:`~qwen_edu.models.layouts.MoeLayout`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from qwen_edu.models.layouts import MoeLayout
from qwen_edu.models.qwen2_moe import Qwen2MoeConfig, Qwen2MoeForCausalLM
from qwen_edu.models.qwen3 import read_qwen3_attention, write_qwen3_attention
from qwen_edu.models.registry import ModelEntry, register_model

__all__ = ["Qwen3MoeConfig", "Qwen3MoeForCausalLM"]


@dataclass
class Qwen3MoeConfig(Qwen2MoeConfig):
    """:class:`~qwen_edu.models.qwen2_moe.Qwen2MoeConfig` with Qwen3's attention and no shared expert.

    The defaults are transformers' ``Qwen3MoeConfig`` ones (a 24-layer, 2048-wide model with 128
    experts of width 768, 8 per token). ``head_dim=None`` means ``hidden_size // num_attention_heads``,
    transformers' fallback -- wrong for the released models, whose configs say 128.
    """

    model_type: str = "qwen3_moe"
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 4
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = True
    num_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shared_expert_intermediate_size:
            raise ValueError(f"Qwen3-MoE has no shared expert; got shared_expert_intermediate_size="
                             f"{self.shared_expert_intermediate_size} (use Qwen2MoeConfig for one)")
        if not self.use_sliding_window:
            self.sliding_window = None

    @classmethod
    def _from_qwen2(cls, hf: dict[str, Any]) -> Qwen3MoeConfig:
        if "num_local_experts" in hf:  # transformers 5.x writes its attribute name; the hub files say num_experts
            hf = {k: v for k, v in hf.items() if k != "num_local_experts"} | {"num_experts": hf["num_local_experts"]}
        base = super()._from_qwen2(hf)
        return dataclasses.replace(base, **read_qwen3_attention(base, hf))

    def to_hf_config(self) -> dict[str, Any]:
        out = write_qwen3_attention(self, super().to_hf_config(), "Qwen3MoeForCausalLM")
        out.pop("shared_expert_intermediate_size", None)
        return out


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    """Qwen3-MoE: the Qwen2-MoE model built from a :class:`Qwen3MoeConfig`."""

    def __init__(self, config: Qwen3MoeConfig) -> None:
        super().__init__(config)
        for layer in self.model.layers:  # transformers: one window for every layer (off when released)
            layer.self_attn.sliding_window = config.sliding_window


register_model(ModelEntry("qwen3_moe", Qwen3MoeForCausalLM, config_from_hf=Qwen3MoeConfig.from_hf_config,
                          layout=MoeLayout(), description="Qwen3-MoE (QK-norm attention, routed experts only)"))
