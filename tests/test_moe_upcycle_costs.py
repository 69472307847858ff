"""Upcycling a dense model into an MoE, the cost calculator, and the MoE presets' published counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwen_edu.models import Qwen2ForCausalLM, QwenConfig
from qwen_edu.models.costs import count_parameters, flops_per_token, kv_cache_bytes_per_token, memory_estimate
from qwen_edu.models.presets import PRESETS, preset
from qwen_edu.models.qwen2_moe import Qwen2MoeConfig, Qwen2MoeForCausalLM
from qwen_edu.models.upcycle import expert_neurons, matched_dense_width, upcycle, widen_mlp
from tests._checkpoints import randomize_all_parameters

DENSE = QwenConfig(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def dense() -> Qwen2ForCausalLM:
    return randomize_all_parameters(Qwen2ForCausalLM(DENSE), seed=3).eval()


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(seed))


def _mlp_inputs(model, ids):
    """The input of every layer's MLP (post-attention norm output), captured with forward hooks."""
    seen = []
    hooks = [layer.post_attention_layernorm.register_forward_hook(lambda m, a, out: seen.append(out))
             for layer in model.model.layers]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return seen


# ---- upcycling -------------------------------------------------------------------------------------------
def test_with_silent_routed_experts_the_upcycled_model_is_the_dense_model(dense):
    """routed_scale=0: the only change is shared = 2*down * sigmoid(0) = down, which is exact in floating
    point (x2 and x1/2 are exact) and the routed part adds exact zeros. Only the matmul kernels may
    group the sums differently: 1e-6 on O(1) logits."""
    moe = upcycle(dense, num_experts=12, num_experts_per_tok=3, moe_intermediate_size=32, routed_scale=0.0).eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=1e-6, rtol=1e-6)


def test_upcycled_moe_deviates_from_the_dense_ffn_by_at_most_its_routed_part(dense):
    """Default recipe: each layer's MoE output = dense FFN(x) + sum_j p_j expert_j(x), so the deviation
    is bounded by sum_j p_j |expert_j(x)| (triangle inequality) -- small because p_j ~ 1/E."""
    moe = upcycle(dense, num_experts=12, num_experts_per_tok=3, moe_intermediate_size=32, seed=1).eval()
    ids = _ids(1)
    for x, dense_layer, layer in zip(_mlp_inputs(moe, ids), dense.model.layers, moe.model.layers, strict=True):
        block, flat = layer.mlp, x.reshape(-1, DENSE.hidden_size)
        with torch.no_grad():
            deviation = (block(x) - dense_layer.mlp(x)).reshape(-1, DENSE.hidden_size).norm(dim=-1)
            _, weights, chosen = block.gate(flat)
            experts = block.experts
            bound = torch.zeros(flat.shape[0])
            for j in range(block.top_k):
                for t in range(flat.shape[0]):
                    e = int(chosen[t, j])
                    g, u = (experts.gate_up_proj[e] @ flat[t]).chunk(2)
                    bound[t] += weights[t, j] * (experts.down_proj[e] @ (F.silu(g) * u)).norm()
        assert bool((deviation <= bound * (1 + 1e-5) + 1e-6).all())
        assert bool((weights.sum(-1) < 3 / 12 * 1.5).all()), "a fresh router gives each expert about 1/E"


def test_upcycled_model_nearly_keeps_the_dense_predictions_and_more_so_with_more_experts(dense):
    """The routed part scales with the router weights (~k/E each token), so the KL divergence between the
    upcycled and the dense next-token distributions should shrink roughly like (k/E)^2 as E grows."""
    ids = _ids(2)
    kls = []
    for experts in (12, 24, 48):
        moe = upcycle(dense, num_experts=experts, num_experts_per_tok=3, moe_intermediate_size=32, seed=2).eval()
        with torch.no_grad():
            a, b = moe(ids).logits, dense(ids).logits
        kls.append(float(F.kl_div(a.log_softmax(-1), b.log_softmax(-1), log_target=True, reduction="sum"))
                   / ids.numel())
    assert kls[0] > kls[1] > kls[2]
    assert kls[0] / kls[2] > 8, kls  # (48 / 12)^2 = 16 if exactly quadratic
    assert kls[2] < 1e-3, kls


def test_shared_expert_is_the_dense_ffn_and_experts_are_slices_of_shuffled_copies(dense):
    moe = upcycle(dense, num_experts=7, num_experts_per_tok=2, moe_intermediate_size=32, reinit_fraction=0.0, seed=4)
    gen = torch.Generator().manual_seed(4)
    neurons = expert_neurons(96, 7, 32, gen)  # the same draws upcycle made first for layer 0
    assert neurons.shape == (7, 32)
    # 7 experts of 32 neurons need ceil(224 / 96) = 3 copies; each copy is a permutation of all 96 neurons
    for copy in neurons.flatten()[:192].view(2, 96):
        assert sorted(copy.tolist()) == list(range(96))
    block, mlp = moe.model.layers[0].mlp, dense.model.layers[0].mlp
    assert torch.equal(block.shared_expert.gate_proj.weight, mlp.gate_proj.weight)
    assert torch.equal(block.shared_expert.down_proj.weight, 2 * mlp.down_proj.weight)
    assert torch.equal(block.shared_expert_gate.weight, torch.zeros(1, 48))
    for e in range(7):
        gate, up = block.experts.gate_up_proj[e].chunk(2)
        assert torch.equal(gate, mlp.gate_proj.weight[neurons[e]])
        assert torch.equal(up, mlp.up_proj.weight[neurons[e]])
        assert torch.equal(block.experts.down_proj[e], mlp.down_proj.weight[:, neurons[e]])


def test_randomisation_redraws_about_the_requested_fraction(dense):
    moe = upcycle(dense, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=48, reinit_fraction=0.5)
    plain = upcycle(dense, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=48, reinit_fraction=0.0)
    # layer 0: both drew the same neuron shuffle first, so the entries differ exactly where re-drawn
    changed = (moe.model.layers[0].mlp.experts.gate_up_proj != plain.model.layers[0].mlp.experts.gate_up_proj)
    assert 0.45 < changed.float().mean() < 0.55
    assert torch.equal(moe.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    assert moe.lm_head.weight is moe.model.embed_tokens.weight, "tied like the dense model"


def test_classic_upcycling_without_shared_expert(dense):
    """Whole-FFN copies, renormalised top-k, no randomisation: every token gets sum_j w_j FFN(x) = FFN(x)."""
    moe = upcycle(dense, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=96, shared_expert=False,
                  norm_topk_prob=True, reinit_fraction=0.0).eval()
    assert moe.model.layers[0].mlp.shared_expert is None
    ids = _ids(3)
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)


def test_widened_dense_model_computes_the_same_function(dense):
    wide = widen_mlp(dense, 250, seed=5).eval()
    assert wide.config.intermediate_size == 250 and wide.model.layers[0].mlp.up_proj.weight.shape == (250, 48)
    ids = _ids(4)
    with torch.no_grad():
        torch.testing.assert_close(wide(ids).logits, dense(ids).logits, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="can only grow"):
        widen_mlp(dense, 64)


def test_upcycling_errors_name_the_problem(dense):
    with pytest.raises(ValueError, match="moe_intermediate_size=40 must divide the dense intermediate_size=96"):
        upcycle(dense, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40)
    with pytest.raises(ValueError, match="num_experts_per_tok=5 must be between 1 and num_experts=4"):
        upcycle(dense, num_experts=4, num_experts_per_tok=5, moe_intermediate_size=32)


def test_matched_dense_widths():
    config = preset("Qwen1.5-MoE-A2.7B")
    assert matched_dense_width(config, "activated") == 5632 + 4 * 1408
    assert matched_dense_width(config, "total") == 5632 + 60 * 1408


# ---- costs -----------------------------------------------------------------------------------------------
MOE_TINY = Qwen2MoeConfig(vocab_size=100, hidden_size=32, intermediate_size=40, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, num_experts=5, num_experts_per_tok=2,
                          moe_intermediate_size=12, shared_expert_intermediate_size=20, mlp_only_layers=[0],
                          decoder_sparse_step=1, tie_word_embeddings=True)


@pytest.mark.parametrize("name", [n for n, p in PRESETS.items() if p.values.get("model_type") in
                                  ("qwen", "qwen2", "qwen2_moe")] + ["moe-tiny", "moe-tiny-noshared-step2"])
def test_parameter_count_equals_the_model(name):
    if name == "moe-tiny":
        config = MOE_TINY
    elif name == "moe-tiny-noshared-step2":
        config = MOE_TINY.replace(shared_expert_intermediate_size=0, decoder_sparse_step=2, tie_word_embeddings=False)
    else:
        config = preset(name)
    with torch.device("meta"):
        model = Qwen2MoeForCausalLM(config) if config.model_type == "qwen2_moe" else Qwen2ForCausalLM(config)
    counts = count_parameters(config)
    assert counts.total == model.num_parameters()
    assert counts.total - counts.embedding == model.num_parameters(exclude_embeddings=True)
    assert counts.activated <= counts.total


def _activated_by_modules(model) -> float:
    """Activated parameters from the module tree, independently: everything, except that a sparse block
    contributes only k / E of its routed experts."""
    total = float(model.num_parameters())
    for block in model.sparse_blocks():
        routed = block.experts.gate_up_proj.numel() + block.experts.down_proj.numel()
        total -= routed * (1 - block.top_k / block.num_experts)
    return total


def test_activated_parameters_agree_with_the_module_tree():
    for config in (MOE_TINY, preset("Qwen1.5-MoE-A2.7B"), preset("Qwen2-57B-A14B")):
        with torch.device("meta"):
            model = Qwen2MoeForCausalLM(config)
        assert count_parameters(config).activated == round(_activated_by_modules(model))


def test_moe_presets_match_the_published_figures():
    a27 = count_parameters(preset("Qwen1.5-MoE-A2.7B"))
    assert a27.total == PRESETS["Qwen1.5-MoE-A2.7B"].exact_params == 14_315_784_192
    assert round(a27.activated / 1e9, 1) == PRESETS["Qwen1.5-MoE-A2.7B"].published_activated == 2.7
    q57 = count_parameters(preset("Qwen2-57B-A14B"))
    assert round(q57.total / 1e9) == PRESETS["Qwen2-57B-A14B"].published_params == 57
    assert round(q57.activated / 1e9) == PRESETS["Qwen2-57B-A14B"].published_activated == 14
    assert preset("Qwen2-57B-A14B").num_kv_groups == 7 and preset("Qwen1.5-MoE-A2.7B").num_kv_groups == 1


def test_flops_per_token_counts_twice_the_activated_matmul_weights():
    for config in (MOE_TINY, preset("Qwen2-0.5B"), preset("Qwen1.5-MoE-A2.7B")):
        with torch.device("meta"):
            model = (Qwen2MoeForCausalLM if config.model_type == "qwen2_moe" else Qwen2ForCausalLM)(config)
        matmul = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
        if config.model_type == "qwen2_moe":
            matmul = matmul + sum(b.gate.weight.numel() + b.top_k / b.num_experts *
                                  (b.experts.gate_up_proj.numel() + b.experts.down_proj.numel())
                                  for b in model.sparse_blocks())
        assert flops_per_token(config) == round(2 * matmul)
        per_key = 4 * config.num_hidden_layers * config.num_attention_heads * config.head_dim
        assert flops_per_token(config, context=100) - flops_per_token(config) == 100 * per_key
        assert flops_per_token(config, 10, training=True) == 3 * flops_per_token(config, 10)


def test_kv_cache_and_memory():
    # 2 (k and v) x layers x kv heads x head dim x 2 bytes
    assert kv_cache_bytes_per_token(preset("Qwen2-7B")) == 2 * 28 * 4 * 128 * 2 == 57_344
    assert kv_cache_bytes_per_token(preset("Qwen1.5-MoE-A2.7B"), "float32") == 2 * 24 * 16 * 128 * 4
    estimate = memory_estimate(preset("Qwen1.5-MoE-A2.7B"), context_length=8192, batch_size=2)
    assert estimate.weights == 14_315_784_192 * 2  # bf16: every expert stays resident
    assert estimate.kv_cache == 2 * 8192 * 2 * 24 * 16 * 128 * 2
    assert estimate.total == estimate.weights + estimate.kv_cache
