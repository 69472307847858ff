"""The shipped SFT and reward models, and saving/loading a reward model."""

from __future__ import annotations

import json

import pytest
import torch

import qwen_edu
from qwen_edu.alignment.assets import reward_model_path, sft_model_path
from qwen_edu.alignment.reward import RewardModel, ValueModel
from qwen_edu.alignment.toy import toy_model


def test_reward_model_round_trip(tmp_path):
    model = RewardModel.from_causal_lm(toy_model(0)).eval()
    with torch.no_grad():
        model.score.bias.fill_(0.3)
    model.save_pretrained(tmp_path)
    loaded = RewardModel.from_pretrained(tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    # The round trip itself is exact: every stored tensor comes back bit for bit.
    saved, reloaded = model.state_dict(), loaded.state_dict()
    assert saved.keys() == reloaded.keys() and all(torch.equal(saved[k], reloaded[k]) for k in saved)
    # Scores are float results of two computation paths (fresh vs memory-mapped weights, whose
    # alignment picks different SIMD blockings for the matmuls), so they agree up to fp32
    # summation-order rounding: a few ulp of the hidden width's dot products, far below 1e-5.
    torch.testing.assert_close(loaded(ids, mask), model(ids, mask), rtol=1e-5, atol=1e-5)


def test_reward_model_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        RewardModel.from_pretrained(tmp_path)
    RewardModel.from_causal_lm(toy_model(0)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["hidden_size"] *= 2
    config["intermediate_size"] *= 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="wrong shapes"):
        RewardModel.from_pretrained(tmp_path)
    ValueModel.from_causal_lm(toy_model(0)).save_pretrained(tmp_path / "value")
    assert isinstance(ValueModel.from_pretrained(tmp_path / "value"), ValueModel)


def test_shipped_sft_and_reward_models_load_and_agree_with_their_log():
    log = json.loads((sft_model_path() / "alignment_log.json").read_text())
    assert log["sft_format_rate"] >= 0.9 and log["reward_heldout_accuracy"] > 0.7
    sft = qwen_edu.load_model(sft_model_path(), dtype=torch.float32)
    tokenizer = qwen_edu.load_tokenizer(sft_model_path())
    reward = RewardModel.from_pretrained(reward_model_path())
    prompt = [{"role": "user", "content": "What is 3 + 4?"}]
    chosen = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": "3 + 4 = 7."}]).ids
    rejected = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": "3 + 4 = 9."}]).ids
    with torch.no_grad():
        scores = reward(torch.tensor([chosen, rejected]))
        logits = sft(torch.tensor([chosen])).logits
    assert torch.isfinite(logits).all()
    assert scores[0] > scores[1], "the shipped reward model prefers the correct sum"


def test_shipped_pmp_study_matches_the_current_reward_recipe():
    """Chapter 5 plots reward_model/pmp_study.json: it must come from today's reward settings."""
    from dataclasses import asdict

    from qwen_edu.alignment.assets import PMP_STUDY_FILE
    from qwen_edu.alignment.pipeline import pipeline_config

    study = json.loads((reward_model_path() / PMP_STUDY_FILE).read_text())
    assert study["reward_config"] == asdict(pipeline_config("quick").reward), (
        "the quick preset's reward settings changed: rerun `python -m qwen_edu.alignment.assets --pmp-study`")
    runs = {(r["start"], r["seed"]) for r in study["runs"]}
    assert runs == {(s, seed) for s in ("base", "base+pmp", "sft") for seed in study["seeds"]}
    for run in study["runs"]:
        steps = [step for step, _ in run["curve"]]
        assert steps[0] == 1 and steps[-1] == study["steps"]
        assert all(0 <= accuracy <= 1 for _, accuracy in run["curve"])
