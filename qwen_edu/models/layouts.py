"""Where each model parameter lives in a checkpoint: the Qwen2 (HF) layout and the original Qwen-1 layout.

A layout maps every *model* parameter name to a :class:`TensorSource`: a checkpoint key plus,
optionally, a row range of it. That is enough to describe Qwen-1's fused ``c_attn`` (q, k and v are
contiguous row thirds of one matrix) and to read each third straight from the file with
``safe_open(...).get_slice(key)[a:b]``, without ever materialising the fused tensor. The same mapping
run backwards (:meth:`WeightLayout.to_checkpoint`) re-fuses the tensors when saving.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from qwen_edu.models.config import QwenConfig

__all__ = ["TensorSource", "WeightLayout", "Qwen2Layout", "Qwen1Layout"]


@dataclass(frozen=True)
class TensorSource:
    """``key`` in the checkpoint, restricted to rows ``rows[0]:rows[1]`` (dim 0) when ``rows`` is set."""

    key: str
    rows: tuple[int, int] | None = None


class WeightLayout:
    """Identity layout: checkpoint keys equal the model's parameter names (Qwen1.5/2/2.5 on the hub)."""

    #: Checkpoint keys that may be present but carry no weights we need (old RoPE buffers).
    ignorable = re.compile(r".*rotary_emb\.inv_freq$")

    def source(self, name: str, config: QwenConfig) -> TensorSource:
        return TensorSource(name)

    def sources(self, names: Iterable[str], config: QwenConfig) -> dict[str, TensorSource]:
        """Model parameter name -> where to read it."""
        return {name: self.source(name, config) for name in names}

    def to_checkpoint(self, state_dict: dict[str, torch.Tensor], config: QwenConfig) -> dict[str, torch.Tensor]:
        """Model tensors -> checkpoint tensors (row ranges of one key are concatenated back)."""
        groups: dict[str, list[tuple[tuple[int, int] | None, torch.Tensor]]] = defaultdict(list)
        for name, tensor in state_dict.items():
            src = self.source(name, config)
            groups[src.key].append((src.rows, tensor))
        out = {}
        for key, parts in groups.items():
            if len(parts) == 1 and parts[0][0] is None:
                out[key] = parts[0][1]
            else:
                parts.sort(key=lambda p: p[0][0] if p[0] is not None else 0)
                out[key] = torch.cat([t for _, t in parts], dim=0)
        return out


class Qwen2Layout(WeightLayout):
    """The HF layout of ``Qwen2ForCausalLM``: the identity mapping."""


class Qwen1Layout(WeightLayout):
    """Original Qwen-1 (``QWenLMHeadModel``) keys, reference §5.2 and §5.8.

    ``c_attn`` holds q|k|v as contiguous row blocks; ``mlp.w2`` is the *gate* and ``mlp.w1`` the up
    projection (the gated branch is the second one in ``w1(x) * silu(w2(x))``).
    """

    _simple = {
        "model.embed_tokens.weight": "transformer.wte.weight",
        "model.norm.weight": "transformer.ln_f.weight",
        "lm_head.weight": "lm_head.weight",
    }
    _per_layer = {
        "input_layernorm.weight": "ln_1.weight",
        "post_attention_layernorm.weight": "ln_2.weight",
        "self_attn.o_proj.weight": "attn.c_proj.weight",
        "self_attn.o_proj.bias": "attn.c_proj.bias",
        "mlp.gate_proj.weight": "mlp.w2.weight",
        "mlp.gate_proj.bias": "mlp.w2.bias",
        "mlp.up_proj.weight": "mlp.w1.weight",
        "mlp.up_proj.bias": "mlp.w1.bias",
        "mlp.down_proj.weight": "mlp.c_proj.weight",
        "mlp.down_proj.bias": "mlp.c_proj.bias",
    }
    _layer_re = re.compile(r"model\.layers\.(\d+)\.(.+)")

    def source(self, name: str, config: QwenConfig) -> TensorSource:
        if name in self._simple:
            return TensorSource(self._simple[name])
        match = self._layer_re.fullmatch(name)
        if match is None:
            raise KeyError(f"no Qwen-1 checkpoint key for parameter {name!r}")
        layer, rest = match.groups()
        prefix = f"transformer.h.{layer}."
        if rest in self._per_layer:
            return TensorSource(prefix + self._per_layer[rest])
        proj, _, kind = rest.partition(".")[2].partition(".")  # "self_attn.q_proj.weight" -> q_proj, weight
        assert config.head_dim is not None and config.num_key_value_heads is not None
        q_rows = config.num_attention_heads * config.head_dim
        kv_rows = config.num_key_value_heads * config.head_dim
        bounds = {"q_proj": (0, q_rows), "k_proj": (q_rows, q_rows + kv_rows),
                  "v_proj": (q_rows + kv_rows, q_rows + 2 * kv_rows)}
        if rest.startswith("self_attn.") and proj in bounds:
            return TensorSource(f"{prefix}attn.c_attn.{kind}", bounds[proj])
        raise KeyError(f"no Qwen-1 checkpoint key for parameter {name!r}")
