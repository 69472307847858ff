"""Online DPO (Qwen2's online preference stage): sample, score with a reward model, pair best vs worst, DPO."""

from __future__ import annotations

import copy

import pytest
import torch

from qwen_edu.alignment.core import frozen_copy, sequence_logprobs
from qwen_edu.alignment.data import make_prompts
from qwen_edu.alignment.dpo import dpo_loss
from qwen_edu.alignment.online_dpo import (
    OnlineDPOConfig,
    best_worst_pairs,
    online_dpo_step,
    sample_and_score,
    train_online_dpo,
)
from qwen_edu.alignment.reward import RewardModel
from qwen_edu.alignment.toy import toy_model, toy_tokenizer


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer()


def _reward_model(seed: int = 1) -> RewardModel:
    return RewardModel.from_causal_lm(toy_model(seed)).eval()


def test_samples_are_grouped_by_prompt_and_scored_by_the_reward_model(tok):
    policy, rm = toy_model(0), _reward_model()
    prompts = make_prompts(3, seed=5)
    g = torch.Generator().manual_seed(0)
    responses, scores = sample_and_score(policy, rm, tok, prompts, 4, max_new_tokens=6, generator=g)
    assert responses.input_ids.shape[0] == 12 and scores.shape == (12,)
    # rows p*k .. p*k+k-1 share prompt p's tokens
    prompt_rows = responses.input_ids[:, : responses.prompt_length]
    for p in range(3):
        assert all(torch.equal(prompt_rows[p * 4], prompt_rows[p * 4 + j]) for j in range(4))
    with torch.no_grad():
        expected = rm(responses.input_ids, responses.attention_mask)
    torch.testing.assert_close(scores, expected)  # the same forward pass, repeated: no rounding gap
    with pytest.raises(ValueError, match="samples_per_prompt must be >= 2"):
        sample_and_score(policy, rm, tok, prompts, 1)


def test_pairs_are_the_best_and_the_worst_sample_of_each_prompt(tok):
    policy = toy_model(0)
    prompts = make_prompts(3, seed=5)
    responses, _ = sample_and_score(policy, _reward_model(), tok, prompts, 3, max_new_tokens=5,
                                    generator=torch.Generator().manual_seed(1))
    scores = torch.tensor([0.1, 0.9, -0.4,   # prompt 0: best row 1, worst row 2
                           0.5, 0.5, 0.52,   # prompt 1: gap 0.02 <= 0.05 -> no pair
                           2.0, -1.0, 0.0])  # prompt 2: best row 6, worst row 7
    pairs = best_worst_pairs(responses, scores, 3, min_reward_gap=0.05)
    assert len(pairs) == 2
    assert torch.equal(pairs.input_ids, responses.input_ids[[1, 6, 2, 7]])
    assert torch.equal(pairs.response_mask, responses.response_mask[[1, 6, 2, 7]])
    # selections of the given scores: exact
    assert torch.equal(pairs.chosen_reward, scores[[1, 6]]) and torch.equal(pairs.rejected_reward, scores[[2, 7]])
    assert best_worst_pairs(responses, torch.zeros(9), 3) is None, "all ties: no preference, no pair"
    with pytest.raises(ValueError, match="groups of 4"):
        best_worst_pairs(responses, scores, 4)


def test_one_step_is_the_dpo_loss_on_the_sampled_tokens(tok):
    policy, rm = toy_model(0), _reward_model()
    ref = frozen_copy(policy)
    for p in policy.parameters():
        p.requires_grad_(True)
    responses, scores = sample_and_score(policy, rm, tok, make_prompts(4, seed=2), 4, max_new_tokens=6,
                                         generator=torch.Generator().manual_seed(3))
    pairs = best_worst_pairs(responses, scores, 4)
    assert pairs is not None
    with torch.no_grad():
        ref_c, ref_r = sequence_logprobs(ref, pairs.input_ids, pairs.attention_mask, pairs.response_mask).chunk(2)
        pi_c, pi_r = sequence_logprobs(policy, pairs.input_ids, pairs.attention_mask, pairs.response_mask).chunk(2)
    expected, _, _ = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.5)
    # the policy starts equal to the reference: every log-ratio is 0 and the loss is log 2
    torch.testing.assert_close(expected, torch.tensor(0.6931472), rtol=0, atol=1e-6)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)
    stats = online_dpo_step(policy, optimizer, pairs, ref_c, ref_r, beta=0.5)
    assert stats["loss"] == pytest.approx(expected.item(), abs=1e-6)
    with torch.no_grad():
        after_c, after_r = sequence_logprobs(policy, pairs.input_ids, pairs.attention_mask, pairs.response_mask).chunk(2)
    new_loss, _, _ = dpo_loss(after_c, after_r, ref_c, ref_r, beta=0.5)
    assert new_loss < expected, "a gradient step on the pairs lowers their DPO loss"


def test_training_moves_the_policy_towards_the_reward_models_choice(tok):
    policy, rm = toy_model(0), _reward_model()
    start = copy.deepcopy(policy)
    for p in policy.parameters():
        p.requires_grad_(True)
    config = OnlineDPOConfig(iterations=3, prompts_per_iteration=6, samples_per_prompt=4, max_new_tokens=6,
                             lr=1e-3, epochs=2, batch_size=4, min_reward_gap=0.0)
    seen = []
    history = train_online_dpo(policy, rm, tok, make_prompts(20, seed=9), config, progress=False,
                               on_iteration=seen.append)
    assert len(history) == 3 and seen == history
    assert all(h["pairs"] == 6 for h in history)  # min_reward_gap=0: every prompt with distinct scores pairs
    assert all(h["reward_gap"] > 0 for h in history)
    changed = any(not torch.equal(a, b) for a, b in zip(policy.parameters(), start.parameters()))
    assert changed and not any(p.requires_grad for p in rm.parameters())
    # seeded: the same run again gives the same records
    again = copy.deepcopy(start)
    for p in again.parameters():
        p.requires_grad_(True)
    assert train_online_dpo(again, rm, tok, make_prompts(20, seed=9), config, progress=False) == history


def test_bad_inputs(tok):
    with pytest.raises(ValueError, match="no prompts"):
        train_online_dpo(toy_model(0), _reward_model(), tok, [])
    other = toy_model(0, vocab_size=tok.vocab_size + 8)
    with pytest.raises(ValueError, match="another shape"):
        train_online_dpo(toy_model(0), _reward_model(), tok, make_prompts(2), ref_model=other)
