"""The sparse MoE block (router, grouped expert dispatch, shared expert) and the load-balancing loss.

Each piece is checked against a plain per-token rendering of reference §4.3 written here, and against
transformers' own blocks (``Qwen2MoeSparseMoeBlock`` with a shared expert, ``Qwen3MoeSparseMoeBlock``
without one) loaded with the *same parameter names* -- the fused 5.x layout.

Tolerances: fp32 results of two implementations differ only in summation order (a different matmul
kernel per expert block, the k weighted contributions added in another order); with O(1) activations
and widths <= 64 that is a few 1e-7, so 1e-6 is asserted.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from qwen_edu.models.moe import (
    Experts,
    RouterStats,
    SparseMoeBlock,
    TopKRouter,
    load_balancing_loss,
    router_stats,
)
from tests._checkpoints import randomize_all_parameters

H, E, K, W, SHARED = 32, 6, 2, 16, 24


def _block(shared: int = SHARED, norm: bool = False, k: int = K, experts: int = E, seed: int = 0,
           implementation: str = "auto") -> SparseMoeBlock:
    block = SparseMoeBlock(H, experts, k, W, norm_topk_prob=norm, shared_expert_intermediate_size=shared,
                           experts_implementation=implementation)
    return randomize_all_parameters(block, seed).eval()


def _x(tokens: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, tokens // 2, H, generator=torch.Generator().manual_seed(seed))


def naive_block(block: SparseMoeBlock, x: torch.Tensor) -> torch.Tensor:
    """Reference §4.3, one token at a time: softmax over all experts, top-k, weighted SwiGLU experts,
    plus the sigmoid-gated shared expert."""
    out = torch.zeros_like(x.reshape(-1, H))
    w_router = block.gate.weight
    gate_up, down = block.experts.gate_up_proj, block.experts.down_proj
    for t, token in enumerate(x.reshape(-1, H)):
        probs = torch.softmax(w_router @ token, dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, block.top_k)
        if block.gate.norm_topk_prob:
            weights = weights / weights.sum()
        for w, e in zip(weights, chosen.tolist(), strict=True):
            g, u = (gate_up[e] @ token).chunk(2)
            out[t] += w * (down[e] @ (F.silu(g) * u))
        if block.shared_expert is not None:
            out[t] += torch.sigmoid(block.shared_expert_gate.weight @ token) * block.shared_expert(token)
    return out.view_as(x)


@pytest.mark.parametrize("shared,norm", [(SHARED, False), (0, True), (SHARED, True), (0, False)])
@pytest.mark.parametrize("implementation", ["loop", "grouped_mm"])
def test_block_equals_the_per_token_definition(shared, norm, implementation):
    block = _block(shared, norm, implementation=implementation)
    x = _x()
    with torch.no_grad():
        out = block(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, naive_block(block, x), atol=1e-6, rtol=1e-6)
    assert block.router_logits.shape == (x.shape[0] * x.shape[1], E)


def test_router_softmax_is_over_all_experts_and_not_renormalised_by_default():
    router = randomize_all_parameters(TopKRouter(H, E, K), 1)
    x = _x().reshape(-1, H)
    logits, weights, indices = router(x)
    probs = torch.softmax(logits.float(), dim=-1)
    assert torch.equal(indices, torch.topk(probs, K).indices)
    torch.testing.assert_close(weights, torch.topk(probs, K).values)
    assert bool((weights.sum(-1) < 1).all()), "Qwen1.5-MoE keeps the raw probabilities of its top-k"
    router.norm_topk_prob = True
    torch.testing.assert_close(router(x)[1].sum(-1), torch.ones(x.shape[0]))


def test_bf16_router_weights_come_from_an_fp32_softmax():
    router = randomize_all_parameters(TopKRouter(H, E, K), 2).to(torch.bfloat16)
    x = _x().reshape(-1, H).to(torch.bfloat16)
    logits, weights, _ = router(x)
    assert logits.dtype == weights.dtype == torch.bfloat16
    expected = torch.topk(torch.softmax(logits.float(), dim=-1), K).values.to(torch.bfloat16)
    assert torch.equal(weights, expected)  # the same ops in the same order: bit-identical


def test_experts_that_receive_no_token_are_skipped_and_every_expert_can_be_hit():
    experts = randomize_all_parameters(Experts(E, H, W), 3)
    x = torch.randn(3, H)
    indices = torch.tensor([[5, 0], [5, 2], [0, 5]])  # experts 1, 3, 4 get nothing
    weights = torch.rand(3, 2)
    out = experts(x, indices, weights)
    for t in range(3):
        expected = sum(weights[t, j] * _expert(experts, int(indices[t, j]), x[t]) for j in range(2))
        torch.testing.assert_close(out[t], expected, atol=1e-6, rtol=1e-6)


def _expert(experts: Experts, e: int, token: torch.Tensor) -> torch.Tensor:
    g, u = (experts.gate_up_proj[e] @ token).chunk(2)
    return experts.down_proj[e] @ (F.silu(g) * u)


def test_the_dispatch_is_differentiable():
    block = _block(seed=4)
    x = _x().requires_grad_()
    block(x).square().sum().backward()
    assert x.grad is not None and block.experts.gate_up_proj.grad is not None
    assert block.gate.weight.grad is not None and block.gate.weight.grad.abs().sum() > 0
    hit = torch.unique(torch.topk(block.router_logits, K).indices)
    used = block.experts.down_proj.grad.flatten(1).abs().sum(1) > 0
    assert torch.equal(used.nonzero().flatten(), hit), "exactly the routed experts get gradients"


def _hf_config(shared: int, norm: bool, **more):
    return transformers.Qwen2MoeConfig(hidden_size=H, num_experts=E, num_experts_per_tok=K, moe_intermediate_size=W,
                                       shared_expert_intermediate_size=shared, norm_topk_prob=norm, **more)


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_parameter_names_and_outputs_match_transformers_qwen2_moe_block(impl):
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    config = _hf_config(SHARED, False)
    config._experts_implementation = impl
    theirs = Qwen2MoeSparseMoeBlock(config).eval()
    ours = _block(SHARED, False, seed=5)
    theirs.load_state_dict(ours.state_dict(), strict=True)  # identical names and shapes
    x = _x(seed=1)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-6)


def test_without_shared_expert_the_block_matches_transformers_qwen3_moe_block():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = transformers.Qwen3MoeConfig(hidden_size=H, num_experts=E, num_experts_per_tok=K,
                                         moe_intermediate_size=W, norm_topk_prob=True)
    theirs = Qwen3MoeSparseMoeBlock(config).eval()
    ours = _block(0, True, seed=6)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = _x(seed=2)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-6)


def test_bf16_block_follows_transformers_grouped_mm_rounding():
    """Same ops in bf16 (weights cast before the multiply, k contributions summed once). Different matmul
    kernels may still round a product differently, so we ask for bf16-ulp agreement (2**-7 relative on
    O(1) outputs, i.e. 1.6e-2 absolute), and that both are as close to the fp32 result as each other."""
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    theirs = Qwen2MoeSparseMoeBlock(_hf_config(SHARED, False)).eval()
    ours = _block(SHARED, False, seed=7)
    theirs.load_state_dict(ours.state_dict())
    x = _x(seed=3)
    with torch.no_grad():
        full = ours(x)
        a, b = ours.to(torch.bfloat16)(x.bfloat16()), theirs.to(torch.bfloat16)(x.bfloat16())
    assert a.dtype == torch.bfloat16
    torch.testing.assert_close(a, b, atol=1.6e-2, rtol=0)
    err_ours, err_theirs = (a.float() - full).abs().max(), (b.float() - full).abs().max()
    assert err_ours <= 1.5 * err_theirs + 1e-3


def test_invalid_block_shapes_are_rejected_with_the_field_name():
    with pytest.raises(ValueError, match="num_experts_per_tok=7 must be between 1 and num_experts=6"):
        SparseMoeBlock(H, E, 7, W)
    with pytest.raises(ValueError, match="moe_intermediate_size=0"):
        SparseMoeBlock(H, E, K, 0)
    with pytest.raises(ValueError, match="experts implementation"):
        _block(implementation="cuda-magic")


# ---- the auxiliary loss ------------------------------------------------------------------------------
def _router_logits(layers: int = 3, tokens: int = 24, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(tokens, E, generator=gen) * 2 for _ in range(layers))


@pytest.mark.parametrize("masked", [False, True])
def test_aux_loss_equals_transformers(masked):
    from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

    logits = _router_logits()
    mask = None
    if masked:
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[0, :5] = 0  # left padding
    ours = load_balancing_loss(logits, K, mask)
    theirs = load_balancing_loss_func(logits, E, K, mask)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


def test_aux_loss_is_k_when_balanced_and_grows_when_routing_collapses():
    # Uniform probabilities and every expert picked equally often: f_e = k/E, P_e = 1/E -> loss k.
    balanced = RouterStats(counts=torch.full((E,), 4.0 * K / E * 6), prob_sum=torch.full((E,), 4.0),
                           rows=torch.tensor(24.0))
    torch.testing.assert_close(balanced.loss(), torch.tensor(float(K)))
    collapsed = torch.zeros(24, E)
    collapsed[:, 0], collapsed[:, 1] = 20.0, 10.0  # everyone routes to experts 0 and 1
    loss = load_balancing_loss((collapsed,), K)
    assert 0.99 * E < loss <= E


def test_router_stats_accumulate_over_micro_batches_like_one_big_batch():
    """The global-batch recipe: add the counts (and sums) of micro-batches, then combine once."""
    logits = _router_logits(layers=2, tokens=30, seed=1)
    whole = router_stats(logits, K)
    parts = router_stats([x[:10] for x in logits], K) + router_stats([x[10:] for x in logits], K)
    assert torch.equal(parts.counts, whole.counts) and torch.equal(parts.rows, whole.rows)
    torch.testing.assert_close(parts.prob_sum, whole.prob_sum)
    assert whole.counts.sum() == 2 * 30 * K and whole.fraction.sum() == K
    torch.testing.assert_close(whole.mean_prob.sum(), torch.tensor(1.0))
    assert whole.counts.requires_grad is False


def test_router_stats_take_the_last_columns_of_a_decoding_mask():
    logits = _router_logits(layers=1, tokens=2)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])  # past 3 + 1 new token per row
    stats = router_stats(logits, K, mask)
    assert stats.rows == 2
    with pytest.raises(ValueError, match="does not cover the 2 routed tokens"):
        router_stats(logits, K, torch.ones(3, 5))
