"""Chapter 8's experiment code (qwen_edu.moe_experiment) and its shipped log."""

from __future__ import annotations

import pytest
import torch

import qwen_edu
from qwen_edu import moe_experiment as mx
from qwen_edu.models.qwen2_moe import Qwen2MoeForCausalLM
from qwen_edu.training import base_model_path

TINY = mx.ExperimentConfig(steps=3, warmup_steps=1, batch_size=2, seq_len=32, train_docs=40, val_docs=8, eval_every=2,
                           eval_rows=4, load_every=1, num_experts=8, num_experts_per_tok=2,
                           moe_intermediate_size=128)


@pytest.fixture(scope="module")
def base_and_tokenizer():
    path = base_model_path()
    return qwen_edu.load_model(path, dtype="float32"), qwen_edu.load_tokenizer(path)


def test_every_run_starts_from_the_base_models_function(base_and_tokenizer):
    """The widened dense models are exact (1e-5: the same sums with extra exact zeros, possibly another
    matmul blocking); the upcycled MoE only nearly, through its small routed part."""
    base, tokenizer = base_and_tokenizer
    models = mx.build_models(base, TINY)
    assert list(models) == list(mx.RUN_NAMES)
    assert models["dense-activated"].config.intermediate_size == 512 + 2 * 128
    assert models["dense-total"].config.intermediate_size == 512 + 8 * 128
    ids = torch.tensor([tokenizer.encode("Once upon a time, there was a little cat.")])
    with torch.no_grad():
        reference = base(ids).logits
        for name in ("dense-activated", "dense-total"):
            torch.testing.assert_close(models[name](ids).logits, reference, atol=1e-5, rtol=1e-5)
        moe = models["moe"](ids).logits
    assert (moe.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9


def test_a_short_run_logs_losses_flops_and_expert_loads(base_and_tokenizer):
    base, tokenizer = base_and_tokenizer
    train, val = mx.experiment_data(tokenizer, TINY)
    assert train.seq_len == val.seq_len == 32
    moe = mx.build_models(base, TINY, ["moe"])["moe"]
    log = mx.train_run(moe, train, val, TINY, aux_coef=0.01)
    assert [s["step"] for s in log["steps"]] == [1, 2, 3]
    assert [v[0] for v in log["val"]] == [0, 2, 3]
    assert log["steps"][-1]["flops"] == 3 * 2 * 32 * log["train_flops_per_token"]
    # a fresh router is nearly uniform, where the aux loss is about k = 2
    assert all(abs(s["aux"] - 2) < 0.2 for s in log["steps"]), [s["aux"] for s in log["steps"]]
    step, shares = log["load"][0]
    assert step == 1 and len(shares) == 4 and len(shares[0]) == 8
    assert all(abs(sum(layer) - 1) < 1e-4 for layer in shares)
    assert log["activated_params"] < log["total_params"]


def test_token_types():
    assert [mx.token_type(t) for t in (" cat", "42", " +", " def", ".", "\n", " =")] == \
        ["word", "digit", "operator", "code keyword", "punctuation", "space/newline", "operator"]


def test_ablations_remove_exactly_one_part(base_and_tokenizer):
    base, tokenizer = base_and_tokenizer
    moe = mx.build_models(base, TINY, ["moe"])["moe"]
    assert isinstance(moe, Qwen2MoeForCausalLM)
    ids = torch.tensor([tokenizer.encode("12 + 30 = 42")])
    block = moe.model.layers[0].mlp
    x = torch.randn(1, 5, 192)
    with torch.no_grad():
        full = block(x)
        with mx.ablate(moe, shared=True):
            routed_only = block(x)
        with mx.ablate(moe, routed=True):
            shared_only = block(x)
        torch.testing.assert_close(routed_only + shared_only, full, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(shared_only[0], block.shared_output(x[0]))
        torch.testing.assert_close(block(x), full)  # hooks are gone afterwards
    docs = {"arithmetic": [ids[0].tolist()]}
    report = mx.shared_expert_report(moe, docs)["arithmetic"]
    assert report["no_shared"] > report["full"], "the shared expert starts as the whole dense FFN"
    assert len(report["gate_mean"]) == 4 and all(abs(g - 0.5) < 1e-6 for g in report["gate_mean"])


def test_the_shipped_log_holds_every_run():
    runs = mx.load_runs()
    assert set(runs["runs"]) == set(mx.RUN_NAMES)
    cfg = runs["config"]
    for name, run in runs["runs"].items():
        assert len(run["steps"]) == cfg["steps"], name
        assert run["val"][0][0] == 0 and run["val"][-1][0] == cfg["steps"]
        assert abs(run["val"][0][1] - runs["base_val_loss"]) < 0.01, name  # every run starts at the base loss
    activated = {n: r["activated_params"] for n, r in runs["runs"].items()}
    total = {n: r["total_params"] for n, r in runs["runs"].items()}
    assert activated["moe"] == activated["moe-no-aux"] and total["moe"] == total["moe-no-aux"]
    # the dense baselines bracket the MoE: as many activated FFN neurons, and as many in total
    assert total["dense-activated"] < total["moe"] and activated["dense-total"] > activated["moe"]
    analysis = runs["analysis"]
    assert set(analysis["routing_by_domain"]) == {"stories", "code", "arithmetic"}
    assert set(analysis["shared_expert"]) == {"stories", "code", "arithmetic"}
    assert set(analysis["at_start"]) == {"routing_by_domain", "routing_by_token_type"}
    scratch = runs["scratch"]
    assert set(scratch["runs"]) == set(mx.SCRATCH_RUNS) == set(scratch["analysis"])
    assert scratch["runs"]["scratch-aux"]["aux_coef"] > 0 == scratch["runs"]["scratch-no-aux"]["aux_coef"]


def test_the_from_scratch_moe_has_no_shared_expert_and_small_random_weights():
    model = mx.scratch_moe(1536)
    assert model.config.shared_expert_intermediate_size == 0 and model.config.num_experts == 16
    assert all(layer.mlp.shared_expert is None for layer in model.model.layers)
    gate_up = model.model.layers[0].mlp.experts.gate_up_proj
    assert abs(float(gate_up.std()) - 0.02) < 0.002
    assert torch.equal(mx.scratch_moe(1536).lm_head.weight, model.lm_head.weight), "seeded"
