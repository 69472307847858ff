"""Context-extension pieces: LogN, window attention, Dual Chunk Attention, per-position loss."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from qwen_edu.context_extension import (
    dca_position_tables,
    dual_chunk_attention,
    extend_context,
    layer_window_sizes,
    logn_scale,
    per_position_nll,
    window_mask,
)
from qwen_edu.models import Qwen2ForCausalLM, QwenConfig, eager_attention
from qwen_edu.models.layers import causal_mask
from qwen_edu.models.rope import apply_rotary_pos_emb, compute_rope_parameters, qwen1_ntk_alpha

# --- LogN -----------------------------------------------------------------------------------------


def test_logn_is_one_inside_the_training_length_and_log_ratio_beyond():
    positions = torch.tensor([0, 8190, 8191, 16383, 32767])
    factors = logn_scale(positions, 8192)
    assert factors[:3].tolist() == [1.0, 1.0, 1.0]  # p + 1 <= 8192
    # The reference's worked examples (seq_length 8192): 16383 -> 1.0769, 32767 -> 1.1538.
    assert factors[3].item() == pytest.approx(math.log(16384) / math.log(8192))
    assert factors[3].item() == pytest.approx(1.0769, abs=1e-4)
    assert factors[4].item() == pytest.approx(1.1538, abs=1e-4)


# --- window attention -----------------------------------------------------------------------------


def test_window_sizes_grow_from_lower_to_upper_layers():
    assert layer_window_sizes(4, 64, 512) == [64, 213, 363, 512]
    assert layer_window_sizes(4, 64, 512, schedule="step") == [64, 64, 512, 512]
    assert layer_window_sizes(1, 64, 512) == [512]
    sizes = layer_window_sizes(12, 128, 2048)
    assert sizes == sorted(sizes) and sizes[0] == 128 and sizes[-1] == 2048


def test_window_mask_keeps_exactly_the_last_w_keys():
    mask = window_mask(6, 6, 3)[0, 0]
    visible = (mask == 0).int()
    expected = torch.tensor([[1 if i - 3 < j <= i else 0 for j in range(6)] for i in range(6)])
    assert torch.equal(visible, expected)
    full = window_mask(5, 9, None)
    torch.testing.assert_close(full, causal_mask(5, 9, torch.float32))
    assert torch.equal(window_mask(5, 9, 9), full), "a window as long as the context is full attention"


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: layer_window_sizes(0, 8, 16), "num_layers must be >= 1"),
        (lambda: layer_window_sizes(4, 0, 16), "window sizes must be >= 1"),
        (lambda: layer_window_sizes(4, 32, 16), "largest window 16 is smaller"),
        (lambda: layer_window_sizes(4, 8, 16, schedule="cosine"), "unknown window schedule"),
        (lambda: window_mask(4, 8, 0), "window must be >= 1"),
        (lambda: window_mask(9, 8, 4), "q_len=9 exceeds kv_len=8"),
        (lambda: window_mask(4, 8, 100), "window of 100 tokens is longer than the 8-token sequence"),
        (lambda: compute_rope_parameters(63, 1e4), "head_dim must be even"),
        (lambda: compute_rope_parameters(64, 1e4, {"rope_type": "yarn", "factor": 0.5}), "factor must be >= 1"),
        (lambda: logn_scale(torch.arange(3), 1), "training_length must be >= 2"),
        (lambda: dca_position_tables(10, 8, 8), "need 0 <= local_size < chunk_size"),
    ],
)
def test_bad_arguments_are_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --- Dual Chunk Attention -----------------------------------------------------------------------


def test_dca_tables_follow_the_chunk_layout():
    tables = dca_position_tables(20, chunk_size=8, local_size=2)
    assert tables.chunk_len == 6
    assert tables.key.tolist() == [p % 6 for p in range(20)]
    assert tables.intra.tolist() == tables.key.tolist()
    assert tables.successive.tolist() == [min(p % 6 + 6, 8) for p in range(20)]
    assert set(tables.inter.tolist()) == {8}  # min(2 * 6 - 1, 8)


@pytest.mark.parametrize("chunk_size,local_size", [(8, 2), (16, 4), (12, 0)])
def test_dca_never_uses_a_distance_beyond_the_chunk_size(chunk_size, local_size):
    length = 5 * chunk_size
    t = dca_position_tables(length, chunk_size, local_size)
    chunk = torch.arange(length) // t.chunk_len
    gap = chunk[:, None] - chunk[None, :]
    query_pos = torch.where(gap == 0, t.intra[:, None], torch.where(gap == 1, t.successive[:, None], t.inter[:, None]))
    distance = query_pos - t.key[None, :]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    assert int(distance[causal].min()) >= 0
    assert int(distance[causal].max()) <= chunk_size
    # Successive-chunk distances stay exact for the first local_size positions of a chunk.
    true_distance = torch.arange(length)[:, None] - torch.arange(length)[None, :]
    near = (gap == 1) & (t.intra[:, None] < local_size)
    assert torch.equal(distance[near], true_distance[near])


def _attention_inputs(length: int, heads: int = 4, kv_heads: int = 2, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, length, dim, generator=g)
    k = torch.randn(2, kv_heads, length, dim, generator=g)
    v = torch.randn(2, kv_heads, length, dim, generator=g)
    return q, k, v


def test_dca_equals_plain_rope_attention_within_one_chunk():
    q, k, v = _attention_inputs(10)
    inv_freq, _ = compute_rope_parameters(16, 10000.0)
    out = dual_chunk_attention(q, k, v, inv_freq, chunk_size=16, local_size=4)  # chunk_len 12 > 10
    positions = torch.arange(10)[None]
    angles = positions[..., None].float() * inv_freq
    emb = torch.cat((angles, angles), -1)
    qr, kr = apply_rotary_pos_emb(q, k, emb.cos(), emb.sin())
    expected = eager_attention(qr, kr, v, causal_mask(10, 10, torch.float32), 16**-0.5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_dca_scores_use_the_remapped_positions():
    """Check one far-away pair by hand: its score must equal q at the inter position times k at p mod c."""
    q, k, v = _attention_inputs(30, heads=1, kv_heads=1, seed=3)
    inv_freq, _ = compute_rope_parameters(16, 10000.0)
    t = dca_position_tables(30, 8, 2)

    def rotate(x, position):
        angle = position * inv_freq
        emb = torch.cat((angle, angle))
        return x * emb.cos() + torch.cat((-x[8:], x[:8])) * emb.sin()

    i, j = 25, 3  # chunks 4 and 0: an inter-chunk pair
    score = rotate(q[0, 0, i], int(t.inter[i])) @ rotate(k[0, 0, j], int(t.key[j])) / 4.0
    # Recover the score from the output by attending with a one-hot value per key.
    eye_v = torch.eye(30)[None, None].expand(2, 1, 30, 30)
    probs = dual_chunk_attention(q, k, eye_v, inv_freq, 8, 2)[0, 0, i]
    logits = torch.log(probs[: i + 1])
    assert (logits[j] - logits[0]).item() == pytest.approx(
        (score - rotate(q[0, 0, i], int(t.inter[i])) @ rotate(k[0, 0, 0], 0) / 4.0).item(), abs=1e-4
    )


# --- evaluation -------------------------------------------------------------------------------------


def test_per_position_nll_matches_a_direct_computation():
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(QwenConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2)).eval()
    ids = torch.randint(0, 64, (5, 12))
    nll = per_position_nll(model, ids, batch_size=2)
    assert nll.shape == (11,)
    logits = model(ids).logits
    direct = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1),
                                               reduction="none").view(5, 11).mean(0)
    torch.testing.assert_close(nll, direct.detach(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="num_sequences, length >= 2"):
        per_position_nll(model, ids[0])


# --- switching the methods on for a whole model -------------------------------------------------------


def _tiny_model(layers: int = 1, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = QwenConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() == 1 else p.shape[-1] ** -0.5) + ("norm" in name))
    return model


def test_nothing_switched_on_changes_nothing():
    model = _tiny_model(layers=2)
    ids = torch.randint(0, 97, (2, 40))
    same = extend_context(model, training_length=16, window_sizes=[64, 64])
    # Windows longer than the sequence take the same code path as no window. The copy's weights are
    # bit-equal but live elsewhere in memory, and a kernel may pick another SIMD path for them, so allow
    # fp32 rounding; any real change (a window that cuts, a scaled position) moves logits by far more.
    torch.testing.assert_close(same(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-6)
    assert model.model.layers[0].self_attn.sliding_window is None, "the original model is left alone"


def test_window_attention_sees_exactly_the_last_w_tokens():
    """With one layer, position i under a window w must equal running the model on tokens i-w+1..i alone
    (RoPE is relative, so shifting the positions does not matter)."""
    model = _tiny_model(layers=1)
    ids = torch.randint(0, 97, (1, 30))
    windowed = extend_context(model, training_length=8, window_sizes=[6])
    logits = windowed(ids).logits
    for i in (5, 17, 29):
        alone = model(ids[:, i - 5 : i + 1]).logits[:, -1]
        torch.testing.assert_close(logits[:, i], alone, rtol=1e-4, atol=1e-5)
    sdpa = copy.deepcopy(windowed)
    sdpa.set_attn_implementation("sdpa")
    torch.testing.assert_close(sdpa(ids).logits, logits, rtol=1e-4, atol=1e-5)


def test_logn_changes_only_positions_beyond_the_training_length():
    model = _tiny_model(layers=2)
    ids = torch.randint(0, 97, (2, 24))
    scaled = extend_context(model, training_length=16, logn=True)
    # Up to T the LogN branch is not taken at all: the same computation on a copy of the weights, so
    # equal up to fp32 rounding (see test_nothing_switched_on_changes_nothing).
    torch.testing.assert_close(scaled(ids[:, :16]).logits, model(ids[:, :16]).logits, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(scaled(ids).logits[:, 16:], model(ids).logits[:, 16:])


def test_dual_chunk_attention_in_the_model():
    model = _tiny_model(layers=2)
    ids = torch.randint(0, 97, (2, 40))
    dca = extend_context(model, training_length=16, dual_chunk=(16, 4))  # chunks of 12 tokens
    torch.testing.assert_close(dca(ids[:, :12]).logits, model(ids[:, :12]).logits, rtol=1e-5, atol=1e-5)
    long = dca(ids).logits
    assert torch.isfinite(long).all() and not torch.allclose(long[:, 12:], model(ids).logits[:, 12:])
    sdpa = copy.deepcopy(dca)
    sdpa.set_attn_implementation("sdpa")
    torch.testing.assert_close(sdpa(ids).logits, long, rtol=1e-5, atol=1e-5)


# --- YaRN + DCA (Qwen2's 128K recipe) against a naive construction, and DCA with a KV cache -----------


def naive_dca_distance(length: int, chunk_size: int, local_size: int) -> torch.Tensor:
    """The query-key distance DCA uses for every causal pair, written out from the definition, pair by
    pair: own chunk -> the true distance; previous chunk -> the query moved up by a chunk, capped at
    chunk_size; any earlier chunk -> the query at min(2 c - 1, chunk_size); keys always at p mod c."""
    c = chunk_size - local_size
    distance = torch.zeros(length, length, dtype=torch.long)
    for i in range(length):
        for j in range(i + 1):
            if i // c == j // c:
                query = i % c
            elif i // c == j // c + 1:
                query = min(i % c + c, chunk_size)
            else:
                query = min(2 * c - 1, chunk_size)
            distance[i, j] = query - j % c
    return distance


def naive_rope_attention(q, k, v, inv_freq, attention_factor, distance, scale):
    """Attention whose score for (i, j) is RoPE at distance[i, j], via complex numbers: the half-split
    rotation of x is z = x[:d/2] + i x[d/2:] times e^{i p theta}, so q_i . k_j = Re(sum z_q conj(z_k)
    e^{i (p_q - p_k) theta}). cos and sin both carry YaRN's factor, hence its square on the score."""
    half = q.shape[-1] // 2
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
    zq = torch.complex(q[..., :half], q[..., half:]).to(torch.complex128)
    zk = torch.complex(k[..., :half], k[..., half:]).to(torch.complex128)
    phase = torch.exp(1j * distance[..., None].double() * inv_freq.double())  # [L, L, d/2]
    scores = torch.einsum("bhid,bhjd,ijd->bhij", zq, zk.conj(), phase).real * attention_factor**2 * scale
    causal = torch.ones(distance.shape, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v.double()


@pytest.mark.parametrize("chunk_size,local_size", [(16, 4), (16, 12), (12, 0)])
def test_yarn_dca_equals_a_naive_construction(chunk_size, local_size):
    """DCA with YaRN's frequencies and attention factor, against the naive form with transformers' own YaRN
    tables. The naive form runs in float64, so the gap is the fp32 rounding of our path: scores of
    order 10 carry ~1e-6 absolute error, outputs (averages of values of order 1) the same."""
    from transformers.models.qwen2 import modeling_qwen2 as hf

    from tests._checkpoints import tiny_qwen2_config

    config = tiny_qwen2_config(max_position_embeddings=64, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16})
    hf_rope = hf.Qwen2RotaryEmbedding(config)
    assert hf_rope.attention_scaling > 1.1  # 0.1 ln 4 + 1: the factor is really there
    q, k, v = _attention_inputs(45, dim=16, seed=7)
    out = dual_chunk_attention(q, k, v, hf_rope.inv_freq, chunk_size, local_size,
                               attention_scaling=hf_rope.attention_scaling)
    expected = naive_rope_attention(q, k, v, hf_rope.inv_freq, hf_rope.attention_scaling,
                                    naive_dca_distance(45, chunk_size, local_size), 16**-0.5)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    # The naive distances never leave the trained range [0, chunk_size].
    distance = naive_dca_distance(45, chunk_size, local_size)
    assert int(distance.max()) <= chunk_size and int(distance.min()) >= 0


def _naive_dca_logits(model, ids, inv_freq, attention_factor, chunk_size, local_size):
    """The whole model, with every attention replaced by :func:`naive_rope_attention` on DCA distances."""
    distance = naive_dca_distance(ids.shape[1], chunk_size, local_size)
    x = model.model.embed_tokens(ids)
    b, length, _ = x.shape
    for layer in model.model.layers:
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(b, length, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(b, length, -1, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(b, length, -1, attn.head_dim).transpose(1, 2)
        o = naive_rope_attention(q, k, v, inv_freq, attention_factor, distance, attn.scale).float()
        x = x + attn.o_proj(o.transpose(1, 2).reshape(b, length, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(model.model.norm(x))


def test_yarn_plus_dca_in_the_model_equals_the_naive_model():
    model = _tiny_model(layers=2)
    ids = torch.randint(0, 97, (2, 40))
    recipe = extend_context(model, training_length=16, rope="yarn", factor=4.0, dual_chunk=(16, 4))
    rotary = recipe.model.rotary_emb
    inv_freq, factor = compute_rope_parameters(8, 10000.0, {"rope_type": "yarn", "factor": 4.0,
                                                            "original_max_position_embeddings": 16})
    assert torch.equal(rotary.inv_freq, inv_freq) and rotary.attention_scaling == factor
    with torch.no_grad():
        expected = _naive_dca_logits(model, ids, inv_freq, factor, 16, 4)
        got = recipe(ids).logits
    # fp32 model vs a float64 attention inside it: ~1e-6 per layer, logits of order 1-10.
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # Inside one chunk (12 tokens) DCA is plain attention: the recipe equals YaRN alone.
    yarn = extend_context(model, training_length=16, rope="yarn", factor=4.0)
    torch.testing.assert_close(recipe(ids[:, :12]).logits, yarn(ids[:, :12]).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rope", [None, "yarn"])
def test_dca_with_a_kv_cache_equals_the_full_recomputation(rope):
    """Prefill, then feed the remaining tokens in uneven pieces and one by one across several chunk
    boundaries; every step's logits must equal those of one pass over the whole sequence. The two paths
    do the same arithmetic in differently shaped matmuls (and softmax rows that differ only by masked
    -inf entries), so they agree to fp32 rounding: ~1e-6 on logits of order 1-10."""
    model = _tiny_model(layers=2)
    ids = torch.randint(0, 97, (2, 50))
    dca = extend_context(model, training_length=16, rope=rope, factor=4.0, dual_chunk=(16, 4))
    with torch.no_grad():
        full = dca(ids).logits
        out = dca(ids[:, :7], use_cache=True)
        pieces, cache, at = [out.logits], out.past_key_values, 7
        for step in (5, 1, 13, 1, 1, 9):
            out = dca(ids[:, at : at + step], past_key_values=cache)
            pieces.append(out.logits)
            at += step
        while at < ids.shape[1]:
            pieces.append(dca(ids[:, at : at + 1], past_key_values=cache).logits)
            at += 1
    assert cache.get_seq_length() == 50
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_generation_with_dca_decodes_what_a_full_pass_predicts():
    import qwen_edu

    model = _tiny_model(layers=2)
    prompt = torch.randint(0, 97, (1, 30))
    dca = extend_context(model, training_length=16, rope="yarn", factor=4.0, dual_chunk=(16, 4))
    out = qwen_edu.generate(dca, prompt, max_new_tokens=20, eos_token_id=[])
    assert out.shape == (1, 50)
    with torch.no_grad():
        logits = dca(out).logits[0, 29:-1]
    top2 = logits.topk(2, dim=-1).values
    assert bool((top2[:, 0] - top2[:, 1] > 1e-3).all()), "no near-ties, so argmax is stable under rounding"
    assert out[0, 30:].tolist() == logits.argmax(-1).tolist()


def test_dca_rejects_padding_and_custom_positions():
    model = _tiny_model(layers=1)
    dca = extend_context(model, training_length=16, dual_chunk=(16, 4))
    ids = torch.randint(0, 97, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, :3] = 0
    with pytest.raises(NotImplementedError, match="padding"):
        dca(ids, attention_mask=mask)
    with pytest.raises(NotImplementedError, match="past \\+ arange"):
        dca(ids, position_ids=torch.arange(20)[None].expand(2, 20) + 5)
    with pytest.raises(ValueError, match="q length <= k length"):
        dual_chunk_attention(torch.zeros(1, 4, 12, 16), torch.zeros(1, 2, 10, 16), torch.zeros(1, 2, 10, 16),
                             torch.ones(8), 16, 4)


@pytest.mark.parametrize("rope", ["dynamic", "qwen1_ntk"])
def test_dca_rotates_with_length_dependent_frequencies(rope):
    """Erratum: DCA used to keep a snapshot of the frequencies taken when it was switched on (the unscaled
    ones for these two rules). At length L both rules amount to static NTK with an effective factor:
    HF dynamic uses ``f * L / T - (f - 1)``, Qwen-1 uses its alpha; DCA must rotate with exactly that."""
    model = _tiny_model(layers=2)
    T, L = 16, 48
    ids = torch.randint(0, 97, (2, L))
    effective = 2.0 * L / T - 1.0 if rope == "dynamic" else float(qwen1_ntk_alpha(L, T))
    assert effective == (5.0 if rope == "dynamic" else 7.0)
    dca = extend_context(model, training_length=T, rope=rope, factor=2.0, dual_chunk=(16, 4))
    static = extend_context(model, training_length=T, rope="ntk", factor=effective, dual_chunk=(16, 4))
    plain = extend_context(model, training_length=T, dual_chunk=(16, 4))
    # The two bases agree to fp32 rounding (one computed in fp32 tensors, one in Python floats), so the
    # angles at DCA's positions (all < 16) agree to ~1e-6 rad; logits of order 1 then agree to ~1e-5.
    torch.testing.assert_close(dca(ids).logits, static(ids).logits, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(dca(ids).logits, plain(ids).logits, atol=1e-3)


def test_rope_scaling_is_swapped_in():
    model = _tiny_model(layers=1)
    for rope in ("linear", "ntk", "dynamic", "qwen1_ntk", "yarn"):
        extended = extend_context(model, training_length=16, rope=rope, factor=4.0)
        assert extended.model.rotary_emb.rope_type == rope
    yarn = extend_context(model, training_length=16, rope="yarn", factor=4.0)
    assert yarn.model.rotary_emb.attention_scaling == pytest.approx(0.1 * math.log(4.0) + 1)
    # Static NTK divides the lowest frequency by exactly the factor and leaves the highest one alone.
    plain, _ = compute_rope_parameters(64, 10000.0)
    ntk, _ = compute_rope_parameters(64, 10000.0, {"rope_type": "ntk", "factor": 4.0})
    assert ntk[0].item() == plain[0].item()
    assert (plain[-1] / ntk[-1]).item() == pytest.approx(4.0, rel=1e-5)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"factor": 0.5, "rope": "linear"}, "factor must be >= 1"),
        ({"rope": "rotary"}, "unknown rope scaling 'rotary'"),
        ({"window_sizes": [4, 4, 4]}, "window_sizes has 3 entries but the model has 1 layers"),
        ({"window_sizes": [0]}, "window sizes must be >= 1"),
        ({"dual_chunk": (32, 4)}, "chunk_size 32 exceeds the training length 16"),
        ({"dual_chunk": (16, 16)}, "need 0 <= local_size < chunk_size"),
        ({"dual_chunk": (16, 4), "logn": True}, "combine it with rope scaling only"),
    ],
)
def test_extend_context_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        extend_context(_tiny_model(), training_length=16, **kwargs)
