"""Chapter 11's experiments: domain-pure rows, the specialisation measures, the QK-norm run, the shipped log."""

from __future__ import annotations

import math

import pytest
import torch

from qwen_edu.training.data import IGNORE_INDEX
from qwen_edu.training.qwen3_experiments import (
    DOMAINS,
    BalanceConfig,
    QKNormConfig,
    balance_model,
    book_tokenizer,
    corpus_rows,
    domain_expert_information,
    domain_rows,
    load_runs,
    qk_norm_run,
    routing_by_domain,
)


@pytest.fixture(scope="module")
def tok():
    return book_tokenizer()


def test_domain_rows_are_full_and_pure(tok):
    rows = domain_rows(tok, rows=6, seq_len=32, seed=0)
    assert list(rows) == list(DOMAINS)
    for domain, packed in rows.items():
        assert packed.input_ids.shape == (6, 32) and not (packed.labels == IGNORE_INDEX).any()
        text = tok.decode(packed.input_ids[0].tolist())
        if domain == "code":
            assert "def " in text or "return" in text
        elif domain == "arithmetic":
            assert " = " in text and not any(c.isalpha() for c in text.replace("<|endoftext|>", ""))
        else:
            assert "def " not in text and any(c.isalpha() for c in text)


def test_domain_expert_information_from_zero_to_log2_3():
    uniform = torch.full((1, 3, 6), 1 / 6)
    assert domain_expert_information(uniform).item() == pytest.approx(0.0, abs=1e-6)
    own = torch.zeros(1, 3, 6)
    for d in range(3):  # each domain has two experts of its own
        own[0, d, 2 * d:2 * d + 2] = 0.5
    assert domain_expert_information(own).item() == pytest.approx(math.log2(3), rel=1e-6)
    half = 0.5 * uniform + 0.5 * own
    assert 0 < domain_expert_information(half).item() < math.log2(3)


def test_routing_by_domain_counts_every_assignment(tok):
    config = BalanceConfig(hidden_size=32, num_experts=4, moe_intermediate_size=16, head_dim=8)
    model = balance_model(config, vocab_size=1536)
    rows = domain_rows(tok, rows=2, seq_len=16, seed=1)
    shares, row_max = routing_by_domain(model, rows)
    assert shares.shape == (2, 3, 4)
    torch.testing.assert_close(shares.sum(-1), torch.ones(2, 3))
    assert (row_max >= 1).all() and (row_max <= 4).all()  # busiest over mean load, at most E


def test_qk_norm_run_logs_losses_and_attention_logits(tok):
    config = QKNormConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=16, steps=4,
                          batch_size=2, seq_len=32, log_every=2, n_docs=40)
    data = corpus_rows(tok, config.n_docs, config.seq_len)
    runs = {flag: qk_norm_run(flag, config, data=data, tokenizer=tok) for flag in (True, False)}
    for run in runs.values():
        assert len(run["losses"]) == 4 and run["logit_steps"] == [0, 2, 4]
        assert all(len(v) == 2 for v in run["max_logits"])
    # the same initial weights: without the norm the first logits are those of raw N(0, 0.02) projections
    assert max(runs[False]["max_logits"][0]) < 1 < max(runs[True]["max_logits"][0])


def test_the_shipped_runs_support_the_chapter():
    try:
        log = load_runs()
    except FileNotFoundError:
        pytest.skip("qwen_edu/assets/qwen3_runs not built")
    with_norm, without = log["qk_norm"]["True"], log["qk_norm"]["False"]
    assert max(with_norm["max_logits"][-1]) < 20 < 100 < max(without["max_logits"][-1])
    assert set(log["balance"]) == {"micro_batch", "global_batch", "global_batch_exact"}
    for run in log["balance"].values():
        assert len(run["losses"]) == log["balance_config"]["steps"]
        assert torch.tensor(run["shares"]).sum(-1).allclose(torch.ones(2, 3))
    # what the chapter states, in every seed: the more global the counts, the more the routing follows
    # the domain and the more lopsided single sequences may be
    modes = ("micro_batch", "global_batch", "global_batch_exact")
    for i, seed in enumerate(log["balance"]["micro_batch"]["seeds"]):
        runs = [log["balance"][mode]["seeds"][i] for mode in modes]
        assert all(r["seed"] == seed["seed"] for r in runs)
        info = [sum(r["information_bits"]) for r in runs]
        lopsided = [sum(r["row_max_load"]) for r in runs]
        assert info[0] < info[1] < info[2] and lopsided[0] < lopsided[1] < lopsided[2]
