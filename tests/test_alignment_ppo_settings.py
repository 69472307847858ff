"""Qwen-Chat's PPO settings as options: value warm-up, reward normalisation, pre-training gradient mixing,
several replies per prompt; and the report's values as a config."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qwen_edu.alignment import (
    QWEN_PPO_REPORTED,
    PPOConfig,
    PPOTrainer,
    RewardModel,
    RunningMoments,
    make_comparisons,
)
from qwen_edu.alignment.toy import toy_model, toy_tokenizer
from qwen_edu.corpus import generate_stories
from qwen_edu.training import pack_sequences, tokenize_documents
from qwen_edu.training.loss import causal_lm_loss

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer()


@pytest.fixture(scope="module")
def stories(tok):
    """Pre-training rows for the ptx loss: stories, packed into 32-token rows."""
    return pack_sequences(tokenize_documents(tok, generate_stories(12, seed=5)), 32, eos_id=0)


def _trainer(tok, pretrain_data=None, **overrides):
    policy = toy_model(0)
    for p in policy.parameters():
        p.requires_grad_(True)
    config = PPOConfig(batch_size=4, mini_batch_size=4, ppo_epochs=1, lr=1e-3, max_new_tokens=6,
                       ptx_batch_size=4, **overrides)
    return PPOTrainer(policy, RewardModel.from_causal_lm(toy_model(1)), tok, config, pretrain_data=pretrain_data)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_qwen_reported_settings_are_ppo_config_fields():
    names = {f.name for f in dataclasses.fields(PPOConfig)}
    assert set(QWEN_PPO_REPORTED) <= names
    config = PPOConfig(**QWEN_PPO_REPORTED)  # a valid configuration
    assert (config.kl_coef, config.lr, config.value_lr, config.clip_range_value) == (0.04, 1e-6, 5e-6, 0.15)
    assert (config.value_warmup_steps, config.responses_per_prompt, config.top_p) == (50, 2, 0.9)
    assert config.reward_normalization == "mean"


def test_running_moments_equal_the_statistics_of_everything_seen():
    torch.manual_seed(0)
    batches = [torch.randn(n) * 3 + 1 for n in (5, 1, 17, 8)]
    stats = RunningMoments()
    for b in batches:
        stats.update(b)
    everything = torch.cat(batches).double()
    # Chan's update is exact algebra; the float64 results differ from a one-pass mean/var by rounding only.
    assert stats.count == len(everything)
    assert stats.mean == pytest.approx(float(everything.mean()), rel=1e-12)
    assert stats.var == pytest.approx(float(everything.var(unbiased=False)), rel=1e-12)
    x = torch.tensor([0.0, 2.0])
    torch.testing.assert_close(stats.normalize(x), x - stats.mean)
    torch.testing.assert_close(stats.normalize(x, scale=True), (x - stats.mean) / (stats.std + 1e-8))


def test_reward_normalization_centres_the_score_by_its_running_mean(tok):
    trainer = _trainer(tok, reward_normalization="mean", kl_coef=0.0)
    prompts = make_comparisons(4, seed=3)
    seen = []
    for _ in range(2):
        trainer.step(prompts)
        scores = trainer.last_rollout.scores
        seen.append(scores)
        # With no KL penalty the shaped reward of a reply is its score minus the running mean of all
        # scores so far (this batch included); Rollout.scores keeps the raw score.
        running_mean = float(torch.cat(seen).double().mean())
        torch.testing.assert_close(trainer.last_rollout.rewards.sum(-1), scores - running_mean)
    assert trainer.reward_stats.count == 8
    plain = _trainer(tok, kl_coef=0.0)
    plain.step(prompts)
    torch.testing.assert_close(plain.last_rollout.rewards.sum(-1), plain.last_rollout.scores)


def test_value_warmup_trains_only_the_value_model(tok):
    trainer = _trainer(tok, value_warmup_steps=2)
    policy0, value0 = _params(trainer.policy), _params(trainer.value_model)
    snapshots = []
    records = trainer.train(make_comparisons(8, seed=3), iterations=1, progress=False,
                            on_step=lambda r: snapshots.append(_params(trainer.policy)))
    assert [r["phase"] for r in records] == ["value_warmup", "value_warmup", "ppo"]
    assert "policy_loss" not in records[0] and "policy_loss" in records[2]
    for snapshot in snapshots[:2]:  # the policy did not move during the warm-up...
        assert all(torch.equal(a, b) for a, b in zip(snapshot, policy0))
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[2], policy0))  # ...and moves after it
    assert not all(torch.equal(a, b) for a, b in zip(_params(trainer.value_model), value0))


def test_pretraining_gradient_mixing_lowers_the_pretraining_loss(tok, stories):
    rows = {"input_ids": stories.input_ids, "labels": stories.labels}

    def lm_loss(model):
        with torch.no_grad():
            return float(causal_lm_loss(model(rows["input_ids"]).logits, rows["labels"]))

    prompts = make_comparisons(4, seed=3)
    with_ptx = _trainer(tok, pretrain_data=stories, ptx_coef=1.0)
    without = _trainer(tok, pretrain_data=stories, ptx_coef=0.0)
    start = lm_loss(with_ptx.policy)
    assert start == lm_loss(without.policy)  # the same starting policy: a deterministic repeat
    for _ in range(3):
        record = with_ptx.step(prompts)
        without.step(prompts)
    assert "ptx_loss" in record
    # Both see the same prompts; only the mixed-in next-token loss on stories differs.
    assert lm_loss(with_ptx.policy) < start
    assert lm_loss(with_ptx.policy) < lm_loss(without.policy)


def test_ptx_needs_pretraining_data_and_bad_settings_are_rejected(tok, stories):
    with pytest.raises(ValueError, match="pass pretrain_data"):
        _trainer(tok, ptx_coef=0.5)
    with pytest.raises(ValueError, match="reward_normalization must be"):
        PPOConfig(reward_normalization="median")
    with pytest.raises(ValueError, match="fewer than ptx_batch_size"):
        _trainer(tok, pretrain_data=stories.input_ids[:2], ptx_coef=0.5)
    with pytest.raises(TypeError, match="pretrain_data must be"):
        _trainer(tok, pretrain_data=["a story"], ptx_coef=0.5)


def test_several_replies_per_prompt(tok):
    trainer = _trainer(tok, responses_per_prompt=2)
    trainer.step(make_comparisons(4, seed=3))
    rollout = trainer.last_rollout
    assert len(rollout) == 8
    prompts = rollout.input_ids[:, :rollout.prompt_length]
    assert torch.equal(prompts[0::2], prompts[1::2])  # rows 2i and 2i + 1 answer the same prompt
