"""Code and math specialists follow the Qwen report's recipes (on toy models)."""

from __future__ import annotations

import pytest
import torch

import qwen_edu.alignment.sft as sft_module
import qwen_edu.alignment.specialists as specialists
from qwen_edu.alignment.data import encode_sft
from qwen_edu.alignment.specialists import (
    SPECIALIST_NAMES,
    SPECIALIST_RECIPES,
    SpecialistConfig,
    code_conversations,
    code_reply_ok,
    math_conversations,
    train_specialist,
)
from qwen_edu.alignment.toy import toy_model
from qwen_edu.tokenizer import load_tokenizer
from qwen_edu.training import base_model_path

torch.set_num_threads(1)

SMALL = SpecialistConfig(steps=20, batch_size=8, seq_len=64, lr=3e-3, num_documents=200, sft_steps=30,
                         sft_batch_size=8, sft_lr=3e-3, num_conversations=120)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(base_model_path())  # the book's tokenizer: it has seen code and arithmetic


def test_recipes_are_the_reports():
    # Qwen report: Code-Qwen = continued pre-training on code, Code-Qwen-Chat = Code-Qwen + SFT;
    # Math-Qwen-Chat = math SFT on the base model (no continued pre-training).
    assert SPECIALIST_RECIPES == {"code": ("continued_pretraining", "sft"), "math": ("sft",)}
    assert SPECIALIST_NAMES == {"code": ("Code-Qwen", "Code-Qwen-Chat"), "math": ("Math-Qwen-Chat",)}


def test_code_reply_ok_parses_and_never_runs_the_reply():
    assert code_reply_ok("def add(a, b):\n    return a + b", "add", ["a", "b"])
    assert not code_reply_ok("def add(a):\n    return a", "add", ["a", "b"])  # wrong arguments
    assert not code_reply_ok("def plus(a, b):\n    return a + b", "add", ["a", "b"])  # wrong name
    assert not code_reply_ok("def add(a, b)\n    return a + b", "add", ["a", "b"])  # syntax error
    # A reply that would end the process if it were executed is only parsed.
    assert code_reply_ok("import os\nos._exit(3)\ndef f(x):\n    return x", "f", ["x"])


def test_code_and_math_conversations():
    for conv in code_conversations(30, seed=1):
        request, reply = conv["messages"][-2]["content"], conv["messages"][-1]["content"]
        assert f"{conv['name']}({', '.join(conv['args'])})" in request
        assert code_reply_ok(reply, conv["name"], conv["args"]), reply
    maths = math_conversations(30, seed=1)
    assert all(c["kind"] == "math" and c["messages"][-1]["content"] == c["answer"] for c in maths)
    assert code_conversations(5, seed=2) == code_conversations(5, seed=2)


def _spy(monkeypatch, calls):
    """Record which training stage runs, in order, and what it was given."""
    original_cpt, original_sft = specialists.continue_pretraining, sft_module.train_sft

    def continue_pretraining(model, tokenizer, documents, *args, **kwargs):
        calls.append(("continued_pretraining", list(documents)))
        return original_cpt(model, tokenizer, documents, *args, **kwargs)

    def train_sft(model, tokenizer, conversations, *args, **kwargs):
        calls.append(("sft", list(conversations)))
        return original_sft(model, tokenizer, conversations, *args, **kwargs)

    monkeypatch.setattr(specialists, "continue_pretraining", continue_pretraining)
    monkeypatch.setattr(sft_module, "train_sft", train_sft)


def test_math_qwen_chat_is_math_sft_on_the_base_model(tok, monkeypatch):
    calls = []
    _spy(monkeypatch, calls)
    base = toy_model(0, vocab_size=tok.vocab_size)
    _, metrics = train_specialist(base, tok, "math", SMALL, progress=False, eval_size=16)
    assert [stage for stage, _ in calls] == ["sft"]  # no continued pre-training
    conversations = calls[0][1]
    assert all(c["kind"] == "math" for c in conversations)
    # Only the assistant's answers carry loss (the report masks system and user inputs).
    labels = encode_sft(tok, conversations[0])["labels"]
    learned = tok.decode([t for t in labels if t != -100])
    assert learned == conversations[0]["answer"] + "<|im_end|>"
    assert list(metrics["by_stage"]) == ["base", "sft"] and list(metrics["history"]) == ["sft"]
    assert len(metrics["history"]["sft"]) == SMALL.sft_steps
    losses = [h["loss"] for h in metrics["history"]["sft"]]
    assert losses[-1] < 0.5 * losses[0]  # it learns the answers (a toy model is too small to master them)
    assert {"math_accuracy", "format_rate", "story_loss"} == set(metrics["by_stage"]["sft"])
    for p, q in zip(base.parameters(), toy_model(0, vocab_size=tok.vocab_size).parameters()):
        assert torch.equal(p, q)  # the base model itself is untouched


def test_code_qwen_chat_is_continued_pretraining_then_sft(tok, monkeypatch):
    calls = []
    _spy(monkeypatch, calls)
    steps = []
    _, metrics = train_specialist(toy_model(0, vocab_size=tok.vocab_size), tok, "code", SMALL, progress=False,
                                  eval_size=16, on_step=steps.append)
    assert [stage for stage, _ in calls] == ["continued_pretraining", "sft"]
    documents, conversations = calls[0][1], calls[1][1]
    assert all("<|im_start|>" not in doc for doc in documents)  # plain text, no chat format
    assert all(c["kind"] == "code" for c in conversations)
    assert [s["stage"] for s in steps] == ["continued_pretraining"] * SMALL.steps + ["sft"] * SMALL.sft_steps
    by_stage = metrics["by_stage"]
    assert list(by_stage) == ["base", "continued_pretraining", "sft"]
    # Continued pre-training is what lowers the loss on held-out code.
    assert by_stage["continued_pretraining"]["code_loss"] < by_stage["base"]["code_loss"]
    assert metrics["code_loss_after"] == by_stage["sft"]["code_loss"]
    assert 0 <= metrics["code_chat_rate_after"] <= 1


def test_unknown_domain_is_rejected(tok):
    with pytest.raises(ValueError, match="unknown specialist domain 'poetry'"):
        train_specialist(toy_model(0, vocab_size=tok.vocab_size), tok, "poetry", SMALL, progress=False)
