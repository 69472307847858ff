"""Gated DeltaNet (qwen_edu.models.gated_deltanet): the recurrence, its chunked form, the causal conv,
the cache, and the whole Qwen3-Next layer against transformers' pure-PyTorch path.

Tolerances: the recurrent and the chunked forms are the same sums in a different order (a triangular
solve instead of a token loop), in fp32; over a few hundred tokens they differ by ~1e-6 relative to
outputs of O(1), so 2e-5 is a safe bound. Our chunked function does HF's chunked operations in the
same order (measured: bit-identical), our recurrent step uses matmuls where HF sums products (~1e-7).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qwen_edu.models.gated_deltanet import (
    DeltaNetState,
    GatedDeltaNet,
    causal_conv1d,
    chunk_gated_delta_rule,
    l2norm,
    recurrent_gated_delta_rule,
)
from tests._checkpoints import randomize_all_parameters

FORM_ATOL = 2e-5


def _inputs(b=2, h=3, length=150, d_k=16, d_v=8, g_max=2.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = l2norm(torch.randn(b, h, length, d_k, generator=gen)) / math.sqrt(d_k)
    k = l2norm(torch.randn(b, h, length, d_k, generator=gen))
    v = torch.randn(b, h, length, d_v, generator=gen)
    g = -g_max * torch.rand(b, h, length, generator=gen)
    beta = torch.rand(b, h, length, generator=gen)
    return q, k, v, g, beta


# --- the recurrence ---------------------------------------------------------------------------------
def test_delta_rule_erases_then_writes():
    """With beta = 1, no decay and a unit key, a second write under the same key *replaces* the value."""
    k = torch.tensor([1.0, 0.0, 0.0])[None, None, None].expand(1, 1, 2, 3)
    v = torch.tensor([[2.0, -1.0], [5.0, 7.0]])[None, None]
    zeros, ones = torch.zeros(1, 1, 2), torch.ones(1, 1, 2)
    out, state = recurrent_gated_delta_rule(k, k, v, zeros, ones)
    torch.testing.assert_close(out[0, 0, 1], torch.tensor([5.0, 7.0]))   # reads back v2, not v1 + v2
    torch.testing.assert_close(state[0, 0], torch.tensor([[5.0, 7.0], [0.0, 0.0], [0.0, 0.0]]))
    # Plain linear attention (S += k v^T) would have summed both: that is what the delta term removes.
    assert not torch.allclose(out[0, 0, 1], v[0, 0].sum(0))


def test_gate_forgets():
    """g = log(0.5) halves the memory every step before the write."""
    q, k, v, _, beta = _inputs(length=3)
    g = torch.full(beta.shape, math.log(0.5))
    _, states = recurrent_gated_delta_rule(q, k, v, g, beta, output_all_states=True)
    _, from_second = recurrent_gated_delta_rule(q[:, :, 1:2], k[:, :, 1:2], v[:, :, 1:2], g[:, :, 1:2],
                                                beta[:, :, 1:2], initial_state=states[:, :, 0])
    torch.testing.assert_close(from_second, states[:, :, 1])
    very_negative = torch.full(beta.shape, -80.0)
    _, forgotten = recurrent_gated_delta_rule(q, k, v, very_negative, beta, output_all_states=True)
    only_last = torch.einsum("bhk,bhv->bhkv", k[:, :, 2], beta[:, :, 2, None] * v[:, :, 2])
    torch.testing.assert_close(forgotten[:, :, 2], only_last)  # nothing of tokens 0-1 survives


@pytest.mark.parametrize("length,chunk,g_max", [(150, 64, 2.0), (64, 64, 0.05), (7, 64, 5.0), (100, 16, 1.0)])
def test_chunked_equals_recurrent(length, chunk, g_max):
    q, k, v, g, beta = _inputs(length=length, g_max=g_max)
    o_rec, s_rec = recurrent_gated_delta_rule(q, k, v, g, beta)
    o_chunk, s_chunk = chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=chunk)
    assert o_chunk.shape == (2, 3, length, 8) and s_chunk.shape == (2, 3, 16, 8)
    assert o_chunk.dtype == s_chunk.dtype == torch.float32
    torch.testing.assert_close(o_chunk, o_rec, atol=FORM_ATOL, rtol=0)
    torch.testing.assert_close(s_chunk, s_rec, atol=FORM_ATOL, rtol=0)


def test_initial_state_continues_a_sequence():
    q, k, v, g, beta = _inputs(length=130)
    whole, s_whole = chunk_gated_delta_rule(q, k, v, g, beta)
    first, s_first = chunk_gated_delta_rule(*(t[:, :, :70] for t in (q, k, v, g, beta)))
    second, s_second = chunk_gated_delta_rule(*(t[:, :, 70:] for t in (q, k, v, g, beta)), initial_state=s_first)
    torch.testing.assert_close(torch.cat([first, second], dim=2), whole, atol=FORM_ATOL, rtol=0)
    torch.testing.assert_close(s_second, s_whole, atol=FORM_ATOL, rtol=0)
    step, s_step = recurrent_gated_delta_rule(*(t[:, :, 70:] for t in (q, k, v, g, beta)), initial_state=s_first)
    torch.testing.assert_close(step, second, atol=FORM_ATOL, rtol=0)


def test_all_states_end_in_the_final_state():
    q, k, v, g, beta = _inputs(length=9)
    out, final = recurrent_gated_delta_rule(q, k, v, g, beta)
    out_all, states = recurrent_gated_delta_rule(q, k, v, g, beta, output_all_states=True)
    assert states.shape == (2, 3, 9, 16, 8)
    assert torch.equal(states[:, :, -1], final) and torch.equal(out_all, out)  # same ops, same order


def test_kernels_match_transformers():
    hf = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    gen = torch.Generator().manual_seed(3)
    b, length, h, d_k, d_v = 2, 100, 4, 16, 8
    q, k = torch.randn(b, length, h, d_k, generator=gen), torch.randn(b, length, h, d_k, generator=gen)
    v = torch.randn(b, length, h, d_v, generator=gen)
    g, beta = -torch.rand(b, length, h, generator=gen), torch.rand(b, length, h, generator=gen)
    ours_q = l2norm(q.transpose(1, 2)) / math.sqrt(d_k)
    ours_k = l2norm(k.transpose(1, 2))
    args = (ours_q, ours_k, v.transpose(1, 2), g.transpose(1, 2), beta.transpose(1, 2))
    for ours_fn, theirs_fn in [(chunk_gated_delta_rule, hf.torch_chunk_gated_delta_rule),
                               (recurrent_gated_delta_rule, hf.torch_recurrent_gated_delta_rule)]:
        o_theirs, s_theirs = theirs_fn(q, k, v, g=g, beta=beta, output_final_state=True, use_qk_l2norm_in_kernel=True)
        o_ours, s_ours = ours_fn(*args)
        torch.testing.assert_close(o_ours.transpose(1, 2), o_theirs, atol=1e-6, rtol=0)
        torch.testing.assert_close(s_ours, s_theirs, atol=1e-6, rtol=0)


# --- the causal conv --------------------------------------------------------------------------------
def test_causal_conv_matches_padded_conv_and_steps():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 6, 20, generator=gen), torch.randn(6, 4, generator=gen)
    y, state = causal_conv1d(x, w)
    reference = F.silu(F.conv1d(x, w[:, None], padding=3, groups=6)[..., :20])
    torch.testing.assert_close(y, reference, atol=1e-6, rtol=0)
    assert torch.equal(state, x[..., -3:])  # the last K-1 inputs, pre-activation
    steps, st = [], None
    for t in range(20):
        out, st = causal_conv1d(x[..., t:t + 1], w, st)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, dim=-1), y, atol=1e-6, rtol=0)
    short, short_state = causal_conv1d(x[..., :2], w)
    assert torch.equal(short_state[..., 0], torch.zeros(2, 6)) and torch.equal(short_state[..., 1:], x[..., :2])


# --- the layer --------------------------------------------------------------------------------------
SIZES = dict(hidden_size=32, num_k_heads=2, num_v_heads=4, head_k_dim=8, head_v_dim=6, conv_kernel_size=4)


def _hf_config():
    transformers = pytest.importorskip("transformers")
    return transformers.Qwen3NextConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
        head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
        linear_value_head_dim=6, linear_conv_kernel_dim=4, num_experts=2, num_experts_per_tok=1,
        moe_intermediate_size=8, shared_expert_intermediate_size=8)


@pytest.fixture(scope="module")
def layers():
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    theirs = randomize_all_parameters(Qwen3NextGatedDeltaNet(_hf_config(), 0), seed=5).eval()
    ours = GatedDeltaNet(**SIZES).eval()
    ours.load_state_dict(theirs.state_dict())  # strict: the parameter names are the checkpoint's
    return ours, theirs


def _x(b=2, length=100, seed=1):
    return torch.randn(b, length, 32, generator=torch.Generator().manual_seed(seed))


def test_layer_matches_transformers(layers):
    ours, theirs = layers
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)


def test_layer_decoding_with_state_equals_full_sequence(layers):
    ours, _ = layers
    x = _x()
    with torch.no_grad():
        full = ours(x)
        state = DeltaNetState()
        parts = [ours(x[:, :50], state), ours(x[:, 50:69], state)]  # prefill, then a second chunk
        parts += [ours(x[:, t:t + 1], state) for t in range(69, 100)]
    assert state.seen == 100
    assert state.conv is not None and state.conv.shape == (2, ours.conv_dim, 3)
    assert state.recurrent is not None and state.recurrent.shape == (2, 4, 8, 6)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=FORM_ATOL, rtol=0)


def test_state_size_does_not_grow(layers):
    ours, _ = layers
    sizes = []
    with torch.no_grad():
        for length in (10, 100, 400):
            state = DeltaNetState()
            ours(_x(length=length), state)
            sizes.append(state.nbytes())
    assert sizes[0] == sizes[1] == sizes[2] == 2 * 4 * (ours.conv_dim * 3 + 4 * 8 * 6)


def test_left_padding_is_neutral(layers):
    ours, _ = layers
    x = _x(b=1, length=30)
    padded = torch.cat([torch.randn(1, 5, 32), x], dim=1)  # garbage in the padding slots
    mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 30)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(ours(padded, padding_mask=mask)[:, 5:], ours(x), atol=1e-5, rtol=0)


def test_rollback_equals_recomputation(layers):
    ours, _ = layers
    x = _x(length=64)
    with torch.no_grad():
        reference = DeltaNetState()
        ours(x[:, :58], reference)
        state = DeltaNetState()
        ours(x[:, :55], state)
        state.keep_history = True
        ours(x[:, 55:61], state)          # 6 tokens, then the last 3 are "rejected"
        state.rollback(3)
        assert state.seen == 58 and state.history is None
        torch.testing.assert_close(state.recurrent, reference.recurrent, atol=FORM_ATOL, rtol=0)
        assert torch.equal(state.conv, reference.conv)
        state.keep_history = False
        torch.testing.assert_close(ours(x[:, 58:], state), ours(x[:, 58:], reference), atol=FORM_ATOL, rtol=0)


def test_rollback_limits_and_head_errors(layers):
    ours, _ = layers
    state = DeltaNetState(keep_history=True)
    with torch.no_grad():
        ours(_x(length=4), state)
    state.rollback(4)  # the whole last call: back to the empty memory
    assert state.seen == 0 and float(state.recurrent.abs().max()) == 0.0
    with pytest.raises(ValueError, match="cannot roll back 1 tokens"):
        state.rollback(1)
    with pytest.raises(ValueError, match="linear_num_value_heads=5 must be a multiple of linear_num_key_heads=2"):
        GatedDeltaNet(**{**SIZES, "num_v_heads": 5})


def test_bf16_layer_close_to_transformers(layers):
    ours, theirs = layers
    ours16, theirs16 = (GatedDeltaNet(**SIZES).to(torch.bfloat16), theirs.__class__(_hf_config(), 0))
    ours16.load_state_dict(ours.state_dict())
    theirs16 = theirs16.to(torch.bfloat16).eval()
    theirs16.load_state_dict(theirs.state_dict())
    x = _x().to(torch.bfloat16)
    with torch.no_grad():
        a, b = ours16(x), theirs16(x)
    assert a.dtype == torch.bfloat16
    # Same bf16 projections, conv and norms; the fp32 recurrence sums differ in order only.
    torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=0)
