"""qwen_edu's decoder against transformers' Qwen2ForCausalLM on tiny random checkpoints.

Tolerances (documented for the book):
* fp32: logits within 1e-5 of HF *eager* for both our eager path (in practice bit-identical) and our
  SDPA path (differences of a few 1e-6 from a different softmax/matmul summation order).
* bf16: our eager path equals HF eager and our SDPA path equals HF SDPA (same ops, same order; we
  assert 1e-2). Across attention implementations, or bf16 against the fp32 result, logits of O(1)
  differ by up to ~0.08 on these models (a few bf16 ulps accumulated over the layers); we assert
  0.125 there.
"""

from __future__ import annotations

import pytest
import torch

import qwen_edu
from qwen_edu.compare import compare_models
from qwen_edu.generation import StreamChunk, left_padded_positions, sample_next_token, stream_generate
from tests._checkpoints import load_reference, make_tiny_qwen2_checkpoint

CONFIGS = {
    "gqa-untied": dict(),
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "mqa-tied-3layers": dict(num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=1,
                             tie_word_embeddings=True, rope_theta=1e6),
    "gqa-wide-heads": dict(hidden_size=96, num_attention_heads=3, num_key_value_heads=1, intermediate_size=80),
}
BF16_SAME_IMPL_ATOL = 1e-2
BF16_CROSS_ATOL = 0.125


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory):
    folder = make_tiny_qwen2_checkpoint(tmp_path_factory.mktemp(request.param), seed=len(request.param),
                                        **CONFIGS[request.param])
    return request.param, folder, load_reference(folder)


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    folder = make_tiny_qwen2_checkpoint(tmp_path_factory.mktemp("gqa"), seed=7, eos_token_id=[])
    return folder, load_reference(folder), qwen_edu.load_model(folder)


def _ids(batch=2, length=20, seed=0, vocab=256):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_fp32_logits_match_reference(case, impl):
    _, folder, ref = case
    model = qwen_edu.load_model(folder, attn_implementation=impl)
    ids = _ids()
    with torch.no_grad():
        ours, theirs = model(ids).logits, ref(ids).logits
    assert ours.shape == (2, 20, 256) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_bf16_logits_match_reference(case, impl):
    _, folder, ref32 = case
    ref = load_reference(folder, dtype=torch.bfloat16, attn_implementation=impl)
    model = qwen_edu.load_model(folder, dtype=torch.bfloat16, attn_implementation=impl)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ids = _ids()
    with torch.no_grad():
        ours, theirs, full = model(ids).logits, ref(ids).logits, ref32(ids).logits
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs, atol=BF16_SAME_IMPL_ATOL, rtol=0)
    torch.testing.assert_close(ours.float(), full, atol=BF16_CROSS_ATOL, rtol=0)


def test_greedy_generation_matches_hf_generate(case):
    _, folder, ref = case
    model = qwen_edu.load_model(folder)
    ids = _ids(batch=2, length=7, seed=1)
    ours = qwen_edu.generate(model, ids, max_new_tokens=32)
    theirs = ref.generate(ids, max_new_tokens=32, do_sample=False)
    assert torch.equal(ours, theirs)


def test_padded_forward_matches_reference(gqa):
    """With an explicit mask and position ids, non-padding positions agree with HF eager."""
    folder, ref, _ = gqa
    model = qwen_edu.load_model(folder, attn_implementation="eager")
    ids = _ids(batch=2, length=9, seed=2)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    pos = left_padded_positions(mask)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=pos).logits
        theirs = ref(ids, attention_mask=mask, position_ids=pos).logits
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], theirs[keep], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_cached_decoding_equals_full_recompute(gqa, impl):
    folder, _, _ = gqa
    model = qwen_edu.load_model(folder, attn_implementation=impl)
    ids = _ids(batch=2, length=24, seed=3)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :10], use_cache=True)  # prefill
        steps = [out.logits]
        cache = out.past_key_values
        chunk = model(ids[:, 10:14], past_key_values=cache)  # several new tokens on top of a cache
        steps.append(chunk.logits)
        for t in range(14, 24):  # then one token at a time
            steps.append(model(ids[:, t:t + 1], past_key_values=cache).logits)
    assert cache.get_seq_length() == 24
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_equals_one_by_one_and_hf(gqa):
    folder, ref, model = gqa
    prompts = [_ids(1, n, seed=10 + n)[0] for n in (3, 8, 5)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    batched = qwen_edu.generate(model, ids, attention_mask=mask, max_new_tokens=16)
    for i, p in enumerate(prompts):
        alone = qwen_edu.generate(model, p[None], max_new_tokens=16)
        assert torch.equal(batched[i, width:], alone[0, len(p):])
    theirs = ref.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert torch.equal(batched, theirs)


def test_eos_stops_and_pads_finished_rows(gqa):
    _, _, model = gqa
    ids = _ids(batch=2, length=6, seed=4)
    free = qwen_edu.generate(model, ids, max_new_tokens=12, eos_token_id=[])
    eos = int(free[0, 6 + 2])  # row 0's third new token becomes the stop token
    out = qwen_edu.generate(model, ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    first_stop = [int((row[6:] == eos).nonzero()[0]) if (row[6:] == eos).any() else None for row in free]
    assert first_stop[0] == 2
    if first_stop[1] is None:  # row 1 never stops, so generation runs to the budget
        assert out.shape[1] == 6 + 12
    end = first_stop[0] + 1
    assert torch.equal(out[0, 6:6 + end], free[0, 6:6 + end]) and (out[0, 6 + end:] == 0).all()
    single = qwen_edu.generate(model, ids[:1], max_new_tokens=12, eos_token_id=eos)
    assert single.shape[1] == 6 + 3  # stops right after emitting eos


def test_sampling_is_reproducible_and_top_k_1_is_greedy(gqa):
    _, _, model = gqa
    ids = _ids(batch=2, length=5, seed=5)
    kw = dict(max_new_tokens=12, do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    a = qwen_edu.generate(model, ids, generator=torch.Generator().manual_seed(0), **kw)
    b = qwen_edu.generate(model, ids, generator=torch.Generator().manual_seed(0), **kw)
    c = qwen_edu.generate(model, ids, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = qwen_edu.generate(model, ids, max_new_tokens=12)
    top1 = qwen_edu.generate(model, ids, max_new_tokens=12, do_sample=True, top_k=1,
                             generator=torch.Generator().manual_seed(3))
    tiny_p = qwen_edu.generate(model, ids, max_new_tokens=12, do_sample=True, top_p=1e-6,
                               generator=torch.Generator().manual_seed(3))
    assert torch.equal(top1, greedy) and torch.equal(tiny_p, greedy)


def test_top_k_and_top_p_filter_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample_next_token(logits, do_sample=True, top_p=0.7, generator=gen)) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.7, so the 0.3 token is still needed; 0.15 and 0.05 are cut
    draws = {int(sample_next_token(logits, do_sample=True, top_k=3, generator=gen)) for _ in range(300)}
    assert draws == {0, 1, 2}


def test_streaming_callback_and_text_iterator(gqa):
    _, _, model = gqa
    ids = _ids(batch=1, length=4, seed=6)
    seen: list[torch.Tensor] = []
    out = qwen_edu.generate(model, ids, max_new_tokens=8, streamer=seen.append)
    assert torch.equal(torch.stack(seen, dim=1), out[:, 4:])

    class FakeTokenizer:  # each id becomes one letter; id 200 is half of a two-token character
        def decode(self, ids):
            text = "".join(chr(ord("a") + i % 26) for i in ids)
            return text + "\ufffd" if ids and ids[-1] == 200 else text

    chunks = list(stream_generate(model, ids, FakeTokenizer(), max_new_tokens=8))
    assert all(isinstance(c, StreamChunk) for c in chunks)
    assert [c.token_id for c in chunks] == out[0, 4:].tolist()
    assert "".join(c.text for c in chunks) == FakeTokenizer().decode([c.token_id for c in chunks]).rstrip("\ufffd")
    assert [c.text for c in stream_generate(model, ids, None, max_new_tokens=3)] == ["", "", ""]


def test_compare_tool_finds_the_first_differing_module(gqa):
    folder, ref, _ = gqa
    model = qwen_edu.load_model(folder, attn_implementation="eager")
    ids = _ids(batch=1, length=8, seed=8)
    report = compare_models(model, ref, ids)
    assert report.ok and report.first_mismatch is None and "match" in str(report)
    assert {"model.layers.1.mlp.up_proj", "model.norm", "lm_head"} <= {r.name for r in report.rows}
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] += 0.01
    report = compare_models(model, ref, ids)
    assert not report.ok
    assert report.first_mismatch.name == "model.layers.1.mlp.up_proj" and report.first_layer == 1
    assert "first mismatch: model.layers.1.mlp.up_proj" in str(report)
    assert all(r.ok for r in report.rows if r.name.startswith("model.layers.0"))


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "dynamic", "factor": 2.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    ],
)
def test_rope_scaling_checkpoints_match_reference(tmp_path, rope):
    """A config with rope scaling loads (meta-device build included) and matches HF, also past the
    original context where dynamic NTK changes its base."""
    folder = make_tiny_qwen2_checkpoint(tmp_path, seed=9, max_position_embeddings=32,
                                        rope_parameters={"rope_theta": 10000.0, **rope})
    model, ref = qwen_edu.load_model(folder, attn_implementation="eager"), load_reference(folder)
    assert model.config.rope_scaling["rope_type"] == rope["rope_type"]
    for length in (12, 48):
        ids = _ids(batch=1, length=length, seed=length)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
