"""Qwen3 dense against transformers' ``Qwen3ForCausalLM`` on tiny random checkpoints.

The cases cover what Qwen3 changed: QK-norm (its weights random, like every parameter), no attention
bias or a bias on q/k/v *and* o (``attention_bias``), a ``head_dim`` that differs from
``hidden / heads``, tied and untied embeddings, and the (unreleased) sliding-window layers.

Tolerances: fp32 logits within 1e-5 of transformers' eager attention (our eager path repeats its ops;
our SDPA path sums in another order, a few 1e-6 on O(1) logits); bf16 within 1e-2 with the same
attention kernel on both sides (same ops in the same order; a few bf16 ulps of slack).
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import qwen_edu
from qwen_edu.checkpoint import load_model, save_model
from qwen_edu.generation import left_padded_positions
from qwen_edu.models.layers import RMSNorm
from qwen_edu.models.qwen3 import SLIDING_ATTENTION, Qwen3Config, Qwen3ForCausalLM, attention_logit_stats
from qwen_edu.models.registry import get_model_entry
from tests._qwen3_checkpoints import assert_same_logits, load_reference, make_checkpoint, random_ids

CONFIGS = {
    "untied-gqa-hd24": dict(),
    "tied-mha-bias-hd32": dict(num_key_value_heads=4, head_dim=32, attention_bias=True, tie_word_embeddings=True),
    "tied-sliding-3layers": dict(num_hidden_layers=3, tie_word_embeddings=True, use_sliding_window=True,
                                 sliding_window=6, max_window_layers=1, rope_theta=1e6),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory):
    name = request.param
    folder = make_checkpoint("qwen3", tmp_path_factory.mktemp(name), seed=len(name), **CONFIGS[name])
    return name, folder, load_reference("qwen3", folder)


def test_the_loader_builds_a_qwen3_with_qk_norm_and_the_configured_head_dim(case):
    name, folder, ref = case
    model = load_model(folder)
    assert get_model_entry("qwen3").model_class is Qwen3ForCausalLM
    assert isinstance(model, Qwen3ForCausalLM) and isinstance(model.config, Qwen3Config)
    attn = model.model.layers[0].self_attn
    assert attn.head_dim == ref.config.head_dim != ref.config.hidden_size // ref.config.num_attention_heads
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (attn.head_dim,)
    assert attn.q_proj.weight.shape == (4 * attn.head_dim, 64)
    bias = ref.config.attention_bias
    assert [p is not None for p in (attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias, attn.o_proj.bias)] \
        == [bias] * 4
    assert model.num_parameters() == ref.num_parameters()
    ours = {n: p for n, p in model.named_parameters()}
    for n, p in ref.named_parameters():  # every random tensor arrived under its own name
        assert torch.equal(ours[n], p), n
    windows = [layer.self_attn.sliding_window for layer in model.model.layers]
    assert windows == [layer.self_attn.sliding_window for layer in ref.model.layers]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_fp32_logits_match_reference(case, impl):
    _, folder, ref = case
    ours = assert_same_logits(load_model(folder, attn_implementation=impl), ref, random_ids(length=20))
    assert ours.dtype == torch.float32


def test_bf16_logits_match_reference_with_the_same_kernel(case):
    _, folder, _ = case
    ref = load_reference("qwen3", folder, dtype=torch.bfloat16)
    model = load_model(folder, dtype=torch.bfloat16, attn_implementation="eager")
    ids = random_ids()
    with torch.no_grad():
        ours, theirs = model(ids).logits, ref(ids).logits
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs, atol=1e-2, rtol=0)


def test_greedy_generation_matches_hf_generate(case):
    _, folder, ref = case
    model = load_model(folder)
    ids = random_ids(length=7, seed=1)
    ours = qwen_edu.generate(model, ids, max_new_tokens=24, eos_token_id=[])
    theirs = ref.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None)
    assert ours.shape == (2, 31)
    assert torch.equal(ours, theirs)


def test_left_padded_generation_and_padded_forward_match_reference(case):
    _, folder, ref = case
    model = load_model(folder, attn_implementation="eager")
    ids = random_ids(length=9, seed=2)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    pos = left_padded_positions(mask)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=pos).logits
        theirs = ref(ids, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-5, rtol=1e-5)
    out = qwen_edu.generate(model, ids, mask, max_new_tokens=16, pad_token_id=0, eos_token_id=[])
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0,
                            eos_token_id=None)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_cached_decoding_equals_full_recompute_beyond_the_window(impl, tmp_path):
    folder = make_checkpoint("qwen3", tmp_path, seed=3, **CONFIGS["tied-sliding-3layers"])
    model = load_model(folder, attn_implementation=impl)
    assert model.config.layer_types[1:] == [SLIDING_ATTENTION] * 2
    ids = random_ids(length=20, seed=3)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :8], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(8, 20):
            steps.append(model(ids[:, t:t + 1], past_key_values=cache).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_save_round_trips_and_transformers_reads_it(case, tmp_path):
    name, folder, ref = case
    model = load_model(folder)
    out = save_model(model, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["head_dim"] == ref.config.head_dim and config["attention_bias"] == ref.config.attention_bias
    assert "qkv_bias" not in config and "qk_norm" not in config
    assert Qwen3Config.from_hf_config(config) == model.config
    again = load_reference("qwen3", out)
    assert again.config.layer_types == ref.config.layer_types
    ids = random_ids(seed=4)
    with torch.no_grad():
        # transformers reloading our save: bit-equal weights, another computation path, so only
        # fp32 summation-order rounding separates the two.
        torch.testing.assert_close(again(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)


def test_a_hub_config_json_of_the_4x_dialect_reads(tmp_path):
    """The Qwen3-0.6B config.json (reference §6): rope_theta at the top level, no layer_types."""
    hub = {"architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
           "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
           "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
           "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
           "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
           "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
           "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}
    config = Qwen3Config.from_hf_config(hub)
    assert (config.head_dim, config.rope_theta, config.qkv_bias, config.o_bias, config.qk_norm) == \
        (128, 1e6, False, False, True)
    assert config.layer_types == ["full_attention"] * 28 and config.torch_dtype == "bfloat16"
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    assert model.num_parameters() == 596_049_920  # the reference's exact count for Qwen3-0.6B
    assert model.num_parameters(exclude_embeddings=True) == 440_467_456
    hf = transformers.Qwen3Config(**config.to_hf_config())
    assert (hf.head_dim, hf.attention_bias, hf.rope_parameters["rope_theta"]) == (128, False, 1e6)


@torch.no_grad()
def test_qk_norm_bounds_the_attention_logits_however_large_the_projections():
    """With unit q/k norm weights every query and key has length sqrt(d) after the norm (and RoPE, a
    rotation), so ``|q.k| / sqrt(d) <= sqrt(d)`` by Cauchy-Schwarz. Without QK-norm (and without bias),
    scaling both projections by 10 scales the first layer's logits by 100."""
    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    ids = random_ids(batch=1, length=12, vocab=64)
    stats = {}
    for qk_norm in (True, False):
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(config.replace(qk_norm=qk_norm)).eval()
        before = attention_logit_stats(model, ids)
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(10)
            layer.self_attn.k_proj.weight.mul_(10)
        stats[qk_norm] = before, attention_logit_stats(model, ids)
    for layer_before, layer_after in zip(*stats[True], strict=True):
        assert layer_after["q_norm"] == pytest.approx(16**0.5, rel=1e-4)  # sqrt(head_dim), scale or not
        assert layer_after["max_logit"] <= 16**0.5 + 1e-4
        assert layer_after["max_logit"] == pytest.approx(layer_before["max_logit"], rel=1e-3)
    before, after = stats[False]  # the first layer's input is unchanged; later layers see other inputs
    assert after[0]["max_logit"] == pytest.approx(100 * before[0]["max_logit"], rel=1e-4)
    assert after[0]["max_logit"] > 16**0.5


def test_qk_norm_is_a_per_layer_option_and_the_switch_round_trips(tmp_path):
    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, qk_norm=False)
    model = Qwen3ForCausalLM(config)
    assert not any("q_norm" in n or "k_norm" in n for n, _ in model.named_parameters())
    folder = save_model(model, tmp_path / "no_qk_norm")
    assert json.loads((folder / "config.json").read_text())["qk_norm"] is False
    assert load_model(folder).config.qk_norm is False
    from qwen_edu.models.layers import DecoderLayer

    layer = DecoderLayer(config, 1, qk_norm=RMSNorm, qkv_bias=True)  # one layer with the Qwen3 options
    assert isinstance(layer.self_attn.q_norm, RMSNorm) and layer.self_attn.q_proj.bias is not None
    assert layer.self_attn.o_proj.bias is None


def test_bad_configs_say_what_is_wrong():
    with pytest.raises(ValueError, match="layer_types has 1 entries for num_hidden_layers=2"):
        Qwen3Config(num_hidden_layers=2, layer_types=["full_attention"])
    with pytest.raises(ValueError, match=r"unknown layer_types \['chunked_attention'\]"):
        Qwen3Config(num_hidden_layers=1, layer_types=["chunked_attention"])
    with pytest.raises(ValueError, match="one attention_bias for q/k/v and o"):
        Qwen3Config(qkv_bias=True).to_hf_config()
