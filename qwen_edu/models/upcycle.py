"""Upcycling: turn a trained dense Qwen into a sparse MoE that starts out computing (nearly) the same function.

Qwen1.5-MoE-A2.7B was initialised from Qwen-1.8B and Qwen2-57B-A14B from a dense model the same way
(the Qwen2 report calls it upcycling, after Komatsuzaki et al.): the experts are cut from copies of
the dense FFN, with randomness added so that they can grow apart. :func:`upcycle` is the book's
concrete recipe in that spirit (the exact proportions Qwen used are not all public):

1. **Shared expert = the dense FFN.** Its sigmoid gate starts at weight 0 (``sigmoid(0) = 1/2``) and
   its ``down_proj`` is doubled, so ``shared(x) = FFN(x)`` exactly (multiplying by 2 and by 1/2 is
   exact in floating point).
2. **Routed experts = fine-grained slices of shuffled copies.** The FFN's ``F`` neurons are copied
   ``ceil(E * I / F)`` times; each copy is shuffled along the intermediate dimension (a different
   permutation per copy) and cut into ``F / I`` slices of ``I`` neurons; the first ``E`` slices become
   the experts (gate/up rows, down columns). Then a fraction ``reinit_fraction`` of each expert's
   entries is re-drawn at random with the dense tensor's standard deviation (the Qwen2 report describes
   re-initialising part of each expert; half is the book's default), so that even two slices holding
   the same neurons differ.
3. **A fresh router** ``N(0, router_std)``: every expert starts with probability close to ``1 / E``.

Because Qwen1.5-MoE does not renormalise the top-k weights, a token's routed output is
``sum_{j<k} p_j * expert_j(x)`` with ``p_j ~ 1/E``: a small perturbation of the dense function,
bounded by ``sum_j p_j * |expert_j(x)|`` (scale it further with ``routed_scale``; ``0`` makes the
upcycled model *exactly* the dense one). Training then grows the routed experts apart.

:func:`widen_mlp` is the dense counterpart used for fair baselines: a wider FFN whose new neurons are
(perturbed) copies with zero output weights, so the widened model computes exactly the same function.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from qwen_edu.models.config import QwenConfig
from qwen_edu.models.moe import SparseMoeBlock
from qwen_edu.models.qwen2 import Qwen2ForCausalLM
from qwen_edu.models.qwen2_moe import Qwen2MoeConfig, Qwen2MoeForCausalLM

__all__ = ["upcycle", "widen_mlp", "moe_config_from_dense", "expert_neurons", "matched_dense_width"]


def _dense_fields(config: QwenConfig) -> dict:
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(QwenConfig)}
    fields["extra"] = {k: v for k, v in config.extra.items() if k != "architectures"}
    return fields


def moe_config_from_dense(config: QwenConfig, *, num_experts: int, num_experts_per_tok: int,
                          moe_intermediate_size: int, shared_expert: bool = True,
                          norm_topk_prob: bool = False, **overrides) -> Qwen2MoeConfig:
    """The MoE config of an upcycled ``config``: every layer sparse, the shared expert as wide as the FFN."""
    if config.model_type not in ("qwen2", "qwen2_moe") or config.mlp_bias or config.o_bias:
        raise ValueError("upcycling needs a Qwen2-style dense model (bias-free MLP and o_proj)")
    fields = _dense_fields(config)
    fields.update(model_type="qwen2_moe", num_experts=num_experts, num_experts_per_tok=num_experts_per_tok,
                  moe_intermediate_size=moe_intermediate_size, norm_topk_prob=norm_topk_prob,
                  shared_expert_intermediate_size=config.intermediate_size if shared_expert else 0,
                  decoder_sparse_step=1, mlp_only_layers=[])
    fields.update(overrides)
    return Qwen2MoeConfig(**fields)


def expert_neurons(dense_width: int, num_experts: int, expert_width: int, generator: torch.Generator
                   ) -> torch.Tensor:
    """``[E, I]`` dense-neuron indices per expert: slices of shuffled copies of ``range(dense_width)``."""
    if expert_width < 1 or dense_width % expert_width:
        raise ValueError(f"moe_intermediate_size={expert_width} must divide the dense intermediate_size="
                         f"{dense_width} (each expert is a slice of the FFN)")
    copies = math.ceil(num_experts * expert_width / dense_width)
    order = torch.cat([torch.randperm(dense_width, generator=generator) for _ in range(copies)])
    return order[:num_experts * expert_width].view(num_experts, expert_width)


def _reinit_(tensor: torch.Tensor, fraction: float, std: float, generator: torch.Generator) -> None:
    """Re-draw a random ``fraction`` of the entries from ``N(0, std)``, in place."""
    if fraction <= 0:
        return
    mask = (torch.rand(tensor.shape, generator=generator) < fraction).to(tensor.device)
    fresh = (torch.randn(tensor.shape, generator=generator) * std).to(tensor)
    tensor.copy_(torch.where(mask, fresh, tensor))


@torch.no_grad()
def _upcycle_block(block: SparseMoeBlock, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, *,
                   reinit_fraction: float, router_std: float, routed_scale: float,
                   generator: torch.Generator) -> None:
    experts = block.experts
    width = experts.intermediate_size
    neurons = expert_neurons(gate.shape[0], experts.num_experts, width, generator)
    experts.gate_up_proj.copy_(torch.cat([gate[neurons], up[neurons]], dim=1))  # [E, 2I, H]
    experts.down_proj.copy_(down[:, neurons].permute(1, 0, 2) * routed_scale)  # [E, H, I]
    _reinit_(experts.gate_up_proj[:, :width], reinit_fraction, float(gate.std()), generator)
    _reinit_(experts.gate_up_proj[:, width:], reinit_fraction, float(up.std()), generator)
    _reinit_(experts.down_proj, reinit_fraction, float(down.std()) * routed_scale, generator)
    block.gate.weight.copy_(torch.randn(block.gate.weight.shape, generator=generator) * router_std)
    if block.shared_expert is not None and block.shared_expert_gate is not None:
        block.shared_expert.gate_proj.weight.copy_(gate)
        block.shared_expert.up_proj.weight.copy_(up)
        block.shared_expert.down_proj.weight.copy_(down * 2)  # sigmoid(0) = 1/2 halves it back, exactly
        block.shared_expert_gate.weight.zero_()


@torch.no_grad()
def upcycle(dense: Qwen2ForCausalLM, *, num_experts: int, num_experts_per_tok: int, moe_intermediate_size: int,
            shared_expert: bool = True, norm_topk_prob: bool = False, reinit_fraction: float = 0.5,
            router_std: float = 0.02, routed_scale: float = 1.0, seed: int = 0) -> Qwen2MoeForCausalLM:
    """A :class:`Qwen2MoeForCausalLM` initialised from ``dense`` (see the module docstring).

    Attention, norms, embeddings and head are copied unchanged; every layer's FFN becomes a sparse
    block. Without a shared expert the function is only (nearly) preserved when each expert is a
    whole copy (``moe_intermediate_size`` = the dense width), ``norm_topk_prob=True`` and
    ``reinit_fraction=0`` -- the original sparse-upcycling recipe.
    """
    config = moe_config_from_dense(dense.config, num_experts=num_experts, num_experts_per_tok=num_experts_per_tok,
                                   moe_intermediate_size=moe_intermediate_size, shared_expert=shared_expert,
                                   norm_topk_prob=norm_topk_prob)
    reference = dense.lm_head.weight
    model = Qwen2MoeForCausalLM(config).to(device=reference.device, dtype=reference.dtype)
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(".mlp." in k for k in missing), (missing, unexpected)
    generator = torch.Generator().manual_seed(seed)
    for dense_layer, layer in zip(dense.model.layers, model.model.layers, strict=True):
        mlp = dense_layer.mlp
        _upcycle_block(layer.mlp, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight,
                       reinit_fraction=reinit_fraction, router_std=router_std, routed_scale=routed_scale,
                       generator=generator)
    model.tie_weights()
    return model.train(dense.training)


@torch.no_grad()
def widen_mlp(dense: Qwen2ForCausalLM, intermediate_size: int, *, reinit_fraction: float = 0.5,
              seed: int = 0) -> Qwen2ForCausalLM:
    """A copy of ``dense`` with FFNs ``intermediate_size`` wide that computes exactly the same function.

    New neuron ``j`` copies a random old neuron's gate/up rows (with ``reinit_fraction`` of the entries
    re-drawn, like the routed experts of :func:`upcycle`) and gets a zero ``down_proj`` column.
    """
    old = dense.config.intermediate_size
    if intermediate_size < old:
        raise ValueError(f"widen_mlp can only grow the FFN: {intermediate_size} < {old}")
    config = dense.config.replace(intermediate_size=intermediate_size, extra=dict(dense.config.extra))
    reference = dense.lm_head.weight
    model = Qwen2ForCausalLM(config).to(device=reference.device, dtype=reference.dtype)
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    model.load_state_dict(state, strict=False)
    generator = torch.Generator().manual_seed(seed)
    extra = intermediate_size - old
    for dense_layer, layer in zip(dense.model.layers, model.model.layers, strict=True):
        src, dst = dense_layer.mlp, layer.mlp
        picks = torch.cat([torch.randperm(old, generator=generator) for _ in range(math.ceil(extra / old))])[:extra]
        for name in ("gate_proj", "up_proj"):
            w_old, w_new = getattr(src, name).weight, getattr(dst, name).weight
            w_new[:old] = w_old
            w_new[old:] = w_old[picks]
            _reinit_(w_new[old:], reinit_fraction, float(w_old.std()), generator)
        dst.down_proj.weight[:, :old] = src.down_proj.weight
        dst.down_proj.weight[:, old:] = 0
    model.tie_weights()
    return model.train(dense.training)


def matched_dense_width(config: Qwen2MoeConfig, match: str = "activated") -> int:
    """The FFN width of a dense model with the MoE's ``"activated"`` or ``"total"`` FFN neurons per layer."""
    shared = config.shared_expert_intermediate_size
    experts = config.num_experts_per_tok if match == "activated" else config.num_experts
    if match not in ("activated", "total"):
        raise ValueError(f"match must be 'activated' or 'total', got {match!r}")
    return shared + experts * config.moe_intermediate_size
