"""Preference-model pre-training (PMP): the mined comparisons, their encoding, and the PMP stage."""

from __future__ import annotations

import pytest
import torch

from qwen_edu.alignment import RewardConfig, RewardModel, make_comparisons, train_reward_model
from qwen_edu.alignment.data import encode_text_pair, make_pmp_pairs
from qwen_edu.alignment.reward import evaluate_text_pairs
from qwen_edu.alignment.toy import toy_model, toy_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer()


def test_pmp_pairs_are_mined_from_the_corpus_with_the_right_side_chosen():
    pairs = make_pmp_pairs(300, seed=4)
    assert pairs == make_pmp_pairs(300, seed=4)  # seeded
    assert {p["kind"] for p in pairs} == {"story", "math", "code"}
    for p in pairs:
        assert p["chosen"].strip() != p["rejected"].strip()
        if p["kind"] == "math":  # "a op b =" followed by the right result, against a wrong one
            a, op, b, _ = p["context"].split()
            value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            assert int(p["chosen"]) == value != int(p["rejected"])
        elif p["kind"] == "code":  # the function's own body completes its header into valid Python
            compile(p["context"] + p["chosen"], "<pmp>", "exec")
            assert p["context"].startswith("def ")


def test_encode_text_pair_marks_the_reply(tok):
    pair = {"context": "12 + 30 =", "chosen": " 42", "rejected": " 41"}
    encoded = encode_text_pair(tok, pair)
    context = tok.encode(pair["context"])
    for key in ("chosen", "rejected"):
        ids, mask = encoded[f"{key}_ids"], encoded[f"{key}_response_mask"]
        assert ids == context + tok.encode(pair[key])
        assert mask == [0] * len(context) + [1] * (len(ids) - len(context))
    with pytest.raises(ValueError, match="non-empty string 'rejected'"):
        encode_text_pair(tok, {"context": "x", "chosen": "a", "rejected": " "})


def _reward_model(seed=0):
    model = RewardModel.from_causal_lm(toy_model(seed))
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def test_pmp_stage_runs_before_finetuning_and_fits_the_mined_preferences(tok):
    pairs = make_comparisons(32, seed=1)
    # Short mined pairs (right vs wrong sums) keep the toy run fast; 60 steps of 16 pairs visit these
    # 48 about 20 times each.
    mined = [p for p in make_pmp_pairs(200, seed=4) if p["kind"] == "math"][:48]
    config = RewardConfig(steps=2, batch_size=16, lr=1e-3, pmp_steps=60)
    with_pmp = _reward_model()
    start = {k: v.clone() for k, v in with_pmp.state_dict().items()}
    history = train_reward_model(with_pmp, tok, pairs, config, pmp_pairs=mined, progress=False)
    assert [h["stage"] for h in history] == ["pmp"] * 60 + ["finetune"] * 2
    without = _reward_model()
    plain = train_reward_model(without, tok, pairs, RewardConfig(steps=2, batch_size=16, lr=1e-3), progress=False)
    assert [h["stage"] for h in plain] == ["finetune"] * 2
    # What PMP changes: the backbone and head move before fine-tuning starts, and the model now ranks
    # the mined comparisons it was pre-trained on; two fine-tuning steps alone leave it near chance.
    assert any(not torch.equal(start[k], v) for k, v in with_pmp.state_dict().items() if k.startswith("model."))
    pmp_losses = [h["loss"] for h in history if h["stage"] == "pmp"]
    assert sum(pmp_losses[-10:]) < sum(pmp_losses[:10])
    learned = evaluate_text_pairs(with_pmp, tok, mined)["accuracy"]
    untrained = evaluate_text_pairs(without, tok, mined)["accuracy"]
    assert learned > 0.75 and learned > untrained + 0.15


def test_given_pmp_pairs_are_used_and_must_not_be_empty(tok):
    pairs = make_comparisons(16, seed=1)
    mined = [p for p in make_pmp_pairs(60, seed=5) if p["kind"] == "math"][:8]
    a, b = _reward_model(), _reward_model()
    config = RewardConfig(steps=1, batch_size=8, pmp_steps=3)
    train_reward_model(a, tok, pairs, config, pmp_pairs=mined, progress=False)
    train_reward_model(b, tok, pairs, config, pmp_pairs=mined, progress=False)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)  # deterministic repeat of the same computation
    with pytest.raises(ValueError, match="no PMP comparison pairs"):
        train_reward_model(_reward_model(), tok, pairs, config, pmp_pairs=[], progress=False)
