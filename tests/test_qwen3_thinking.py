"""Hybrid thinking on the book's chat model: the generated problems, both formats, the new tokens, the
training rows, budgeted decoding -- and the shipped fine-tune, if it has been built."""

from __future__ import annotations

import json
import random

import pytest
import torch

import qwen_edu
from qwen_edu.alignment.thinking import (
    ThinkingConfig,
    add_think_tokens,
    make_problem,
    make_problems,
    problem_set,
    solve,
    thinking_conversations,
    thinking_dataset,
    thinking_model_path,
)
from qwen_edu.models import Qwen2ForCausalLM, QwenConfig
from qwen_edu.tokenizer.qwen3_chat import render_qwen3
from qwen_edu.training.presets import base_model_path


@pytest.fixture(scope="module")
def tok():
    return add_think_tokens(qwen_edu.load_tokenizer(base_model_path()), embedding_rows=1536)


def test_a_problem_its_reasoning_and_its_answer():
    p = make_problem(random.Random(0), terms=4, max_value=20)
    numbers = [int(n) for n in p["question"].removeprefix("What is ").removesuffix("?").split(" + ")]
    assert len(numbers) == 4 and all(1 <= n <= 20 for n in numbers)
    assert p["value"] == sum(numbers) and p["answer"] == f"{' + '.join(map(str, numbers))} = {sum(numbers)}."
    assert len(p["steps"]) == 3  # one two-number sum per extra term, each on the running total
    running = numbers[0]
    for step, n in zip(p["steps"], numbers[1:], strict=True):
        assert step == f"{running} + {n} = {running + n}."
        running += n
    assert make_problems(5, seed=1) == make_problems(5, seed=1) != make_problems(5, seed=2)
    assert {q["terms"] for q in problem_set(50)} == {3, 4}


def test_each_problem_in_both_formats_in_the_qwen3_chat_format():
    p = make_problem(random.Random(1), terms=3)
    thinking, direct = thinking_conversations([p])
    think_text, direct_text = render_qwen3(thinking), render_qwen3(direct)
    steps = "\n".join(p["steps"])
    assert think_text == (f"<|im_start|>user\n{p['question']} /think<|im_end|>\n<|im_start|>assistant\n"
                          f"<think>\n{steps}\n</think>\n\n{p['answer']}<|im_end|>\n")
    assert direct_text == (f"<|im_start|>user\n{p['question']} /no_think<|im_end|>\n<|im_start|>assistant\n"
                           f"<think>\n\n</think>\n\n{p['answer']}<|im_end|>\n")


def test_think_tokens_are_added_in_free_embedding_rows(tok):
    assert tok.special_tokens["<think>"] == 1477 and tok.special_tokens["</think>"] == 1478
    assert "<think>" not in tok.control_tokens  # kept by skip_special_tokens, as in Qwen's tokenizer
    assert tok.encode("<think>\n</think>")[0] == 1477
    assert add_think_tokens(tok) is tok
    with pytest.raises(ValueError, match="1478 embedding rows; ids 1477 and 1478 do not fit"):
        add_think_tokens(qwen_edu.load_tokenizer(base_model_path()), embedding_rows=1478)


def test_training_rows_learn_exactly_what_the_assistant_writes(tok):
    conversations = thinking_conversations(make_problems(6, seed=3))
    data = thinking_dataset(tok, conversations)
    assert len(data) == 12
    for row in range(2):
        labels = data[row]["labels"]
        written = tok.decode(labels[labels != -100].tolist())
        reasoning = conversations[row][-1].get("reasoning_content", "")
        assert written == f"<think>\n{reasoning}\n</think>\n\n{conversations[row][-1]['content']}<|im_end|>"


def test_a_thinking_budget_stops_the_reasoning_and_the_tokens_are_counted(tok):
    torch.manual_seed(0)
    config = QwenConfig(vocab_size=1536, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).eval()  # random: it never closes its think block by itself
    questions = [p["question"] for p in make_problems(3, seed=4)]
    for budget in (1, 5):
        replies = solve(model, tok, questions, thinking=True, budget=budget, max_answer_tokens=4)
        assert all(r["budget_cut"] for r in replies)
        assert all(r["tokens"] == budget + 4 for r in replies if not r["finished"])
    direct = solve(model, tok, questions, thinking=False, max_answer_tokens=4)
    assert all(r["reasoning"] == "" and r["tokens"] <= 4 and not r["budget_cut"] for r in direct)


def test_the_shipped_thinking_model_thinks_better_than_it_answers_directly():
    try:
        path = thinking_model_path()
    except FileNotFoundError:
        pytest.skip("qwen_edu/assets/thinking_model not built")
    log = json.loads((path / "thinking_log.json").read_text())
    assert log["config"]["steps"] == ThinkingConfig().steps
    assert log["after_thinking"]["accuracy"] > log["after_no_thinking"]["accuracy"] + 0.1
    assert log["after_thinking"]["mean_tokens"] > 2 * log["after_no_thinking"]["mean_tokens"]
    assert log["before_thinking"]["accuracy"] < 0.05  # the SFT model does not know the format
    # a budget that cuts every think block leaves the model worse off than not thinking at all (it never
    # saw an unfinished block in training); accuracy comes back as the budget covers the reasoning
    budgets = log["config"]["budgets"]
    cut_all = [b for b in budgets if log[f"after_budget_{b}"]["budget_cut_rate"] == 1.0]
    assert cut_all and all(log[f"after_budget_{b}"]["accuracy"] < log["after_no_thinking"]["accuracy"]
                           for b in cut_all)
    assert log[f"after_budget_{budgets[-1]}"]["accuracy"] > log["after_no_thinking"]["accuracy"]
    model = qwen_edu.load_model(path, dtype="float32")
    tokenizer = qwen_edu.load_tokenizer(path)
    assert tokenizer.special_tokens["<think>"] == 1477
    replies = solve(model, tokenizer, [p["question"] for p in problem_set(4)], thinking=True)
    assert all(r["finished"] and r["reasoning"].count("=") >= 2 for r in replies)  # 2-3 worked steps
