"""Qwen3-MoE against transformers' ``Qwen3MoeForCausalLM`` on tiny random checkpoints.

The cases: the per-expert hub layout and the fused 5.x tensors, renormalised and raw top-k weights,
a dense layer mixed in (``mlp_only_layers``), tied and untied embeddings, a ``head_dim`` that differs
from ``hidden / heads`` -- and one expert width whose fp32 rows are not 16-byte aligned, which
transformers' CPU ``grouped_mm`` refuses (reference ``qwen_later_generations.md`` §5.3): there the
reference runs its eager expert loop and ours falls back to its loop by itself.

Tolerances: fp32 logits within 1e-5 of transformers' eager attention (the expert sums run in another
order on the eager expert path, a few 1e-7 on O(1) logits); the auxiliary loss is a sum of a few
hundred fp32 products of the same values: 1e-6 relative.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import transformers
from safetensors import safe_open

import qwen_edu
from qwen_edu.checkpoint import CorruptCheckpointError, StateDictMismatchError, load_model, save_model
from qwen_edu.models.layouts import MoeLayout
from qwen_edu.models.moe import SparseMoeBlock
from qwen_edu.models.qwen3_moe import Qwen3MoeConfig, Qwen3MoeForCausalLM
from tests._qwen3_checkpoints import assert_same_logits, load_reference, make_checkpoint, random_ids
from tests.test_moe_model import (
    test_router_logits_aux_loss_and_lm_loss_match_reference as check_router_outputs,
)

CONFIGS: dict[str, dict[str, Any]] = {
    "hub-untied-dense1": dict(mlp_only_layers=[1]),
    "fused-tied-rawtopk-top3": dict(tie_word_embeddings=True, norm_topk_prob=False, num_experts_per_tok=3,
                                    _fused=True),
    "hub-mha-hd32-step2": dict(num_key_value_heads=4, head_dim=32, decoder_sparse_step=2, num_hidden_layers=4),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory):
    name = request.param
    overrides = dict(CONFIGS[name])
    fused = overrides.pop("_fused", False)
    folder = make_checkpoint("qwen3_moe", tmp_path_factory.mktemp(name), seed=len(name), fused=fused,
                             **overrides)
    return name, folder, load_reference("qwen3_moe", folder)


def _keys(folder) -> set[str]:
    keys: set[str] = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as fh:
            keys |= set(fh.keys())
    return keys


def test_the_loader_builds_routed_experts_only(case):
    name, folder, ref = case
    model = load_model(folder)
    assert isinstance(model, Qwen3MoeForCausalLM) and isinstance(model.config, Qwen3MoeConfig)
    assert ("model.layers.0.mlp.experts.gate_up_proj" in _keys(folder)) == name.startswith("fused")
    sparse = [i for i, layer in enumerate(ref.model.layers) if hasattr(layer.mlp, "gate")]
    assert model.config.sparse_layers == sparse
    for i, layer in enumerate(model.model.layers):
        assert isinstance(layer.mlp, SparseMoeBlock) == (i in sparse)
        if i in sparse:  # no shared expert, no shared-expert gate: nothing beyond router and experts
            assert layer.mlp.shared_expert is None and layer.mlp.shared_expert_gate is None
            assert layer.mlp.gate.norm_topk_prob == ref.config.norm_topk_prob
        assert layer.self_attn.q_norm.weight.shape == (ref.config.head_dim,)
    assert model.num_parameters() == ref.num_parameters()
    assert not any("shared" in n or ".bias" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("experts", ["grouped_mm", "eager"])
def test_fp32_logits_match_reference(case, impl, experts):
    _, folder, _ = case
    ref = load_reference("qwen3_moe", folder, experts=experts)
    assert_same_logits(load_model(folder, attn_implementation=impl), ref, random_ids())


@pytest.mark.parametrize("masked", [False, True])
def test_router_logits_aux_loss_and_lm_loss_match_reference(case, masked):
    """Chapter 8's check, unchanged: per-layer router logits, the aux loss (padding excluded) and
    ``CE + 0.001 * aux`` equal transformers' -- nothing about the loss changed from Qwen2-MoE."""
    check_router_outputs(case, masked)


def test_greedy_and_left_padded_generation_match_hf_generate(case):
    _, folder, ref = case
    model = load_model(folder)
    ids = random_ids(length=9, seed=2)
    assert torch.equal(qwen_edu.generate(model, ids, max_new_tokens=20, eos_token_id=[]),
                       ref.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    ours = qwen_edu.generate(model, ids, mask, max_new_tokens=16, pad_token_id=0, eos_token_id=[])
    theirs = ref.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0,
                          eos_token_id=None)
    assert torch.equal(ours, theirs)


def test_an_expert_width_grouped_mm_refuses_on_cpu_still_matches(tmp_path):
    """``moe_intermediate_size=10``: rows of 40 bytes, not a multiple of 16. transformers' default
    ``grouped_mm`` raises on CPU, so the reference runs its eager loop; ours must pick its loop alone."""
    folder = make_checkpoint("qwen3_moe", tmp_path, seed=5, moe_intermediate_size=10)
    model = load_model(folder)
    ids = random_ids(seed=5)
    with pytest.raises(RuntimeError, match="16 bytes"):
        load_reference("qwen3_moe", folder)(ids)
    ref = load_reference("qwen3_moe", folder, experts="eager")
    assert_same_logits(model, ref, ids)
    model.set_experts_implementation("grouped_mm")  # asked for explicitly, it still falls back
    assert_same_logits(model, ref, ids)


@pytest.mark.parametrize("fused", [False, True])
def test_save_round_trips_and_transformers_reads_it(tmp_path, fused):
    src = make_checkpoint("qwen3_moe", tmp_path / "src", seed=13, fused=not fused, tie_word_embeddings=True)
    model = load_model(src)
    out = save_model(model, tmp_path / "out", layout=MoeLayout(fused=True) if fused else None)
    assert ("model.layers.0.mlp.experts.gate_up_proj" in _keys(out)) == fused
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert config["num_experts"] == 8 and config["head_dim"] == 24 and config["attention_bias"] is False
    assert "shared_expert_intermediate_size" not in config and "qkv_bias" not in config
    assert Qwen3MoeConfig.from_hf_config(config) == model.config
    ref = load_reference("qwen3_moe", out)
    assert ref.config.num_experts == 8 and ref.config.head_dim == 24
    assert_same_logits(load_model(out), ref, random_ids(seed=4))


def _drop_head_dim(folder) -> None:
    config = json.loads((folder / "config.json").read_text())
    del config["head_dim"]
    (folder / "config.json").write_text(json.dumps(config))


def test_a_config_without_head_dim_falls_back_like_transformers(tmp_path):
    """Qwen3MoeConfig declares no head_dim: without the key both sides use hidden / heads (16 here),
    and weights made for another head_dim are refused by name, not half-loaded."""
    folder = make_checkpoint("qwen3_moe", tmp_path / "hd16", seed=6, head_dim=16)
    _drop_head_dim(folder)
    model, ref = load_model(folder), load_reference("qwen3_moe", folder)
    assert model.config.head_dim == ref.model.layers[0].self_attn.head_dim == 16
    assert_same_logits(model, ref, random_ids(seed=6))
    wrong = make_checkpoint("qwen3_moe", tmp_path / "hd24", seed=6)  # head_dim 24 in the weights
    _drop_head_dim(wrong)
    with pytest.raises(StateDictMismatchError, match=r"model\.layers\.0\.self_attn\.q_norm\.weight: "
                                                     r"expected \[16\], found \[24\]"):
        load_model(wrong)


def test_hub_config_names_and_the_no_shared_expert_rule():
    hub = dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
               num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
               num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
               rope_theta=1000000.0, max_position_embeddings=40960, tie_word_embeddings=False)
    config = Qwen3MoeConfig.from_hf_config(hub)
    assert (config.num_experts, config.num_experts_per_tok, config.head_dim, config.norm_topk_prob) == \
        (128, 8, 128, True)
    assert config.shared_expert_intermediate_size == 0 and not config.qkv_bias
    renamed = Qwen3MoeConfig.from_hf_config({k: v for k, v in hub.items() if k != "num_experts"}
                                            | {"num_local_experts": 64})
    assert renamed.num_experts == 64  # what transformers 5.x save_pretrained writes
    assert transformers.Qwen3MoeConfig(**config.to_hf_config()).num_experts == 128
    with pytest.raises(ValueError, match="Qwen3-MoE has no shared expert"):
        Qwen3MoeConfig(shared_expert_intermediate_size=64)


def test_a_shared_expert_in_a_qwen3_moe_config_json_is_refused(tmp_path):
    folder = make_checkpoint("qwen3_moe", tmp_path, seed=7)
    config = json.loads((folder / "config.json").read_text())
    config["shared_expert_intermediate_size"] = 32
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CorruptCheckpointError, match="no shared expert"):
        load_model(folder)
