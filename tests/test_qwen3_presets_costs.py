"""Qwen3 / Qwen3-MoE presets against the published parameter counts, and the cost calculator on Qwen3.

The model cards print totals (and for the MoEs activated counts) rounded or truncated to the digits
shown, plus a non-embedding count; the shapes must reproduce every printed digit. Qwen3-0.6B's exact total is the
reference notes' arithmetic (§6). Counting happens on the ``meta`` device: nothing is allocated.
"""

from __future__ import annotations

import math

import pytest
import torch

from qwen_edu.models.costs import count_parameters, flops_per_token, kv_cache_bytes_per_token
from qwen_edu.models.presets import PRESETS, dense_presets, preset
from qwen_edu.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from qwen_edu.models.qwen3_moe import Qwen3MoeConfig, Qwen3MoeForCausalLM

QWEN3 = [n for n, p in PRESETS.items() if p.values.get("model_type") in ("qwen3", "qwen3_moe")]


def _build(config):
    with torch.device("meta"):
        return Qwen3MoeForCausalLM(config) if isinstance(config, Qwen3MoeConfig) else Qwen3ForCausalLM(config)


def _printed(value: float) -> int:
    """Digits after the decimal point as the card prints them (``235`` -> 0, ``6.95`` -> 2)."""
    return 0 if isinstance(value, int) else len(repr(value).split(".")[1])


def _as_printed(count: int, printed: float) -> bool:
    """Whether the card's figure is ``count`` in billions, rounded *or truncated* to the digits shown
    (cards do both: 3,353,020,416 activated parameters are printed 3.3B)."""
    digits = _printed(printed)
    value, unit = count / 1e9, 10.0**-digits
    return round(value, digits) == printed or round(math.floor(value / unit) * unit, digits) == printed


@pytest.mark.parametrize("name", QWEN3)
def test_qwen3_presets_reproduce_the_published_counts(name):
    p = PRESETS[name]
    config = preset(name)
    assert p.source and p.status in ("checked", "rounded")
    model = _build(config)
    counts = count_parameters(config)
    assert counts.total == model.num_parameters()  # the calculator equals the module tree
    assert counts.total_non_embedding == model.num_parameters(exclude_embeddings=True)
    assert _as_printed(counts.total, p.published_params)
    assert _as_printed(counts.total_non_embedding, p.published_non_embedding)
    if isinstance(config, Qwen3MoeConfig):
        assert _as_printed(counts.activated, p.published_activated)
        assert counts.activated < counts.total / 9  # 8 of 128 experts plus attention and embeddings
    else:
        assert counts.activated == counts.total and p.published_activated is None
    if p.exact_params is not None:
        assert p.status == "checked" and counts.total == p.exact_params


def test_the_qwen3_family_as_the_report_tabulates_it():
    dense = dense_presets("Qwen3")
    assert [n.split("-")[1] for n in dense] == ["0.6B", "1.7B", "4B", "8B", "14B", "32B"]
    configs = {n: preset(n) for n in dense}
    assert all(isinstance(c, Qwen3Config) and c.qk_norm and not c.qkv_bias for c in configs.values())
    assert {c.head_dim for c in configs.values()} == {128} and {c.num_key_value_heads for c in configs.values()} == {8}
    assert [n for n, c in configs.items() if c.tie_word_embeddings] == ["Qwen3-0.6B", "Qwen3-1.7B", "Qwen3-4B"]
    # head_dim is decoupled from the width: 0.6B has more query features (16 x 128) than residual ones
    assert configs["Qwen3-0.6B"].num_attention_heads * 128 == 2 * configs["Qwen3-0.6B"].hidden_size
    for name in ("Qwen3-30B-A3B", "Qwen3-235B-A22B"):
        moe = preset(name)
        assert (moe.num_experts, moe.num_experts_per_tok, moe.shared_expert_intermediate_size) == (128, 8, 0)
        assert moe.norm_topk_prob and moe.head_dim == 128 and moe.sparse_layers == list(range(moe.num_hidden_layers))


def test_qk_norm_weights_are_counted_and_cost_no_flops():
    base = Qwen3Config(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=24)
    without = base.replace(qk_norm=False)
    assert count_parameters(base).total - count_parameters(without).total == 3 * 2 * 24
    assert count_parameters(base).total == _build(base).num_parameters()
    assert count_parameters(without).total == _build(without).num_parameters()
    assert flops_per_token(base, context=10) == flops_per_token(without, context=10)
    biased = base.replace(qkv_bias=True, o_bias=True)
    assert count_parameters(biased).total == _build(biased).num_parameters()


def test_kv_cache_uses_head_dim_not_hidden_over_heads():
    """Qwen3-30B-A3B: hidden / heads = 64, but the cache stores 4 KV heads of 128 per layer."""
    moe = preset("Qwen3-30B-A3B")
    assert moe.hidden_size // moe.num_attention_heads == 64
    assert kv_cache_bytes_per_token(moe) == 2 * 48 * 4 * 128 * 2 == 98_304
