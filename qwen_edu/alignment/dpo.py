"""Direct Preference Optimization (Rafailov et al., 2023): preferences without a reward model or RL.

DPO trains the policy directly on the comparison pairs. With ``pi_c = log pi(chosen | prompt)``
(summed over the reply tokens) and the same under a frozen reference, the loss is

    -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))

which is the Bradley-Terry loss of the *implicit reward* ``beta * (log pi - log pi_ref)``. The
reference log-probabilities never change, so :func:`reference_logprobs` computes them once, before
training. :func:`evaluate_dpo` reports how often the implicit reward prefers the chosen reply
(preference accuracy) and by how much (margin).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qwen_edu.alignment.core import check_same_architecture, frozen_copy, pad_id_of, sequence_logprobs
from qwen_edu.alignment.data import SYSTEM_PROMPT, collate_pairs, encode_pair
from qwen_edu.alignment.sft import progress_bar

__all__ = ["dpo_loss", "DPOConfig", "pair_logprobs", "reference_logprobs", "train_dpo", "evaluate_dpo"]


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO loss (mean over the batch) and the implicit rewards of chosen and rejected replies.

    ``label_smoothing = eps > 0`` is the conservative variant: ``(1 - eps)`` of the loss for the
    stated preference, ``eps`` for the opposite one (for noisy labels).
    """
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    logits = chosen_rewards - rejected_rewards
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses.mean(), chosen_rewards.detach(), rejected_rewards.detach()


@dataclass
class DPOConfig:
    steps: int = 100
    batch_size: int = 16
    lr: float = 2e-4
    beta: float = 0.1
    label_smoothing: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0


def pair_logprobs(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed reply log-probs of a :func:`collate_pairs` batch, split into ``(chosen, rejected)``."""
    device = next(model.parameters()).device
    logp = sequence_logprobs(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                             batch["response_mask"].to(device), reduce="sum")
    return logp.chunk(2)


@torch.no_grad()
def reference_logprobs(ref_model: nn.Module, encoded: Sequence[Mapping[str, list[int]]], pad_id: int,
                       batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ref_chosen [N], ref_rejected [N])`` for every encoded pair, computed once (the cache)."""
    ref_model.eval()
    chosen, rejected = [], []
    for start in range(0, len(encoded), batch_size):
        c, r = pair_logprobs(ref_model, collate_pairs(encoded[start:start + batch_size], pad_id))
        chosen.append(c.cpu())
        rejected.append(r.cpu())
    return torch.cat(chosen), torch.cat(rejected)


def train_dpo(policy: nn.Module, tokenizer: Any, pairs: Sequence[Mapping[str, Any]],
              config: DPOConfig | None = None, *, ref_model: nn.Module | None = None,
              on_step: Callable[[dict[str, float]], None] | None = None, progress: bool = True,
              system_prompt: str | None = SYSTEM_PROMPT) -> list[dict[str, float]]:
    """Train ``policy`` in place with DPO; the reference defaults to a frozen copy of its start.

    Returns per-step ``loss``, ``accuracy`` (implicit reward of chosen > rejected), ``margin`` and
    the mean implicit rewards ``reward_chosen`` / ``reward_rejected``.
    """
    config = config or DPOConfig()
    if ref_model is None:
        ref_model = frozen_copy(policy)
    else:
        check_same_architecture(policy, ref_model, "reference model")
    encoded = [encode_pair(tokenizer, p, system_prompt=system_prompt) for p in pairs]
    if not encoded:
        raise ValueError("no comparison pairs to train on")
    pad = pad_id_of(tokenizer)
    ref_c, ref_r = reference_logprobs(ref_model, encoded, pad)
    device = next(policy.parameters()).device
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=0.0)
    rng = random.Random(config.seed)
    order: list[int] = []
    history = []
    bar = progress_bar(config.steps, "DPO", progress)
    policy.train()
    for step in range(config.steps):
        if len(order) < config.batch_size:
            more = list(range(len(encoded)))
            rng.shuffle(more)
            order += more
        rows, order = order[:config.batch_size], order[config.batch_size:]
        pi_c, pi_r = pair_logprobs(policy, collate_pairs([encoded[i] for i in rows], pad))
        idx = torch.tensor(rows)
        loss, r_c, r_r = dpo_loss(pi_c, pi_r, ref_c[idx].to(device), ref_r[idx].to(device), config.beta,
                                  config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
        optimizer.step()
        record = {"step": step, "loss": float(loss.detach()), "accuracy": float((r_c > r_r).float().mean()),
                  "margin": float((r_c - r_r).mean()), "reward_chosen": float(r_c.mean()),
                  "reward_rejected": float(r_r.mean())}
        history.append(record)
        if on_step is not None:
            on_step(record)
        bar.update()
        bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.2f}")
    bar.close()
    policy.eval()
    return history


@torch.no_grad()
def evaluate_dpo(policy: nn.Module, ref_model: nn.Module, tokenizer: Any, pairs: Sequence[Mapping[str, Any]], *,
                 beta: float = 0.1, system_prompt: str | None = SYSTEM_PROMPT) -> dict[str, Any]:
    """Held-out implicit-reward accuracy and margin, and the plain log-prob preference accuracy
    (``log pi(chosen) > log pi(rejected)``) of the policy."""
    check_same_architecture(policy, ref_model, "reference model")
    encoded = [encode_pair(tokenizer, p, system_prompt=system_prompt) for p in pairs]
    pad = pad_id_of(tokenizer)
    pi_c, pi_r = reference_logprobs(policy, encoded, pad)
    ref_c, ref_r = reference_logprobs(ref_model, encoded, pad)
    loss, r_c, r_r = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta)
    out: dict[str, Any] = {"loss": float(loss), "reward_accuracy": float((r_c > r_r).float().mean()),
                           "margin": float((r_c - r_r).mean()),
                           "logprob_accuracy": float((pi_c > pi_r).float().mean())}
    kinds = [p.get("kind", "all") for p in pairs]
    for kind in sorted(set(kinds)):
        sel = torch.tensor([k == kind for k in kinds])
        out[f"reward_accuracy_{kind}"] = float((r_c[sel] > r_r[sel]).float().mean())
    return out
