"""Online preference optimisation: DPO on pairs the policy samples and a reward model ranks.

Qwen2's post-training (Yang et al., 2024) has two preference stages. The *offline* stage is DPO on a
fixed dataset of preference pairs (chapter 6, :mod:`qwen_edu.alignment.dpo`). In the *online* stage
the model is refined in real time with a reward model's feedback: several replies are sampled from
the current policy for each prompt, the reward model picks the most and the least preferred, and the
two form a DPO pair. One iteration here:

1. **Sample** ``samples_per_prompt`` replies per prompt from the current policy (temperature sampling,
   the cached decoder).
2. **Score** every ``prompt + reply`` with the reward model.
3. **Pair** the best and the worst reply of each prompt (skipped when their scores differ by less than
   ``min_reward_gap``: a tie carries no preference).
4. **DPO** on those pairs against the frozen reference (the starting policy), whose log-probabilities
   are computed once per iteration.

Because the pairs come from the policy itself, the data follows the policy as it changes, which an
offline dataset cannot. The Qwen2 report also merges models during this stage (the *Online Merging
Optimizer*) to limit the alignment tax; that part is not reproduced here.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qwen_edu.alignment.core import (
    Responses,
    check_same_architecture,
    frozen_copy,
    generate_responses,
    pad_id_of,
    sequence_logprobs,
)
from qwen_edu.alignment.data import SYSTEM_PROMPT, encode_prompt, im_end_id
from qwen_edu.alignment.dpo import dpo_loss
from qwen_edu.alignment.sft import progress_bar

__all__ = ["OnlineDPOConfig", "PreferenceBatch", "sample_and_score", "best_worst_pairs", "online_dpo_step",
           "train_online_dpo"]


@dataclass
class OnlineDPOConfig:
    """Sizes of the online loop (the book's choices for a CPU; Qwen's are far larger)."""

    iterations: int = 6
    prompts_per_iteration: int = 16
    samples_per_prompt: int = 4
    max_new_tokens: int = 24
    temperature: float = 1.0
    beta: float = 0.2
    lr: float = 3e-5
    epochs: int = 2  # passes over each iteration's pairs
    batch_size: int = 16
    min_reward_gap: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0


@dataclass
class PreferenceBatch:
    """Pairs built from one batch of samples, in the sampled token ids (no re-tokenisation).

    ``input_ids``, ``attention_mask`` and ``response_mask`` are ``[2n, L]``: rows ``0..n-1`` are the
    chosen replies, rows ``n..2n-1`` the rejected ones (the layout of :func:`~qwen_edu.alignment.data.collate_pairs`).
    ``chosen_reward`` and ``rejected_reward`` are the reward model's scores ``[n]``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    chosen_reward: torch.Tensor
    rejected_reward: torch.Tensor

    def __len__(self) -> int:
        return int(self.chosen_reward.shape[0])

    def select(self, rows: Sequence[int]) -> PreferenceBatch:
        """The pairs at ``rows`` (indices into ``0..n-1``), still chosen-then-rejected."""
        n = len(self)
        index = torch.tensor(list(rows))
        both = torch.cat([index, index + n])
        return PreferenceBatch(self.input_ids[both], self.attention_mask[both], self.response_mask[both],
                               self.chosen_reward[index], self.rejected_reward[index])


@torch.no_grad()
def sample_and_score(policy: nn.Module, reward_model: nn.Module, tokenizer: Any,
                     prompts: Sequence[Mapping[str, Any]], samples_per_prompt: int, *, max_new_tokens: int = 24,
                     temperature: float = 1.0, generator: torch.Generator | None = None,
                     system_prompt: str | None = SYSTEM_PROMPT) -> tuple[Responses, torch.Tensor]:
    """``samples_per_prompt`` sampled replies per prompt and their reward-model scores.

    Returns the :class:`~qwen_edu.alignment.core.Responses` (row ``p * k + j`` is sample ``j`` of
    prompt ``p``) and the scores ``[len(prompts) * k]``. All rows share one left-padded layout.
    """
    if samples_per_prompt < 2:
        raise ValueError(f"samples_per_prompt must be >= 2 to form a pair, got {samples_per_prompt}")
    encoded = [encode_prompt(tokenizer, p["prompt"], system_prompt) for p in prompts]
    repeated = [ids for ids in encoded for _ in range(samples_per_prompt)]
    responses = generate_responses(policy, repeated, pad_id=pad_id_of(tokenizer), stop_id=im_end_id(tokenizer),
                                   max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                                   generator=generator)
    scores = reward_model(responses.input_ids, responses.attention_mask).float().cpu()
    if not bool(torch.isfinite(scores).all()):
        raise FloatingPointError("the reward model returned a non-finite score")
    return responses, scores


def best_worst_pairs(responses: Responses, scores: torch.Tensor, samples_per_prompt: int,
                     min_reward_gap: float = 0.0) -> PreferenceBatch | None:
    """For each prompt, the highest-scored sample (chosen) against the lowest-scored one (rejected).

    Prompts whose best and worst scores differ by ``min_reward_gap`` or less give no pair; ``None``
    when no prompt does.
    """
    k = samples_per_prompt
    if scores.shape[0] % k:
        raise ValueError(f"{scores.shape[0]} scores do not split into groups of {k} samples")
    grouped = scores.view(-1, k)
    best, worst = grouped.argmax(-1), grouped.argmin(-1)
    gap = grouped.max(-1).values - grouped.min(-1).values
    keep = (gap > min_reward_gap).nonzero().flatten()
    if keep.numel() == 0:
        return None
    base = keep * k
    chosen, rejected = base + best[keep], base + worst[keep]
    rows = torch.cat([chosen, rejected]).to(responses.input_ids.device)
    return PreferenceBatch(responses.input_ids[rows], responses.attention_mask[rows], responses.response_mask[rows],
                           scores[chosen], scores[rejected])


def _logprobs(model: nn.Module, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    logp = sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_mask, reduce="sum")
    assert isinstance(logp, torch.Tensor)
    return logp.chunk(2)


def online_dpo_step(policy: nn.Module, optimizer: torch.optim.Optimizer, batch: PreferenceBatch,
                    ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float,
                    max_grad_norm: float = 1.0) -> dict[str, float]:
    """One DPO update on a batch of sampled pairs (the same loss as offline DPO, on fresh data)."""
    policy.train()
    pi_c, pi_r = _logprobs(policy, batch)
    loss, r_c, r_r = dpo_loss(pi_c, pi_r, ref_chosen.to(pi_c.device), ref_rejected.to(pi_r.device), beta)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
    optimizer.step()
    return {"loss": float(loss.detach()), "accuracy": float((r_c > r_r).float().mean()),
            "margin": float((r_c - r_r).mean())}


def train_online_dpo(policy: nn.Module, reward_model: nn.Module, tokenizer: Any, prompts: Sequence[Mapping[str, Any]],
                     config: OnlineDPOConfig | None = None, *, ref_model: nn.Module | None = None,
                     on_iteration: Callable[[dict[str, float]], None] | None = None, progress: bool = True,
                     system_prompt: str | None = SYSTEM_PROMPT) -> list[dict[str, float]]:
    """Train ``policy`` in place with online DPO; the reference defaults to a frozen copy of its start.

    Each iteration draws ``prompts_per_iteration`` prompts (seeded), samples, scores, pairs and runs
    ``epochs`` passes of DPO over the pairs. Returns one record per iteration: the mean reward of the
    *samples* (the policy's current behaviour, before that iteration's update), the reward gap of the
    pairs, how many pairs were kept, and the last DPO loss and implicit-reward accuracy.
    """
    config = config or OnlineDPOConfig()
    if not prompts:
        raise ValueError("no prompts to sample from")
    if ref_model is None:
        ref_model = frozen_copy(policy)
    else:
        check_same_architecture(policy, ref_model, "reference model")
    for p in reward_model.parameters():
        p.requires_grad_(False)
    reward_model.eval()
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=0.0)
    rng = random.Random(config.seed)
    generator = torch.Generator(device=next(policy.parameters()).device).manual_seed(config.seed)
    history: list[dict[str, float]] = []
    bar = progress_bar(config.iterations, "online DPO", progress)
    for iteration in range(config.iterations):
        chosen_prompts = rng.sample(list(prompts), min(config.prompts_per_iteration, len(prompts)))
        policy.eval()
        responses, scores = sample_and_score(policy, reward_model, tokenizer, chosen_prompts, config.samples_per_prompt,
                                             max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                             generator=generator, system_prompt=system_prompt)
        pairs = best_worst_pairs(responses, scores, config.samples_per_prompt, config.min_reward_gap)
        record = {"iteration": iteration, "sample_reward": float(scores.mean()), "pairs": 0.0,
                  "reward_gap": 0.0, "loss": float("nan"), "accuracy": float("nan")}
        if pairs is not None:
            with torch.no_grad():
                ref_c, ref_r = _logprobs(ref_model, pairs)
            order = list(range(len(pairs)))
            for _ in range(config.epochs):
                rng.shuffle(order)
                for start in range(0, len(order), config.batch_size):
                    rows = order[start:start + config.batch_size]
                    index = torch.tensor(rows)
                    stats = online_dpo_step(policy, optimizer, pairs.select(rows), ref_c[index], ref_r[index],
                                            config.beta, config.max_grad_norm)
            record.update(pairs=float(len(pairs)), reward_gap=float((pairs.chosen_reward - pairs.rejected_reward).mean()),
                          loss=stats["loss"], accuracy=stats["accuracy"])
        history.append(record)
        if on_iteration is not None:
            on_iteration(record)
        bar.update()
        bar.set_postfix(reward=f"{record['sample_reward']:.2f}", pairs=int(record["pairs"]))
    bar.close()
    policy.eval()
    return history
