"""How far a policy moved from its reference: the exact per-token KL and what evaluate_policy reports."""

from __future__ import annotations

import itertools
import math
import types

import pytest
import torch
from torch import nn

from qwen_edu.alignment import evaluate_policy, kl_penalty, make_prompts
from qwen_edu.alignment.core import kl_from_logits, reply_kl, sequence_logprobs
from qwen_edu.alignment.reward import RewardModel
from qwen_edu.alignment.toy import toy_model, toy_tokenizer

torch.set_num_threads(1)


class TableLM(nn.Module):
    """A toy autoregressive model over ``V`` tokens: the next-token logits are a table indexed by
    (position, previous token), so every sequence probability can be enumerated exactly."""

    def __init__(self, vocab: int, length: int, seed: int, scale: float = 1.5) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(scale * torch.randn(length, vocab, vocab, generator=g), requires_grad=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        positions = torch.arange(input_ids.shape[1]).clamp(max=self.table.shape[0] - 1)
        return types.SimpleNamespace(logits=self.table[positions, input_ids])

    def sequence_logprob(self, seq: list[int]) -> float:
        """``log p(seq[1:] | seq[0])`` by the chain rule, straight from the table."""
        logp = torch.log_softmax(self.table, -1)
        return sum(float(logp[t, seq[t], seq[t + 1]]) for t in range(len(seq) - 1))


V, T = 3, 4  # 3 tokens, one prompt token followed by a 3-token reply: 27 replies to enumerate
PROMPT = 0


def _rows(replies):
    ids = torch.tensor([[PROMPT, *r] for r in replies])
    response_mask = torch.ones_like(ids)
    response_mask[:, 0] = 0
    return ids, response_mask


def _exact_sequence_kl(pi: TableLM, ref: TableLM) -> float:
    """``sum_y pi(y) log(pi(y) / ref(y))`` over every reply: the definition, by enumeration."""
    total = 0.0
    for reply in itertools.product(range(V), repeat=T - 1):
        lp, lq = pi.sequence_logprob([PROMPT, *reply]), ref.sequence_logprob([PROMPT, *reply])
        total += math.exp(lp) * (lp - lq)
    return total


def test_kl_from_logits_is_the_definition():
    torch.manual_seed(0)
    logits, ref_logits = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    p, q = logits.softmax(-1), ref_logits.softmax(-1)
    torch.testing.assert_close(kl_from_logits(logits, ref_logits), (p * (p / q).log()).sum(-1))
    assert (kl_from_logits(logits, ref_logits) > 0).all()
    # The same distribution (logits shifted by a constant) has KL 0 up to fp32 rounding of log-softmax.
    torch.testing.assert_close(kl_from_logits(logits, logits + 3.0), torch.zeros(2, 5), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="differ in shape"):
        kl_from_logits(logits, ref_logits[..., :10])


def test_summed_per_token_kl_along_samples_is_the_sequence_kl():
    pi, ref = TableLM(V, T, seed=1), TableLM(V, T, seed=2)
    exact = _exact_sequence_kl(pi, ref)
    replies = list(itertools.product(range(V), repeat=T - 1))
    ids, response_mask = _rows(replies)
    per_reply = reply_kl(pi, ref, ids, None, response_mask)
    weights = torch.tensor([math.exp(pi.sequence_logprob([PROMPT, *r])) for r in replies])
    # The chain rule of KL: E_{y ~ pi}[sum_t KL_t(y_<t)] equals the sequence KL, exactly. Both sides
    # are sums of 27 fp32 terms of order 1, so they agree to a few ulp of the total (1e-5 is ample).
    assert float((weights * per_reply).sum()) == pytest.approx(exact, abs=1e-5)
    assert exact > 0.1  # the two tables differ enough for the comparisons below to mean something

    # A Monte Carlo estimate from replies sampled from pi lands within 4 standard errors of it.
    g = torch.Generator().manual_seed(0)
    draws = torch.multinomial(weights, 4000, replacement=True, generator=g)
    sample = per_reply[draws]
    assert abs(float(sample.mean()) - exact) < 4 * float(sample.std()) / math.sqrt(len(sample))

    # What the old evaluation did -- k1 summed along the greedy reply -- is not the KL.
    greedy, token = [], PROMPT
    for t in range(T - 1):
        token = int(pi.table[t, token].argmax())
        greedy.append(token)
    g_ids, g_mask = _rows([greedy])
    logp = sequence_logprobs(pi, g_ids, None, g_mask)
    ref_logp = sequence_logprobs(ref, g_ids, None, g_mask)
    greedy_k1 = float(kl_penalty(logp, ref_logp, "k1"))
    assert abs(greedy_k1 - exact) > 0.1 * exact


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer()


def test_evaluate_policy_reports_the_kl_of_sampled_replies(tok):
    reward = RewardModel.from_causal_lm(toy_model(5)).eval()
    prompts = make_prompts(6, seed=7)
    ref = toy_model(0)
    same = evaluate_policy(toy_model(0), reward, tok, prompts, ref_model=ref, max_new_tokens=6)
    # Identical weights: every per-token KL is 0 up to the rounding of two identical forward passes.
    assert same["kl"] == pytest.approx(0.0, abs=1e-5)
    moved = toy_model(1)
    first = evaluate_policy(moved, reward, tok, prompts, ref_model=ref, max_new_tokens=6)
    again = evaluate_policy(moved, reward, tok, prompts, ref_model=ref, max_new_tokens=6)
    assert first["kl"] > 0 and first["kl_stderr"] > 0
    assert first["kl"] == again["kl"]  # the sampled pass is seeded (kl_seed): a deterministic repeat
    other_seed = evaluate_policy(moved, reward, tok, prompts, ref_model=ref, max_new_tokens=6, kl_seed=1)
    assert other_seed["kl"] != first["kl"]  # ...and it really samples
    assert other_seed["reward"] == first["reward"]  # while the scored replies stay greedy
