"""Chapter 13's shipped models (qwen_edu.training.hybrid_models) and the MTP training loss."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import qwen_edu
from qwen_edu.models.qwen3_next import FULL, LINEAR, Qwen3NextConfig, Qwen3NextForCausalLM
from qwen_edu.speculative import mtp_speculative_generate
from qwen_edu.training.hybrid_models import (
    ARCHITECTURES,
    HybridRecipe,
    hybrid_models_path,
    load_hybrid_model,
    model_config,
    mtp_loss,
    train_model,
)


def test_mtp_loss_predicts_the_token_after_next():
    torch.manual_seed(0)
    config = Qwen3NextConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             layer_types=[LINEAR, FULL], num_attention_heads=2, num_key_value_heads=1,
                             head_dim=16, linear_num_key_heads=1, linear_num_value_heads=2,
                             linear_key_head_dim=8, linear_value_head_dim=8, num_experts=0)
    model = Qwen3NextForCausalLM(config).eval()
    ids = torch.randint(0, 50, (2, 12))
    labels = ids.clone()
    labels[0, 5] = -100
    with torch.no_grad():
        hidden = model(ids).last_hidden_state
        loss = mtp_loss(model, hidden, ids, labels)
        # by hand: position t reads (h_t, x_{t+1}) and is scored on x_{t+2}
        logits = model.mtp_logits(hidden[:, :10], ids[:, 1:11])
        targets = labels[:, 2:12]
        expected = F.cross_entropy(logits.reshape(-1, 50), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected)


class _TinyTokenizer:
    vocab_size, eos_id = 60, 59


def test_train_model_lowers_both_losses():
    recipe = HybridRecipe(steps=12, batch_size=4, passkey_rows=1, seq_len=32, lr=1e-2, warmup_steps=2,
                          eval_every=6, eval_rows=4)
    recipe.model.update(hidden_size=32, intermediate_size=64, head_dim=16, linear_key_head_dim=8,
                        linear_value_head_dim=8)
    gen = torch.Generator().manual_seed(0)
    pattern = torch.arange(32) % 7  # an easy, periodic "language"
    ids = (pattern + torch.randint(0, 3, (12, 4, 1), generator=gen)).clone()
    answer = torch.zeros_like(ids, dtype=torch.bool)
    answer[:, -1, -5:] = True
    rows = ({"input_ids": ids, "labels": ids.clone(), "answer_mask": answer},
            {"input_ids": ids[0], "labels": ids[0].clone()})
    model, log = train_model([LINEAR, FULL], _TinyTokenizer(), recipe, rows, progress=False)
    assert log["layer_types"] == [LINEAR, FULL] and len(log["steps"]) == 12
    assert [v["step"] for v in log["val"]] == [6, 12]
    assert log["steps"][-1]["loss"] < log["steps"][0]["loss"]
    assert log["steps"][-1]["mtp_loss"] < log["steps"][0]["mtp_loss"]
    assert not model.training and model.config.vocab_size == 64  # padded to a multiple of 64


@pytest.fixture(scope="module")
def shipped():
    try:
        path = hybrid_models_path()
    except FileNotFoundError as exc:
        pytest.fail(str(exc))
    return path, json.loads((path / "training_log.json").read_text())


def test_shipped_models_differ_only_in_their_layer_types(shipped):
    path, log = shipped
    assert set(log["models"]) == set(ARCHITECTURES)
    configs = {name: json.loads((path / name / "config.json").read_text()) for name in ARCHITECTURES}
    for name, config in configs.items():
        assert config["layer_types"] == ARCHITECTURES[name]
        assert config["mtp_num_hidden_layers"] == 1
        others = {k: v for k, v in config.items() if k != "layer_types"}
        assert others == {k: v for k, v in configs["hybrid"].items() if k != "layer_types"}
    tokenizer = qwen_edu.load_tokenizer(path / "hybrid")
    assert model_config(ARCHITECTURES["hybrid"], tokenizer, HybridRecipe()).vocab_size == configs["hybrid"]["vocab_size"]


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_shipped_model_matches_its_log(shipped, name):
    _, log = shipped
    entry = log["models"][name]
    model = load_hybrid_model(name)
    assert model.mtp is not None and model.num_parameters() == entry["parameters"]
    assert len(entry["steps"]) == log["recipe"]["steps"]
    first, last = entry["steps"][0], entry["val"][-1]
    assert last["loss"] < first["loss"] / 3  # it learned the corpus
    assert last["mtp_loss"] < first["mtp_loss"] / 2  # and the head learned the token after next


def test_shipped_hybrid_speculative_decoding_is_lossless(shipped):
    path, _ = shipped
    model = load_hybrid_model("hybrid")
    tokenizer = qwen_edu.load_tokenizer(path / "hybrid")
    prompt = torch.tensor([tokenizer.encode("Once upon a time")])
    plain = qwen_edu.generate(model, prompt, max_new_tokens=40, eos_token_id=tokenizer.eos_id)
    fast = mtp_speculative_generate(model, prompt, max_new_tokens=40, num_draft=2, eos_token_id=tokenizer.eos_id)
    assert torch.equal(fast.tokens, plain)
    assert fast.acceptance_rate > 0.3  # a trained head drafts usefully (measured: 21 of 36 drafts, 58%)
