"""Passkey retrieval: the samples, the training rows, exact-match scoring (= greedy decoding), the grid."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import qwen_edu
from qwen_edu.corpus.passkey import (
    NEEDLE_TEMPLATE,
    QUESTION,
    SECRET_WORDS,
    make_passkey_sample,
    passkey_samples,
    passkey_training_rows,
)
from qwen_edu.evaluation.retrieval import passkey_correct, plot_retrieval_heatmap, retrieval_grid
from qwen_edu.training import base_model_path


@pytest.fixture(scope="module")
def tok():
    return qwen_edu.load_tokenizer(base_model_path())


def test_samples_have_the_exact_length_and_the_needle_at_the_requested_depth(tok):
    samples = passkey_samples(tok, [200, 300], [0.0, 0.5, 1.0], repeats=2, seed=3)
    assert [s.length for s in samples] == [200] * 6 + [300] * 6
    for s in samples:
        text = tok.decode(s.input_ids)
        needle = NEEDLE_TEMPLATE.format(code=s.code)
        word, digit = s.code.split()
        assert word in SECRET_WORDS and digit in "0123456789"
        assert text.count(needle) == 1 and text.endswith(QUESTION + " " + s.code)
        assert s.answer_ids == tok.encode(" " + s.code) and len(s.answer_ids) == 3  # word, " ", digit
        assert s.prompt_ids[s.code_start : s.code_start + 3] == s.answer_ids  # what must be copied
        assert s.distance == len(s.prompt_ids) - s.code_start
        # the code's word and digit occur nowhere else in the document: only the needle answers
        assert s.prompt_ids.count(s.answer_ids[0]) == 1 and s.prompt_ids.count(s.answer_ids[2]) == 1
        # the needle starts the document, or follows the end of a sentence
        assert s.needle_start == 0 or tok.decode([s.prompt_ids[s.needle_start - 1]]).rstrip()[-1] in ".!?" \
            or s.prompt_ids[s.needle_start - 1] == tok.eos_id
    filler = 200 - len(tok.encode(NEEDLE_TEMPLATE.format(code="range 7"))) - len(tok.encode(QUESTION)) - 3
    depth0, depth_half, depth1 = samples[0], samples[2], samples[4]
    assert depth0.needle_start == 0
    assert depth1.needle_start == filler, "depth 1: right before the question"
    assert abs(depth_half.needle_start - filler / 2) < 40, "the sentence boundary nearest the middle"


def test_samples_are_seeded(tok):
    a = passkey_samples(tok, [150], [0.3], repeats=3, seed=1)
    b = passkey_samples(tok, [150], [0.3], repeats=3, seed=1)
    c = passkey_samples(tok, [150], [0.3], repeats=3, seed=2)
    assert a == b and a != c
    assert len({s.code for s in a}) == 3


def test_bad_samples(tok):
    rng = __import__("random").Random(0)
    from qwen_edu.corpus.passkey import Haystack

    with pytest.raises(ValueError, match="depth must be in"):
        make_passkey_sample(tok, 100, 1.5, Haystack(tok), rng)
    with pytest.raises(ValueError, match="too short"):
        make_passkey_sample(tok, 20, 0.5, Haystack(tok), rng)


def test_training_rows_target_everything_but_the_needle_code(tok):
    rows = passkey_training_rows(tok, 6, 120, seed=0, min_length=60)
    for row in rows:
        ids, labels, answer = row["input_ids"], row["labels"], row["answer_mask"]
        assert 60 <= len(ids) <= 120 and len(labels) == len(ids) == len(answer)
        ignored = [i for i, label in enumerate(labels) if label == -100]
        assert len(ignored) == 3, "the needle's random code: word, space, digit"
        assert [ids[i] for i in ignored] == [ids[i] for i, m in enumerate(answer) if m]  # the same code
        assert answer[-3:] == [1] * 3 and sum(answer) == 3
        assert all(label == t for label, t in zip(labels, ids) if label != -100)


class InductionOracle(nn.Module):
    """Predicts, at every position, the token that followed the earlier position whose preceding tokens match
    the current ones longest (an ideal induction head). It solves passkey retrieval; ``wrong_digit=True``
    answers every digit with the next one."""

    def __init__(self, vocab: int, wrong_digit: bool = False) -> None:
        super().__init__()
        self.vocab, self.wrong_digit = vocab, wrong_digit
        self.dummy = nn.Parameter(torch.zeros(1))
        self.digit_ids: list[int] = []

    def _predict(self, seq: list[int], t: int) -> int:
        best, best_len = None, 0
        for j in range(t - 1, -1, -1):  # the earlier position whose preceding tokens match the longest suffix
            n = 0
            while n < 12 and j - n >= 0 and seq[j - n] == seq[t - n]:
                n += 1
            if n > best_len:
                best, best_len = j, n
        if best is None:
            return 0
        nxt = seq[best + 1]
        if self.wrong_digit and nxt in self.digit_ids:
            return self.digit_ids[(self.digit_ids.index(nxt) + 1) % 10]
        return nxt

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                logits_to_keep: int = 0):
        history = (past_key_values or []) + [input_ids]
        seq = torch.cat(history, dim=1)
        start = seq.shape[1] - input_ids.shape[1]
        logits = torch.full((seq.shape[0], input_ids.shape[1], self.vocab), -1.0)
        for b in range(seq.shape[0]):
            row = seq[b].tolist()
            for t in range(start, seq.shape[1]):
                logits[b, t - start, self._predict(row, t)] = 1.0
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits, past_key_values=history if use_cache or past_key_values else None)


def test_exact_match_is_greedy_decoding(tok):
    samples = passkey_samples(tok, [120, 160], [0.0, 0.6, 1.0], repeats=1, seed=4)
    digits = [tok.encode(str(d))[0] for d in range(10)]
    for wrong in (False, True):
        oracle = InductionOracle(tok.vocab_size, wrong_digit=wrong)
        oracle.digit_ids = digits
        scored = passkey_correct(oracle, samples, batch_size=2)
        for sample, ok in zip(samples, scored.tolist()):
            out = qwen_edu.generate(oracle, torch.tensor([sample.prompt_ids]), max_new_tokens=3, eos_token_id=[])
            assert ok == (out[0, -3:].tolist() == sample.answer_ids)
        assert bool(scored.all()) if not wrong else not bool(scored.any())


def test_grid_and_heatmap(tok):
    import matplotlib

    matplotlib.use("Agg")
    oracle = InductionOracle(tok.vocab_size)
    grid = retrieval_grid(oracle, tok, [100, 140], [0.0, 1.0], repeats=2, seed=0)
    assert grid.accuracy.shape == (2, 2) and grid.overall() == 1.0
    assert "100" in grid.table() and "100%" in grid.table()
    ax = plot_retrieval_heatmap(grid, training_length=100, title="oracle")
    assert ax.get_title() == "oracle"
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        retrieval_grid(oracle, tok, [100], [0.5], repeats=0)


# --- the retrieval fine-tune and the shipped model ----------------------------------------------------


def test_retrieval_loss_adds_the_weighted_answer_loss():
    from qwen_edu.training.loss import causal_lm_loss
    from qwen_edu.training.retrieval_tuning import retrieval_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g)
    labels = torch.tensor([[1, 2, -100, 4, 5, 6], [3, 3, 3, 3, 3, -100]])
    answer = torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    loss, answer_loss = retrieval_loss(logits, labels, answer, answer_weight=3.0)
    # by hand: the logits at t predict labels[t + 1]; answer targets are (0, 4), (0, 5), (1, 3), (1, 4)
    logp = logits.log_softmax(-1)
    answer_terms = [-logp[0, 3, 5], -logp[0, 4, 6], -logp[1, 2, 3], -logp[1, 3, 3]]
    expected_answer = torch.stack(answer_terms).mean()
    torch.testing.assert_close(answer_loss, expected_answer)
    torch.testing.assert_close(loss, causal_lm_loss(logits, labels) + 3.0 * expected_answer)


def test_a_short_tune_lowers_the_loss_of_a_tiny_model(tok):
    from qwen_edu.models import Qwen2ForCausalLM, QwenConfig
    from qwen_edu.training.retrieval_tuning import RetrievalTuningConfig, tune_for_retrieval

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(QwenConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64))
    config = RetrievalTuningConfig(steps=12, batch_size=4, lr=3e-3, warmup_steps=2, max_length=64, min_length=40)
    history = tune_for_retrieval(model, tok, config, progress=False)
    assert len(history) == 12 and not model.training
    assert history[-1]["loss"] < history[0]["loss"]
    assert all(h["answer_loss"] > 0 for h in history)


def test_the_shipped_retrieval_model_answers_at_its_training_length(tok):
    import json

    from qwen_edu.training.retrieval_tuning import retrieval_model_path

    path = retrieval_model_path()
    log = json.loads((path / "retrieval_log.json").read_text())
    assert log["retrieval_overall"] >= 0.9 and log["base_retrieval_overall"] <= 0.05
    assert max(log["config"]["max_length"], *log["retrieval_lengths"]) <= 256, "trained and checked within T"
    model = qwen_edu.load_model(path, dtype=torch.float32)
    assert model.config.max_position_embeddings == 256
    samples = passkey_samples(tok, [256], [0.0, 0.5, 1.0], repeats=3, seed=99)
    assert passkey_correct(model, samples).float().mean() >= 0.8
