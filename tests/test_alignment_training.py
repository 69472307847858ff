"""Alignment trainers on toy models: SFT, reward model, DPO, PPO, specialists, the pipeline; trl cross-checks."""

from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch

from qwen_edu.alignment import (
    DPOConfig,
    RewardConfig,
    RewardModel,
    SFTConfig,
    SpecialistConfig,
    arithmetic_accuracy,
    arithmetic_problems,
    collate_pairs,
    continue_pretraining,
    dpo_loss,
    encode_pair,
    entropy_from_logits,
    evaluate_chat,
    evaluate_dpo,
    evaluate_reward_model,
    make_comparisons,
    make_conversations,
    make_prompts,
    pipeline_config,
    run_alignment_pipeline,
    sequence_logprobs,
    text_loss,
    token_logprobs,
    train_dpo,
    train_reward_model,
    train_sft,
)
from qwen_edu.alignment.core import frozen_copy, pad_id_of
from qwen_edu.alignment.toy import toy_model, toy_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer()


def _trainable(model):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def test_train_sft_learns_and_is_deterministic(tok):
    convs = make_conversations(200, seed=0)
    seen = []
    config = SFTConfig(steps=40, batch_size=8, lr=3e-3)
    a = _trainable(toy_model(0))
    history = train_sft(a, tok, convs, config, on_step=seen.append, progress=False)
    assert len(history) == 40 and seen == history
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]
    b = _trainable(toy_model(0))
    assert [h["loss"] for h in train_sft(b, tok, convs, config, progress=False)] == [h["loss"] for h in history]
    metrics = evaluate_chat(a, tok, make_prompts(8, seed=9), max_new_tokens=16)
    assert set(metrics) >= {"format_rate", "accuracy", "finished_rate", "samples"}
    assert len(metrics["samples"]) == 8


def test_train_reward_model_beats_chance_on_held_out_pairs(tok):
    rm = _trainable(RewardModel.from_causal_lm(toy_model(0)))
    history = train_reward_model(rm, tok, make_comparisons(300, seed=1),
                                 RewardConfig(steps=40, batch_size=16, lr=1e-3), progress=False)
    assert history[-1]["loss"] < history[0]["loss"]
    held = evaluate_reward_model(rm, tok, make_comparisons(64, seed=2))
    assert held["accuracy"] > 0.6


def test_dpo_increases_the_implicit_reward_accuracy(tok):
    policy = _trainable(toy_model(0))
    ref = frozen_copy(policy)
    pairs = make_comparisons(200, seed=1)
    before = evaluate_dpo(policy, ref, tok, pairs[:64])
    assert before["loss"] == pytest.approx(0.6931, abs=1e-3) and before["margin"] == 0
    history = train_dpo(policy, tok, pairs, DPOConfig(steps=25, batch_size=16, lr=1e-3), ref_model=ref,
                        progress=False)
    after = evaluate_dpo(policy, ref, tok, pairs[:64])
    assert after["reward_accuracy"] > 0.7 and after["margin"] > 0
    assert history[-1]["loss"] < history[0]["loss"]


def test_dpo_reference_logprobs_are_cached_once(tok, monkeypatch):
    """The reference model is run once per pair before training, never inside the loop."""
    policy = _trainable(toy_model(0))
    ref = frozen_copy(policy)
    calls = []
    original = ref.forward

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(ref, "forward", counting)
    train_dpo(policy, tok, make_comparisons(20, seed=1), DPOConfig(steps=6, batch_size=4), ref_model=ref,
              progress=False)
    assert sum(calls) == 40  # 20 chosen + 20 rejected rows, once


def test_pipeline_smoke_runs_every_stage(tok):
    events = []
    out = run_alignment_pipeline(toy_model(0), tok, "smoke", progress=False,
                                 on_stage=lambda name, m: events.append(name))
    assert events == ["base", "sft", "reward", "ppo", "dpo"]
    m = out["metrics"]
    assert 0 <= m["sft"]["format_rate"] <= 1 and 0 <= m["reward"]["accuracy"] <= 1
    assert {"reward_before", "reward_after", "kl"} <= set(m["ppo"])
    assert {"reward_accuracy", "margin"} <= set(m["dpo"])
    assert set(out["models"]) >= {"sft", "reward", "reference", "ppo", "dpo"}
    assert all(t >= 0 for t in out["timings"].values())
    with pytest.raises(KeyError, match="unknown pipeline preset"):
        pipeline_config("huge")


def test_specialist_measures_and_continued_pretraining(tok):
    model = _trainable(toy_model(0))
    problems = arithmetic_problems(6, seed=3)
    assert all(q.endswith(" =") for q, _ in problems)
    acc, samples = arithmetic_accuracy(model, tok, problems, return_samples=True)
    assert 0 <= acc <= 1 and len(samples) == 6
    from qwen_edu.corpus import generate_arithmetic

    docs = generate_arithmetic(200, seed=0)
    before = text_loss(model, tok, docs[:20])
    history = continue_pretraining(model, tok, docs, SpecialistConfig(steps=30, batch_size=8, seq_len=64, lr=3e-3),
                                   progress=False)
    assert len(history) == 30
    assert text_loss(model, tok, docs[:20]) < before


# --- cross-checks against trl (when it is installed) ----------------------------------------------------

def test_logprobs_and_entropy_match_trl():
    import trl.trainer.utils as utils  # trl is in the test extra
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 50)
    tokens = torch.randint(0, 50, (2, 7))
    torch.testing.assert_close(token_logprobs(logits, tokens), utils.selective_log_softmax(logits, tokens))
    torch.testing.assert_close(entropy_from_logits(logits), utils.entropy_from_logits(logits))


def test_dpo_loss_matches_trl_dpo_trainer(tok):
    """Run trl's own ``DPOTrainer._compute_loss`` on a stub holding our model's per-token log-probs."""
    import trl.trainer.dpo_trainer as dpo_module  # trl is in the test extra
    policy = toy_model(0)
    ref = toy_model(1)
    encoded = [encode_pair(tok, p) for p in make_comparisons(4, seed=2)]
    batch = collate_pairs(encoded, pad_id_of(tok))
    ids, mask, resp = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    with torch.no_grad():
        per_token = sequence_logprobs(policy, ids, mask, resp, reduce="none")
        ref_sum = sequence_logprobs(ref, ids, mask, resp)
    beta = 0.3
    ours, _, _ = dpo_loss(*per_token.sum(-1).chunk(2), *ref_sum.chunk(2), beta=beta)

    class FakeModel:
        training = True

        def __call__(self, **kwargs):
            zeros = torch.zeros_like(per_token)
            return types.SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros,
                                         is_top1=torch.zeros_like(per_token, dtype=torch.bool))

    identity = lambda x: x
    fake_model = FakeModel()
    stub = types.SimpleNamespace(
        model=fake_model, accelerator=types.SimpleNamespace(device="cpu", gather=identity, gather_for_metrics=identity),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=["sigmoid"], loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": ids, "attention_mask": mask, "completion_mask": resp,
              "ref_chosen_logps": ref_sum.chunk(2)[0], "ref_rejected_logps": ref_sum.chunk(2)[1]}
    theirs = dpo_module.DPOTrainer._compute_loss(stub, fake_model, inputs, return_outputs=False)
    torch.testing.assert_close(ours, theirs)
