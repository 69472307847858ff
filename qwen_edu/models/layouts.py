"""Where each model parameter lives in a checkpoint: the Qwen2 (HF) layout and the original Qwen-1 layout.

A layout maps every *model* parameter name to a :class:`TensorSource`: a checkpoint key plus,
optionally, a row range of it. That is enough to describe Qwen-1's fused ``c_attn`` (q, k and v are
contiguous row thirds of one matrix) and to read each third straight from the file with
``safe_open(...).get_slice(key)[a:b]``, without ever materialising the fused tensor. The same mapping
run backwards (:meth:`WeightLayout.to_checkpoint`) re-fuses the tensors when saving.

A :class:`StackedSource` goes the other way: one model parameter assembled from several checkpoint
tensors, each copied into its own slice (:class:`Placement`). The MoE models use it to stream the
per-expert keys of the hub checkpoints (``mlp.experts.{e}.gate_proj.weight`` ...) straight into the
fused ``experts.gate_up_proj [E, 2I, H]`` tensor, one slice at a time (:class:`MoeLayout`).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from qwen_edu.models.config import QwenConfig

__all__ = ["TensorSource", "Placement", "StackedSource", "WeightLayout", "Qwen2Layout", "Qwen1Layout", "MoeLayout",
           "source_parts"]


@dataclass(frozen=True)
class TensorSource:
    """``key`` in the checkpoint, restricted to rows ``rows[0]:rows[1]`` (dim 0) when ``rows`` is set."""

    key: str
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class Placement:
    """Copy checkpoint tensor ``source`` into ``param[index]``.

    ``index`` has one entry per leading dimension of the parameter: an ``int`` picks one position,
    a ``(start, stop)`` pair a range (``(3, (0, 8))`` means ``param[3, 0:8]``).
    """

    index: tuple[int | tuple[int, int], ...]
    source: TensorSource

    def slices(self) -> tuple[int | slice, ...]:
        """``index`` as a tuple usable to index a tensor."""
        return tuple(i if isinstance(i, int) else slice(*i) for i in self.index)


@dataclass(frozen=True)
class StackedSource:
    """One parameter assembled from several checkpoint tensors, each copied into its own slice."""

    parts: tuple[Placement, ...]

    @property
    def keys(self) -> list[str]:
        return [p.source.key for p in self.parts]


def source_parts(src: TensorSource | StackedSource) -> list[Placement]:
    """Every (slice, checkpoint tensor) pair a source reads; a plain source fills the whole parameter."""
    return list(src.parts) if isinstance(src, StackedSource) else [Placement((), src)]


class WeightLayout:
    """Identity layout: checkpoint keys equal the model's parameter names (Qwen1.5/2/2.5 on the hub)."""

    #: Checkpoint keys that may be present but carry no weights we need (old RoPE buffers).
    ignorable = re.compile(r".*rotary_emb\.inv_freq$")

    def source(self, name: str, config: QwenConfig) -> TensorSource | StackedSource:
        return TensorSource(name)

    def sources(self, names: Iterable[str], config: QwenConfig) -> dict[str, TensorSource | StackedSource]:
        """Model parameter name -> where to read it."""
        return {name: self.source(name, config) for name in names}

    def for_checkpoint(self, keys: Collection[str], config: Any) -> WeightLayout:
        """The layout to read a checkpoint holding ``keys`` (one family may ship several key layouts)."""
        return self

    def hints(self, config: Any, shapes: dict[str, tuple[int, ...]]) -> list[str]:
        """Config-vs-weights contradictions worth stating first when a checkpoint does not fit."""
        return []

    def to_checkpoint(self, state_dict: dict[str, torch.Tensor], config: QwenConfig) -> dict[str, torch.Tensor]:
        """Model tensors -> checkpoint tensors (row ranges of one key are concatenated back, stacked
        parameters are cut into their per-key slices)."""
        groups: dict[str, list[tuple[tuple[int, int] | None, torch.Tensor]]] = defaultdict(list)
        for name, tensor in state_dict.items():
            src = self.source(name, config)
            if isinstance(src, StackedSource):
                for part in src.parts:
                    groups[part.source.key].append((part.source.rows, tensor[part.slices()]))
                continue
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


class MoeLayout(WeightLayout):
    """The sparse-MoE layouts (Qwen2-MoE, Qwen3-MoE, Qwen3-Next): fused expert tensors or per-expert keys.

    Model parameters ``...mlp.experts.gate_up_proj [E, 2I, H]`` and ``...mlp.experts.down_proj
    [E, H, I]`` are read either from the same-named fused tensors (transformers 5.x,
    ``save_pretrained(save_original_format=False)``) or, per expert ``e``, from
    ``...mlp.experts.{e}.gate_proj.weight`` (rows ``0:I``), ``.up_proj.weight`` (rows ``I:2I``) and
    ``.down_proj.weight`` (the hub files, and ``save_pretrained``'s default). Which one is decided per
    parameter from the checkpoint's keys (:meth:`for_checkpoint`); ``fused`` picks what
    :meth:`to_checkpoint` writes. Every other key is the model's parameter name.
    """

    _experts = re.compile(r"(?P<prefix>.+\.experts)\.(?P<which>gate_up_proj|down_proj)")
    _no_shared = re.compile(r".*\.mlp\.shared_expert(?:\.(?:gate|up|down)_proj|_gate)\.weight$")

    def __init__(self, fused: bool = False, checkpoint_keys: Collection[str] | None = None,
                 ignorable: re.Pattern[str] | None = None) -> None:
        self.fused = fused
        self.checkpoint_keys = frozenset(checkpoint_keys) if checkpoint_keys is not None else None
        if ignorable is not None:
            self.ignorable = ignorable

    def for_checkpoint(self, keys: Collection[str], config: Any) -> MoeLayout:
        ignorable = None
        if not getattr(config, "shared_expert_intermediate_size", 1):
            # transformers keeps zero-width shared-expert tensors (and their gate) when the size is 0;
            # they contribute nothing, and a model without a shared expert has no place for them.
            ignorable = re.compile(f"{WeightLayout.ignorable.pattern}|{self._no_shared.pattern}")
        return MoeLayout(self.fused, keys, ignorable)

    def source(self, name: str, config: Any) -> TensorSource | StackedSource:
        match = self._experts.fullmatch(name)
        if match is None or self.fused or (self.checkpoint_keys is not None and name in self.checkpoint_keys):
            return TensorSource(name)
        prefix, which = match["prefix"], match["which"]
        experts, width = config.num_experts, config.moe_intermediate_size
        if which == "down_proj":
            return StackedSource(tuple(Placement((e,), TensorSource(f"{prefix}.{e}.down_proj.weight"))
                                       for e in range(experts)))
        return StackedSource(tuple(
            Placement((e, (start, start + width)), TensorSource(f"{prefix}.{e}.{proj}.weight"))
            for e in range(experts) for proj, start in (("gate_proj", 0), ("up_proj", width))
        ))

    def hints(self, config: Any, shapes: dict[str, tuple[int, ...]]) -> list[str]:
        experts = getattr(config, "num_experts", None)
        if not experts:
            return []
        found: set[int] = set()
        per_expert = re.compile(r".+\.experts\.(\d+)\.(?:gate|up|down)_proj\.weight")
        for key, shape in shapes.items():
            if (m := per_expert.fullmatch(key)) is not None:
                found.add(int(m.group(1)))
            elif key.endswith(".mlp.gate.weight") and shape and shape[0] != experts:
                return [f"config says num_experts={experts}, the router {key} has {shape[0]} rows"]
            elif self._experts.fullmatch(key) and shape and shape[0] != experts:
                return [f"config says num_experts={experts}, {key} holds {shape[0]} experts"]
        if found and max(found) + 1 != experts:
            return [f"config says num_experts={experts}, the weights number their experts 0..{max(found)}"]
        return []
