"""Alignment building blocks: SFT labels, padding, log-probs, KL estimators, GAE, PPO/DPO/BT losses, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_edu.alignment import (
    IGNORE_INDEX,
    PPOConfig,
    PPOTrainer,
    RewardModel,
    bradley_terry_loss,
    check_answer,
    collate_pairs,
    collect_rollout,
    dpo_loss,
    encode_pair,
    encode_sft,
    entropy_from_logits,
    gae,
    generate_responses,
    kl_penalty,
    last_token_index,
    make_comparisons,
    make_conversations,
    masked_whiten,
    pad_batch,
    ppo_policy_loss,
    ppo_step,
    ppo_value_loss,
    sequence_logprobs,
    sft_labels,
    shaped_rewards,
    token_logprobs,
    train_dpo,
    validate_conversation,
    validate_pair,
)
from qwen_edu.alignment.core import frozen_copy, pad_id_of
from qwen_edu.alignment.data import encode_prompt, im_end_id, parse_number
from qwen_edu.alignment.toy import toy_model, toy_tokenizer
from qwen_edu.training.loss import causal_lm_loss

torch.set_num_threads(1)

MULTI_TURN = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hello! How can I help you today?"},
    {"role": "user", "content": "What is 3 + 4?"},
    {"role": "assistant", "content": "3 + 4 = 7."},
]


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer()


@pytest.fixture(scope="module")
def model():
    return toy_model(0)


# --- data and SFT labels -------------------------------------------------------------------------------

def test_generators_are_seeded_and_well_formed():
    a, b = make_conversations(50, seed=3), make_conversations(50, seed=3)
    assert a == b and a != make_conversations(50, seed=4)
    for c in a:
        validate_conversation(c["messages"])
        assert c["messages"][-1]["content"] == c["answer"]
        assert check_answer(c["kind"], c["answer"], c["answer"]) == {"format": True, "correct": True}
    pairs = make_comparisons(200, seed=1)
    assert pairs == make_comparisons(200, seed=1)
    assert {p["kind"] for p in pairs} == {"math", "qa", "chat"}
    for p in pairs:
        validate_pair(p)
        if p["kind"] == "math":
            left, right = p["prompt"][-1]["content"], p["chosen"]
            assert parse_number(right) != parse_number(p["rejected"])
            a, op, b = right.split(" ")[:3]
            assert parse_number(right) == (int(a) + int(b) if op == "+" else int(a) - int(b))
            assert f"{a} {op} {b}" in left


def test_sft_labels_are_ignore_index_exactly_outside_assistant_spans(tok):
    enc = tok.apply_chat_template(MULTI_TURN)
    labels = sft_labels(enc)
    assert len(labels) == len(enc.ids)
    kept = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert all(labels[i] == enc.ids[i] for i in kept)
    assert all(label == IGNORE_INDEX for label, m in zip(labels, enc.loss_mask) if not m)
    # The kept tokens are exactly the two replies, each followed by its <|im_end|>.
    im_end = im_end_id(tok)
    spans, current = [], []
    for i in range(len(labels)):
        if labels[i] != IGNORE_INDEX:
            current.append(enc.ids[i])
        elif current:
            spans.append(current)
            current = []
    assert len(spans) == 2
    assert [s[-1] for s in spans] == [im_end, im_end]
    assert [tok.decode(s[:-1]) for s in spans] == [MULTI_TURN[2]["content"], MULTI_TURN[4]["content"]]
    # The text before each span ends with the assistant header: no header token is a target.
    first = kept[0]
    assert tok.decode(enc.ids[:first]).endswith("<|im_start|>assistant\n")


def test_changing_user_tokens_leaves_the_sft_targets_alone(tok):
    item = encode_sft(tok, MULTI_TURN)
    other = [dict(m) for m in MULTI_TURN]
    other[3]["content"] = "What is 5 + 2?"  # same shape, other user tokens
    item2 = encode_sft(tok, other)
    assert len(item["input_ids"]) == len(item2["input_ids"])
    assert item["input_ids"] != item2["input_ids"]
    assert item["labels"] == item2["labels"]  # same target set and values
    # Gradient of the loss w.r.t. the logits is zero at every position whose target is not assistant.
    ids = torch.tensor([item["input_ids"]])
    labels = torch.tensor([item["labels"]])
    logits = torch.randn(1, ids.shape[1], tok.vocab_size, requires_grad=True)
    causal_lm_loss(logits, labels).backward()
    has_grad = logits.grad[0].abs().sum(-1) > 0
    target_is_assistant = torch.cat([labels[0, 1:] != IGNORE_INDEX, torch.tensor([False])])
    assert torch.equal(has_grad, target_is_assistant)


def test_pad_batch_right_and_left():
    seqs, labs = [[1, 2, 3], [4]], [[-100, 2, 3], [4]]
    right = pad_batch(seqs, 0, side="right", labels=labs)
    assert right["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    left = pad_batch(seqs, 0, side="left")
    assert left["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="side"):
        pad_batch(seqs, 0, side="middle")


def test_encode_pair_marks_reply_and_im_end(tok):
    pair = make_comparisons(1, seed=5)[0]
    enc = encode_pair(tok, pair)
    prompt = encode_prompt(tok, pair["prompt"])
    for key in ("chosen", "rejected"):
        ids, mask = enc[f"{key}_ids"], enc[f"{key}_response_mask"]
        assert ids[: len(prompt)] == prompt and not any(mask[: len(prompt)])
        assert all(mask[len(prompt):]) and ids[-1] == im_end_id(tok)
        assert tok.decode(ids[len(prompt):-1]) == pair[key]


# --- log-probabilities ---------------------------------------------------------------------------------

def test_token_logprobs_and_entropy_match_definitions():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    tokens = torch.randint(0, 11, (3, 5))
    p = logits.softmax(-1)
    expected = torch.log(p.gather(-1, tokens[..., None]).squeeze(-1))
    torch.testing.assert_close(token_logprobs(logits, tokens), expected)
    torch.testing.assert_close(entropy_from_logits(logits), -(p * p.log()).sum(-1))


def test_sequence_logprobs_ignore_padding_on_both_sides(tok, model):
    pair = make_comparisons(3, seed=7)
    encoded = [encode_pair(tok, p) for p in pair]
    batch = collate_pairs(encoded, pad_id_of(tok))  # right padded
    batched = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    alone = []
    for e in encoded:
        for key in ("chosen", "rejected"):
            ids = torch.tensor([e[f"{key}_ids"]])
            with torch.no_grad():
                logits = model(ids).logits[0, :-1]
            lp = token_logprobs(logits, ids[0, 1:])
            alone.append((key, float((lp * torch.tensor(e[f"{key}_response_mask"][1:])).sum())))
    expected = [v for k, v in alone if k == "chosen"] + [v for k, v in alone if k == "rejected"]
    torch.testing.assert_close(batched, torch.tensor(expected), atol=1e-4, rtol=1e-4)
    # Left padding too (positions count real tokens only).
    seqs = [e["chosen_ids"] for e in encoded]
    left = pad_batch(seqs, pad_id_of(tok), side="left")
    resp = torch.zeros_like(left["input_ids"])
    for i, e in enumerate(encoded):
        m = e["chosen_response_mask"]
        resp[i, -len(m):] = torch.tensor(m)
    got = sequence_logprobs(model, left["input_ids"], left["attention_mask"], resp)
    torch.testing.assert_close(got, torch.tensor(expected[:3]), atol=1e-4, rtol=1e-4)


def test_generate_responses_masks_after_the_stop_token(tok, model):
    prompts = [encode_prompt(tok, p["prompt"]) for p in make_comparisons(4, seed=1)]
    stop = im_end_id(tok)
    gen = torch.Generator().manual_seed(0)
    out = generate_responses(model, prompts, pad_id=pad_id_of(tok), stop_id=stop, max_new_tokens=12,
                             do_sample=True, generator=gen)
    again = generate_responses(model, prompts, pad_id=pad_id_of(tok), stop_id=stop, max_new_tokens=12,
                               do_sample=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.input_ids, again.input_ids)  # seeded sampling is reproducible
    resp, mask = out.response_ids, out.response_mask[:, out.prompt_length:]
    assert not out.response_mask[:, : out.prompt_length].any()
    for row in range(len(prompts)):
        ids, m = resp[row].tolist(), mask[row].tolist()
        n = sum(m)
        assert m == [1] * n + [0] * (len(m) - n)  # a prefix
        if out.finished[row]:
            assert ids[n - 1] == stop and stop not in ids[: n - 1]
        else:
            assert stop not in ids and n == len(ids)


# --- KL estimators -------------------------------------------------------------------------------------

def test_kl_estimators_match_their_formulas():
    logp = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    ref = torch.tensor([-1.5, -1.0, -0.5, -0.1])
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), logp - ref)
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), 0.5 * (logp - ref) ** 2)
    r = torch.exp(ref - logp)
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), r - 1 - torch.log(r))
    torch.testing.assert_close(kl_penalty(logp, ref, "abs"), (logp - ref).abs())
    assert kl_penalty(logp, logp, "k3").abs().max() == 0
    with pytest.raises(ValueError, match="unknown KL estimator 'k9'"):
        kl_penalty(logp, ref, "k9")


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-20, 0), min_size=1, max_size=8), st.lists(st.floats(-20, 0), min_size=1, max_size=8))
def test_k3_is_never_negative(a, b):
    n = min(len(a), len(b))
    assert (kl_penalty(torch.tensor(a[:n]), torch.tensor(b[:n]), "k3") >= 0).all()


def test_k1_and_k3_are_unbiased_estimates_of_the_kl():
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    true_kl = float((p * (p / q).log()).sum())
    samples = torch.multinomial(p, 200_000, replacement=True)
    logp, logq = p.log()[samples], q.log()[samples]
    for kind in ("k1", "k3"):
        assert float(kl_penalty(logp, logq, kind).mean()) == pytest.approx(true_kl, abs=3e-3)


# --- GAE and reward shaping ----------------------------------------------------------------------------

def test_gae_against_a_hand_computed_example():
    # Row 0: three reply tokens. gamma = 0.9, lam = 0.8, so gamma * lam = 0.72.
    #   t=2: delta = 1 + 0.9*0   - 0.7 = 0.30           A2 = 0.30
    #   t=1: delta = 0 + 0.9*0.7 - 0.6 = 0.03           A1 = 0.03 + 0.72*0.30  = 0.246
    #   t=0: delta = 0 + 0.9*0.6 - 0.5 = 0.04           A0 = 0.04 + 0.72*0.246 = 0.21712
    # Row 1: two reply tokens and one padding slot (its reward 9 and value 5 must be ignored).
    #   t=1: delta = 2   + 0.9*0 - 1 = 1.0              A1 = 1.0
    #   t=0: delta = 0.5 + 0.9*1 - 1 = 0.4              A0 = 0.4 + 0.72*1.0 = 1.12
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 9.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.21712, 0.246, 0.30], [1.12, 1.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.71712, 0.846, 1.0], [2.12, 2.0, 0.0]]))


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value():
    torch.manual_seed(1)
    rewards, values = torch.randn(2, 6), torch.randn(2, 6)
    mask = torch.ones(2, 6)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = rewards.flip(-1).cumsum(-1).flip(-1)
    torch.testing.assert_close(adv, to_go - values)
    torch.testing.assert_close(ret, to_go)
    # lam = 0: one-step TD errors.
    adv0, _ = gae(rewards, values, mask, gamma=0.5, lam=0.0)
    next_v = torch.cat([values[:, 1:], torch.zeros(2, 1)], dim=1)
    torch.testing.assert_close(adv0, rewards + 0.5 * next_v - values)


def test_shaped_rewards_put_the_score_on_the_last_reply_token():
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    ref = torch.tensor([[-1.5, -0.5, -1.0], [-2.0, -3.0, -7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards, kl = shaped_rewards(torch.tensor([3.0, -1.0]), logp, ref, mask, kl_coef=0.1, kind="k1")
    torch.testing.assert_close(kl, torch.tensor([[0.5, -0.5, 0.0], [0.0, 1.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.05, 3.0], [0.0, -0.1 - 1.0, 0.0]]))


def test_masked_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    w = masked_whiten(x, mask)
    real = w[mask.bool()]
    assert float(real.mean()) == pytest.approx(0, abs=1e-6)
    assert float(real.std()) == pytest.approx(1, abs=1e-5)
    assert (w[~mask.bool()] == 0).all()


# --- PPO losses and one update ------------------------------------------------------------------------

def test_ppo_policy_loss_by_hand():
    # ratios e^0.5 = 1.6487 (clipped to 1.2 for A > 0) and e^-0.5 = 0.6065 (clipped to 0.8 for A < 0).
    old = torch.zeros(1, 4)
    new = torch.tensor([[0.5, 0.5, -0.5, -0.5]])
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, stats = ppo_policy_loss(new, old, adv, torch.ones(1, 4), clip_range=0.2)
    r_hi, r_lo = math.exp(0.5), math.exp(-0.5)
    objective = [min(r_hi, 1.2) * 1, -r_hi, r_lo, -max(r_lo, 0.8)]
    assert float(loss) == pytest.approx(-sum(objective) / 4, rel=1e-6)
    assert stats["clipfrac"] == pytest.approx(0.5)  # tokens 0 and 3 are clipped
    assert stats["approx_kl"] == pytest.approx(((r_hi - 1 - 0.5) * 2 + (r_lo - 1 + 0.5) * 2) / 4, rel=1e-5)


def test_ppo_value_loss_by_hand():
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[1.0, 0.1]])
    ret = torch.tensor([[2.0, -1.0]])
    loss, stats = ppo_value_loss(new, old, ret, torch.ones(1, 2), clip_range_value=0.2)
    # token 0: unclipped (1-2)^2 = 1, clipped (0.2-2)^2 = 3.24 -> 3.24; token 1: (0.1+1)^2 = 1.21 both.
    assert float(loss) == pytest.approx(0.5 * (3.24 + 1.21) / 2)
    assert stats["value_clipfrac"] == pytest.approx(0.5)


def _ppo_setup(tok, seed=0):
    policy = toy_model(seed)
    for p in policy.parameters():
        p.requires_grad_(True)
    reward_model = RewardModel.from_causal_lm(toy_model(seed + 1))
    config = PPOConfig(batch_size=8, mini_batch_size=8, ppo_epochs=1, lr=1e-3, max_new_tokens=8,
                       kl_coef=0.1, kl_estimator="k3")
    trainer = PPOTrainer(policy, reward_model, tok, config)
    return trainer


def test_one_ppo_update_improves_the_surrogate_on_a_fixed_batch(tok):
    trainer = _ppo_setup(tok)
    prompts = trainer.encode(make_comparisons(8, seed=3))
    gen = torch.Generator().manual_seed(0)
    rollout = collect_rollout(trainer.policy, trainer.ref_model, trainer.reward_model, trainer.value_model,
                              prompts, trainer.config, pad_id=trainer.pad_id, stop_id=trainer.stop_id, generator=gen)
    assert rollout.logprobs.shape == rollout.mask.shape == rollout.values.shape
    # Before any update the policy *is* the reference and the sampler: KL 0, ratio 1.
    torch.testing.assert_close(rollout.kl, torch.zeros_like(rollout.kl))
    from qwen_edu.alignment.ppo import policy_outputs

    def surrogate() -> float:
        with torch.no_grad():
            logp, _ = policy_outputs(trainer.policy, rollout)
            return float(-ppo_policy_loss(logp, rollout.logprobs, rollout.advantages, rollout.mask, 0.2)[0])

    start = surrogate()
    assert start == pytest.approx(float((rollout.advantages * rollout.mask).sum() / rollout.mask.sum()), abs=1e-5)
    stats = ppo_step(trainer.policy, trainer.value_model, trainer.optimizer, rollout, trainer.config,
                     generator=torch.Generator().manual_seed(0))
    assert surrogate() > start + 1e-3
    assert set(stats) >= {"policy_loss", "value_loss", "entropy", "clipfrac", "approx_kl"}
    # The reference did not move.
    for p, q in zip(trainer.ref_model.parameters(), toy_model(0).parameters()):
        assert torch.equal(p, q)


def test_ppo_trainer_step_logs_reward_and_kl(tok):
    trainer = _ppo_setup(tok, seed=2)
    record = trainer.step(make_comparisons(8, seed=4))
    assert set(record) >= {"reward", "kl", "clipfrac", "value_loss", "entropy", "reply_length"}
    record2 = trainer.step(make_comparisons(8, seed=4))
    assert record2["kl"] != 0.0  # the policy moved away from the reference


# --- reward model ------------------------------------------------------------------------------------

def test_bradley_terry_loss_formula():
    rc, rr = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.5, -1.0])
    loss, stats = bradley_terry_loss(rc, rr)
    expected = sum(-math.log(1 / (1 + math.exp(-d))) for d in (1.0, -0.5, 0.0)) / 3
    assert float(loss) == pytest.approx(expected)
    assert stats["accuracy"] == pytest.approx(1 / 3)
    assert stats["margin"] == pytest.approx(0.5 / 3)


def test_last_token_index_and_reward_pooling_with_padding(tok):
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]
    rm = RewardModel.from_causal_lm(toy_model(3)).eval()
    seqs = [encode_pair(tok, p)["chosen_ids"] for p in make_comparisons(3, seed=8)]
    alone = torch.stack([rm(torch.tensor([s]))[0] for s in seqs])
    with torch.no_grad():
        for side in ("right", "left"):
            b = pad_batch(seqs, pad_id_of(tok), side=side)
            torch.testing.assert_close(rm(b["input_ids"], b["attention_mask"]), alone.detach(), atol=1e-5, rtol=1e-5)
    # The score is read from the last real token: changing padding ids changes nothing.
    b = pad_batch(seqs, pad_id_of(tok), side="right")
    ids2 = b["input_ids"].masked_fill(b["attention_mask"] == 0, 5)
    with torch.no_grad():
        torch.testing.assert_close(rm(ids2, b["attention_mask"]), rm(b["input_ids"], b["attention_mask"]))


# --- DPO --------------------------------------------------------------------------------------------------

def test_dpo_loss_formula():
    pc, pr = torch.tensor([-5.0, -3.0]), torch.tensor([-6.0, -2.0])
    rc, rr = torch.tensor([-5.5, -3.0]), torch.tensor([-5.5, -3.0])
    beta = 0.5
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta)
    # row 0: 0.5 * ((-5 + 5.5) - (-6 + 5.5)) = 0.5;  row 1: 0.5 * (0 - 1) = -0.5
    expected = (-math.log(1 / (1 + math.exp(-0.5))) - math.log(1 / (1 + math.exp(0.5)))) / 2
    assert float(loss) == pytest.approx(expected)
    torch.testing.assert_close(chosen, torch.tensor([0.25, 0.0]))
    torch.testing.assert_close(rejected, torch.tensor([-0.25, 0.5]))
    smoothed, _, _ = dpo_loss(pc, pr, rc, rr, beta, label_smoothing=0.1)
    logits = torch.tensor([0.5, -0.5])
    assert float(smoothed) == pytest.approx(float((-0.9 * F.logsigmoid(logits) - 0.1 * F.logsigmoid(-logits)).mean()))
    # Policy equal to the reference: loss log 2 whatever the data.
    assert float(dpo_loss(pc, pr, pc, pr)[0]) == pytest.approx(math.log(2))


# --- bad input --------------------------------------------------------------------------------------

def test_unknown_role_is_rejected(tok):
    with pytest.raises(ValueError, match="unknown role 'robot'"):
        encode_sft(tok, [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}])


@pytest.mark.parametrize("content", ["", "   \n"])
def test_empty_assistant_turn_is_rejected(tok, content):
    with pytest.raises(ValueError, match="message 2 is an empty assistant turn"):
        encode_sft(tok, [*MULTI_TURN[:2], {"role": "assistant", "content": content}])


def test_conversation_without_assistant_is_rejected(tok):
    with pytest.raises(ValueError, match="no assistant turn"):
        encode_sft(tok, MULTI_TURN[:2])


def test_identical_chosen_and_rejected_is_rejected(tok):
    pair = {"prompt": [{"role": "user", "content": "What is 1 + 1?"}], "chosen": "1 + 1 = 2.", "rejected": "1 + 1 = 2."}
    with pytest.raises(ValueError, match="identical chosen and rejected"):
        validate_pair(pair)
    with pytest.raises(ValueError, match="identical chosen and rejected"):
        encode_pair(tok, pair)
    with pytest.raises(ValueError, match="missing 'rejected'"):
        validate_pair({"prompt": pair["prompt"], "chosen": "x"})


def test_reference_model_of_another_shape_is_rejected(tok):
    policy = toy_model(0)
    other_vocab = toy_model(0, vocab_size=tok.vocab_size + 8)
    other_width = toy_model(0, hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    rm = RewardModel.from_causal_lm(toy_model(1))
    for ref, field in ((other_vocab, "vocab_size"), (other_width, "hidden_size")):
        with pytest.raises(ValueError, match=f"reference model has another shape.*{field}"):
            PPOTrainer(policy, rm, tok, PPOConfig(batch_size=8, mini_batch_size=8), ref_model=ref)
        with pytest.raises(ValueError, match=f"reference model has another shape.*{field}"):
            train_dpo(policy, tok, make_comparisons(4, seed=0), ref_model=ref, progress=False)
    PPOTrainer(policy, rm, tok, PPOConfig(batch_size=8, mini_batch_size=8), ref_model=frozen_copy(policy))


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="multiple of mini_batch_size"):
        PPOConfig(batch_size=10, mini_batch_size=4)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        PPOConfig(kl_estimator="kl")


def test_sft_dataset_padded_and_packed_rows_keep_only_assistant_labels(tok):
    from qwen_edu.alignment.sft import sft_dataset

    convs = make_conversations(12, seed=2)
    encoded = [encode_sft(tok, c["messages"]) for c in convs]
    padded = sft_dataset(tok, convs).packed
    assert padded.input_ids.shape == (12, max(len(e["input_ids"]) for e in encoded))
    for row, e in enumerate(encoded):
        n = len(e["labels"])
        assert padded.labels[row, :n].tolist() == e["labels"]
        assert (padded.labels[row, n:] == IGNORE_INDEX).all()
    packed = sft_dataset(tok, convs, packing=True, max_length=64).packed
    assert packed.input_ids.shape[1] == 64
    stream = [t for e in encoded for t in e["labels"]]
    flat = packed.labels.flatten().tolist()
    assert flat[: len(stream)] == stream and set(flat[len(stream):]) <= {IGNORE_INDEX}
