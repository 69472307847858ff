"""Each building block against its transformers counterpart (bit-exact where the ops are the same)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.qwen2 import modeling_qwen2 as hf

from qwen_edu.models import (
    MLP,
    KVCache,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary_pos_emb,
    causal_mask,
    compute_rope_parameters,
    eager_attention,
    repeat_kv,
    rotate_half,
)
from qwen_edu.models.layers import Attention
from qwen_edu.models.rope import qwen1_ntk_alpha
from tests._checkpoints import tiny_qwen2_config


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_reference_bitwise(dtype):
    torch.manual_seed(0)
    ours, ref = RMSNorm(48, eps=1e-6), hf.Qwen2RMSNorm(48, eps=1e-6)
    with torch.no_grad():
        ours.weight.normal_(1.0, 0.3)
        ref.weight.copy_(ours.weight)
    ours, ref = ours.to(dtype), ref.to(dtype)
    x = (torch.randn(3, 5, 48) * 4).to(dtype)
    # The same op sequence as the reference, but the mean is a reduction whose SIMD blocking can
    # differ between kernels and CPUs: allow a few fp32 ulp, which after the cast to bf16 can
    # flip the last bf16 bit (2**-8 relative).
    tolerance = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=0.0)
    torch.testing.assert_close(ours(x), ref(x), **tolerance)
    assert ours(x).dtype == dtype


def test_rotate_half_and_apply_rotary_match_reference():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 6, 16, dtype=torch.bfloat16), torch.randn(2, 2, 6, 16, dtype=torch.bfloat16)
    cos, sin = torch.randn(2, 6, 16, dtype=torch.bfloat16), torch.randn(2, 6, 16, dtype=torch.bfloat16)
    assert torch.equal(rotate_half(q), hf.rotate_half(q))  # pure data movement and sign flips
    # Element-wise multiplies and adds in the same order are correctly rounded IEEE operations,
    # so they are bit-identical on every CPU (no reduction, no transcendental function).
    for a, b in zip(apply_rotary_pos_emb(q, k, cos, sin), hf.apply_rotary_pos_emb(q, k, cos, sin)):
        assert torch.equal(a, b)


def test_rotation_in_fp32_when_tables_are_fp32():
    """Qwen-1 style: fp32 cos/sin rotate a bf16 q in fp32 and cast back once."""
    torch.manual_seed(0)
    q = torch.randn(1, 2, 5, 8).to(torch.bfloat16)
    cos, sin = torch.rand(1, 5, 8), torch.rand(1, 5, 8)
    q_out, _ = apply_rotary_pos_emb(q, q, cos, sin)
    expected = (q.float() * cos[:, None] + rotate_half(q.float()) * sin[:, None]).to(torch.bfloat16)
    assert q_out.dtype == torch.bfloat16 and torch.equal(q_out, expected)  # element-wise IEEE ops: exact


def _hf_rotary(**rope):
    config = tiny_qwen2_config(max_position_embeddings=64, rope_parameters={"rope_theta": 10000.0, **rope})
    return hf.Qwen2RotaryEmbedding(config)


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "dynamic", "factor": 2.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "beta_fast": 16, "truncate": False},
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_tables_match_reference(scaling, dtype):
    ref = _hf_rotary(**(scaling or {"rope_type": "default"}))
    ours = RotaryEmbedding(16, 10000.0, scaling, max_position_embeddings=64)
    assert ours.inv_freq.dtype == torch.float32
    # The frequencies are the reference's own expression on the same [d/2] vector (a deterministic
    # repeat of the same kernels), so they must agree to the bit; that is what keeps long positions
    # from drifting apart.
    assert torch.equal(ours.inv_freq, ref.inv_freq) and ours.attention_scaling == ref.attention_scaling
    x = torch.zeros(1, dtype=dtype)
    # cos/sin may run through vectorised or scalar code depending on layout and CPU, which can differ
    # by one ulp of the fp32 result (|cos| <= 1, so 2**-23 absolute), and that may flip the last bit
    # of a bf16 value (2**-8 for |x| <= 1).
    tolerance = dict(rtol=0.0, atol=2**-22) if dtype == torch.float32 else dict(rtol=0.0, atol=2**-8)
    # Short, long (beyond max_position_embeddings: dynamic NTK grows its base), then short again (reset).
    for length in (10, 100, 20):
        pos = torch.arange(length)[None].expand(2, length)
        for a, b in zip(ours(x, pos), ref(x, pos)):
            assert a.dtype == dtype
            torch.testing.assert_close(a, b, **tolerance, msg=lambda m, s=scaling, n=length: f"{s} at {n}: {m}")


def test_rope_frequencies_stay_fp32_after_casting_the_model():
    rope = RotaryEmbedding(16, 1e6)
    expected = rope.inv_freq.clone()
    rope.to(torch.bfloat16)
    assert rope.inv_freq.dtype == torch.float32 and torch.equal(rope.inv_freq, expected)


def test_yarn_worked_example_from_reference():
    """§2.3: head_dim 128, base 1e6, factor 4, L0 32768 -> attention factor 1.13863."""
    _, factor = compute_rope_parameters(128, 1e6, {"rope_type": "yarn", "factor": 4.0,
                                                    "original_max_position_embeddings": 32768})
    assert factor == pytest.approx(0.1 * math.log(4) + 1) and round(factor, 5) == 1.13863


def test_qwen1_ntk_alpha_and_logn_examples():
    """§5.4/§5.5 worked examples for seq_length 8192."""
    assert [qwen1_ntk_alpha(n, 8192) for n in (1, 8192, 8193, 16384, 16385, 32768, 32769)] == [1, 1, 3, 3, 7, 7, 15]
    inv_freq, _ = compute_rope_parameters(128, 10000.0, {"rope_type": "qwen1_ntk", "seq_length": 8192}, seq_len=10000)
    base = 10000.0 * 3 ** (128 / 126)
    assert base == pytest.approx(30527.7, abs=0.1)
    torch.testing.assert_close(inv_freq, 1.0 / base ** (torch.arange(0, 128, 2).float() / 128))
    attn = Attention(32, 2, logn_seq_length=8192)
    factors = attn._logn(torch.tensor([[0, 8191, 8192, 16383, 32767]]))[0, 0, :, 0]
    torch.testing.assert_close(factors, torch.tensor([1.0, 1.0, math.log(8193) / math.log(8192), 1.0769, 1.1538]),
                               atol=1e-4, rtol=0)


def test_repeat_kv_is_repeat_interleave():
    x = torch.randn(2, 3, 5, 4)
    assert torch.equal(repeat_kv(x, 4), x.repeat_interleave(4, dim=1))
    assert torch.equal(repeat_kv(x, 4), hf.repeat_kv(x, 4))
    assert repeat_kv(x, 1) is x


def test_mlp_matches_reference():
    torch.manual_seed(0)
    ref = hf.Qwen2MLP(tiny_qwen2_config())
    ours = MLP(64, 112)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64)
    # Same weights and ops, but matmuls are reductions: fp32 summation-order rounding only.
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-6, atol=1e-6)


def test_causal_mask_bottom_right_and_padding():
    m = causal_mask(2, 4, torch.float32, padding_mask=torch.tensor([[0, 1, 1, 1]]))
    neg = torch.finfo(torch.float32).min
    assert m.shape == (1, 1, 2, 4)
    assert torch.equal(m[0, 0], torch.tensor([[neg, 0.0, 0.0, neg], [neg, 0.0, 0.0, 0.0]]))


def test_eager_and_sdpa_attention_agree_with_gqa_and_mask():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 5, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    mask = causal_mask(5, 7, torch.float32, padding_mask=torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]]))
    eager = eager_attention(q, k, v, mask, 0.25)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(eager, sdpa, atol=1e-6, rtol=1e-5)


def test_kv_cache_grows_across_chunks():
    cache = KVCache(num_layers=1, chunk=4)
    keys = torch.randn(1, 2, 11, 3)
    for start, stop in [(0, 3), (3, 4), (4, 9), (9, 10), (10, 11)]:
        k, v = cache.update(0, keys[:, :, start:stop], -keys[:, :, start:stop])
        assert torch.equal(k, keys[:, :, :stop]) and torch.equal(v, -keys[:, :, :stop])
    assert cache.get_seq_length() == len(cache) == 11
