"""RLHF with PPO: four models, rollouts, a KL-shaped reward, GAE, and the clipped objectives.

The four models (Ouyang et al., 2022; Ziegler et al., 2019):

* the **policy** ``pi`` (starts as the SFT model, is trained);
* the **reference** ``pi_ref`` (a frozen copy of the SFT model; the KL penalty keeps ``pi`` near it);
* the **reward model** (frozen; scores a finished reply);
* the **value model** (the critic; backbone + scalar head per token, trained alongside the policy).

One PPO iteration:

1. **Rollout.** Sample replies to a batch of prompts with the cached decoder (left-padded prompts,
   :func:`~qwen_edu.alignment.core.generate_responses`), then re-run one forward pass per model on
   ``prompt + reply``: the policy's log-probabilities of the sampled tokens (``old_logprobs``), the
   reference's (``ref_logprobs``), the values, and the reward model's score.
2. **Reward shaping** (:func:`shaped_rewards`). Each reply token gets ``-kl_coef * KL_t`` with
   the per-token estimate :func:`kl_penalty` of ``KL(pi || pi_ref)``; the last reply token also gets
   the reward model's score.
3. **Advantages** (:func:`gae`): ``delta_t = r_t + gamma V_{t+1} - V_t``,
   ``A_t = delta_t + gamma lambda A_{t+1}`` (Schulman et al., 2016); returns ``A_t + V_t`` are
   the value targets. Advantages are whitened over the batch.
4. **Optimisation** (:func:`ppo_step`): a few epochs over minibatches of the rollout with the
   clipped surrogate :func:`ppo_policy_loss` (Schulman et al., 2017), the clipped value loss
   :func:`ppo_value_loss` and an entropy bonus.

Three further settings of Qwen-Chat's PPO run (Bai et al., 2023) are options here, off by default:

* **value warm-up** (``value_warmup_steps``): before the policy moves, a few iterations train only
  the value model on rollouts, so that the first advantages come from a critic that fits this
  reward model rather than from a fresh head;
* **reward normalisation** (``reward_normalization``): the reward-model score is centred by its
  running mean (:class:`RunningMoments`), and optionally scaled by its running standard deviation;
* **pre-training gradient mixing** (``ptx_coef`` with ``PPOTrainer(pretrain_data=...)``): each
  minibatch adds ``ptx_coef`` times the next-token loss on pre-training text (InstructGPT's
  "PPO-ptx"), which limits the *alignment tax* -- what the policy forgets while it chases the reward.

:data:`QWEN_PPO_REPORTED` lists the values the Qwen report gives for these and the other settings.

Per-token arrays are ``[B, T]`` over the reply positions (``T`` = generated length); ``mask [B, T]``
marks the real reply tokens (up to and including ``<|im_end|>``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from qwen_edu.alignment.core import (
    check_same_architecture,
    frozen_copy,
    generate_responses,
    masked_mean,
    masked_whiten,
    pad_id_of,
    sequence_logprobs,
)
from qwen_edu.alignment.data import SYSTEM_PROMPT, encode_prompt, im_end_id
from qwen_edu.alignment.reward import RewardModel, ValueModel, last_token_index
from qwen_edu.alignment.sft import progress_bar

__all__ = [
    "QWEN_PPO_REPORTED",
    "RunningMoments",
    "kl_penalty",
    "shaped_rewards",
    "gae",
    "ppo_policy_loss",
    "ppo_value_loss",
    "PPOConfig",
    "Rollout",
    "collect_rollout",
    "ppo_step",
    "PPOTrainer",
    "evaluate_policy",
]


# --- the formulas ------------------------------------------------------------------------------------

def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from log-probs of tokens *sampled from pi*.

    With ``log r = ref_logp - logp`` (Schulman, "Approximating KL divergence", 2020):

    * ``"k1"``: ``-log r = logp - ref_logp`` -- unbiased, can be negative for one token;
    * ``"k2"``: ``(log r)^2 / 2`` -- biased, low variance, >= 0;
    * ``"k3"``: ``(r - 1) - log r`` -- unbiased and always >= 0 (``e^x >= 1 + x``);
    * ``"abs"``: ``|log r|``.
    """
    log_ratio = ref_logp.float() - logp.float()
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(log_ratio) - log_ratio
    if kind == "abs":
        return log_ratio.abs()
    raise ValueError(f"unknown KL estimator {kind!r}; expected 'k1', 'k2', 'k3' or 'abs'")


def shaped_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                   kl_coef: float, kind: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards ``[B, T]``: ``-kl_coef * KL_t`` everywhere, plus ``scores [B]`` on the last token.

    Returns ``(rewards, kl)``, both 0 outside ``mask``.
    """
    maskf = mask.float()
    kl = kl_penalty(logp, ref_logp, kind) * maskf
    rewards = -kl_coef * kl
    last = last_token_index(mask)
    rewards = rewards.scatter_add(1, last[:, None], scores.float()[:, None])
    return rewards * maskf, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over ``[B, T]`` arrays; returns ``(advantages, returns)``.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` with ``V_{t+1} = 0`` after the last real token, and
    ``A_t = delta_t + gamma * lam * A_{t+1}``, computed right to left. ``returns = A + V`` (the
    value-function targets). Positions outside ``mask`` get 0.
    """
    if not (rewards.shape == values.shape == mask.shape):
        raise ValueError(f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask "
                         f"{tuple(mask.shape)} must have one shape")
    maskf = mask.float()
    values = values.float() * maskf
    rewards = rewards.float() * maskf
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * maskf[:, t]
        advantages[:, t] = next_adv
        next_value = values[:, t]
    return advantages, (advantages + values) * maskf


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip_range: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate: ``-mean(min(rho * A, clip(rho, 1 - eps, 1 + eps) * A))``, ``rho = exp(logp - old)``.

    Stats: ``clipfrac`` (share of tokens where the clipped branch is active) and ``approx_kl``
    (``mean((rho - 1) - log rho)``, the k3 estimate of ``KL(old || new)``).
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range) * advantages
    loss = -masked_mean(torch.minimum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped < unclipped).float(), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return loss, {"clipfrac": float(clipfrac), "approx_kl": float(approx_kl)}


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip_range_value: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """``0.5 * mean(max((V - R)^2, (clip(V, V_old +- eps) - R)^2))`` (the PPO2 value clipping)."""
    clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((loss_clipped > loss_unclipped).float(), mask)
    return loss, {"value_clipfrac": float(clipfrac)}


# --- configuration and rollouts -----------------------------------------------------------------------

@dataclass
class PPOConfig:
    batch_size: int = 32  # prompts per rollout
    mini_batch_size: int = 16
    ppo_epochs: int = 2
    lr: float = 2e-5
    value_lr: float | None = None  # None: the policy's lr x 5
    max_new_tokens: int = 20
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    responses_per_prompt: int = 1  # replies sampled per prompt in one rollout
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.5
    entropy_coef: float = 0.0
    whiten_advantages: bool = True
    missing_eos_penalty: float = 1.0  # subtracted from the score of a reply that never stopped
    max_grad_norm: float = 1.0
    seed: int = 0
    value_warmup_steps: int = 0  # iterations that train only the value model before PPO starts
    reward_normalization: str = "none"  # "none", "mean" (running mean) or "mean_std" (running mean and std)
    ptx_coef: float = 0.0  # weight of the pre-training next-token loss (needs PPOTrainer(pretrain_data=...))
    ptx_batch_size: int = 8  # pre-training rows per minibatch

    def __post_init__(self) -> None:
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of mini_batch_size "
                             f"{self.mini_batch_size}")
        kl_penalty(torch.zeros(1), torch.zeros(1), self.kl_estimator)  # validates the name
        if self.reward_normalization not in ("none", "mean", "mean_std"):
            raise ValueError(f"reward_normalization must be 'none', 'mean' or 'mean_std', "
                             f"got {self.reward_normalization!r}")
        if self.responses_per_prompt < 1 or self.value_warmup_steps < 0 or self.ptx_coef < 0:
            raise ValueError("responses_per_prompt must be >= 1, value_warmup_steps and ptx_coef >= 0")


#: The PPO settings the Qwen report gives for Qwen-Chat (Bai et al., 2023, section 3.2.2), as
#: ``PPOConfig`` fields. The report gives no coefficient for its pre-training gradient, only that it
#: is used, with far more pre-training data than PPO data; ``ptx_coef`` is therefore not listed.
QWEN_PPO_REPORTED: dict[str, Any] = {
    "value_warmup_steps": 50,  # "pause the policy model's updates ... updating the value model for 50 steps"
    "responses_per_prompt": 2,  # two responses sampled per query
    "kl_coef": 0.04,
    "reward_normalization": "mean",  # "normalize the reward based on the running mean"
    "lr": 1e-6,  # policy
    "value_lr": 5e-6,
    "clip_range_value": 0.15,  # value loss clipping
    "top_p": 0.9,  # sampling during PPO
}


class RunningMoments:
    """Running mean and variance of a stream of batches (Chan et al.'s parallel update).

    Used to normalise reward-model scores across PPO iterations: a score is judged against the
    scores seen so far, not only against the current batch.
    """

    def __init__(self) -> None:
        self.count, self.mean, self.var = 0, 0.0, 1.0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        batch_mean = float(x.mean())
        batch_var = float(x.var(unbiased=False))
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def normalize(self, x: torch.Tensor, scale: bool = False, eps: float = 1e-8) -> torch.Tensor:
        """``x - mean`` (and ``/ std`` with ``scale``) under the statistics seen so far."""
        out = x - self.mean
        return out / (self.std + eps) if scale else out


@dataclass
class Rollout:
    """Everything one PPO update needs; per-token fields are ``[B, T]`` over the reply positions."""

    input_ids: torch.Tensor  # [B, P + T] prompt (left-padded) + reply (right-padded)
    attention_mask: torch.Tensor  # [B, P + T]
    response_mask: torch.Tensor  # [B, P + T], 1 on reply tokens
    prompt_length: int
    mask: torch.Tensor  # [B, T]
    logprobs: torch.Tensor  # [B, T] policy at sampling time
    ref_logprobs: torch.Tensor  # [B, T]
    values: torch.Tensor  # [B, T]
    scores: torch.Tensor  # [B] reward model (after the missing-eos penalty), before any normalisation
    rewards: torch.Tensor  # [B, T] shaped
    kl: torch.Tensor  # [B, T]
    advantages: torch.Tensor  # [B, T]
    returns: torch.Tensor  # [B, T]
    texts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: torch.Tensor) -> Rollout:
        """The sub-rollout of ``rows`` (a minibatch)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value[rows]
            elif f.name == "texts":
                value = [value[i] for i in rows.tolist()] if value else []
            out[f.name] = value
        return Rollout(**out)


def _reply_slice(x: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """Next-token array ``[B, L - 1]`` -> reply positions ``[B, T]`` (entry ``j`` is reply token ``j``)."""
    return x[:, prompt_length - 1:]


def policy_outputs(policy: nn.Module, rollout_like: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropies ``[B, T]`` of the reply tokens under ``policy``."""
    logp, entropy = sequence_logprobs(policy, rollout_like.input_ids, rollout_like.attention_mask,
                                      rollout_like.response_mask, reduce="none", return_entropy=True)
    p = rollout_like.prompt_length
    return _reply_slice(logp, p), _reply_slice(entropy, p)


def value_outputs(value_model: nn.Module, rollout_like: Any) -> torch.Tensor:
    """``V`` at the state before each reply token ``[B, T]``, 0 outside the reply."""
    v = value_model(rollout_like.input_ids, rollout_like.attention_mask)[:, :-1]
    return _reply_slice(v, rollout_like.prompt_length) * rollout_like.response_mask[:, rollout_like.prompt_length:]


@torch.no_grad()
def collect_rollout(policy: nn.Module, ref_model: nn.Module, reward_model: nn.Module, value_model: nn.Module,
                    prompts: Sequence[list[int]], config: PPOConfig, *, pad_id: int, stop_id: int,
                    generator: torch.Generator | None = None, tokenizer: Any = None,
                    reward_stats: RunningMoments | None = None) -> Rollout:
    """Sample ``config.responses_per_prompt`` replies to each of ``prompts`` (token-id lists) and
    score them with all four models.

    With ``config.reward_normalization`` other than ``"none"``, ``reward_stats`` (a
    :class:`RunningMoments` kept across iterations) is updated with this batch's scores and the
    normalised score enters the shaped reward; ``Rollout.scores`` keeps the raw scores.
    """
    prompts = [list(p) for p in prompts for _ in range(config.responses_per_prompt)]
    resp = generate_responses(policy, prompts, pad_id=pad_id, stop_id=stop_id,
                              max_new_tokens=config.max_new_tokens, do_sample=True,
                              temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                              generator=generator)
    for m in (policy, ref_model, reward_model, value_model):
        m.eval()
    p = resp.prompt_length
    mask = resp.response_mask[:, p:]
    logp, _ = policy_outputs(policy, resp)
    ref_logp = _reply_slice(sequence_logprobs(ref_model, resp.input_ids, resp.attention_mask,
                                              resp.response_mask, reduce="none"), p)
    values = value_outputs(value_model, resp)
    scores = reward_model(resp.input_ids, resp.attention_mask).float()
    scores = scores - config.missing_eos_penalty * (~resp.finished).float()
    used = scores
    if config.reward_normalization != "none":
        if reward_stats is None:
            raise ValueError(f"reward_normalization={config.reward_normalization!r} needs reward_stats "
                             "(a RunningMoments kept across iterations)")
        reward_stats.update(scores)
        used = reward_stats.normalize(scores, scale=config.reward_normalization == "mean_std")
    rewards, kl = shaped_rewards(used, logp, ref_logp, mask, config.kl_coef, config.kl_estimator)
    advantages, returns = gae(rewards, values, mask, config.gamma, config.lam)
    if config.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    texts = resp.texts(tokenizer) if tokenizer is not None else []
    return Rollout(resp.input_ids, resp.attention_mask, resp.response_mask, p, mask, logp, ref_logp, values,
                   scores, rewards, kl, advantages, returns, texts)


def ppo_step(policy: nn.Module, value_model: nn.Module, optimizer: torch.optim.Optimizer, rollout: Rollout,
             config: PPOConfig, *, generator: torch.Generator | None = None, train_policy: bool = True,
             pretrain_batches: Iterator[Mapping[str, torch.Tensor]] | None = None) -> dict[str, float]:
    """``ppo_epochs`` passes over shuffled minibatches of ``rollout``; returns the averaged statistics.

    The loss of a minibatch is ``policy_loss + vf_coef * value_loss - entropy_coef * entropy``
    ``+ ptx_coef * lm_loss``; the policy and the value model have separate parameters, so one
    optimizer can hold both. ``lm_loss`` is the next-token loss of the policy on the next batch of
    ``pretrain_batches`` (``{"input_ids", "labels"}``; needed when ``config.ptx_coef > 0``).
    ``train_policy=False`` is the value warm-up: only the value loss is computed and stepped.
    """
    from qwen_edu.training.loss import causal_lm_loss

    use_ptx = train_policy and config.ptx_coef > 0
    if use_ptx and pretrain_batches is None:
        raise ValueError("ptx_coef > 0 needs pretrain_batches (PPOTrainer(pretrain_data=...))")
    policy.train(train_policy)
    value_model.train()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    totals: dict[str, float] = {}
    count = 0
    for _ in range(config.ppo_epochs):
        order = torch.randperm(len(rollout), generator=generator)
        for start in range(0, len(rollout), config.mini_batch_size):
            mb = rollout.select(order[start:start + config.mini_batch_size])
            values = value_outputs(value_model, mb)
            vf_loss, stats = ppo_value_loss(values, mb.values, mb.returns, mb.mask, config.clip_range_value)
            loss = config.vf_coef * vf_loss
            stats["value_loss"] = float(vf_loss.detach())
            if train_policy:
                logp, entropy = policy_outputs(policy, mb)
                pg_loss, pg_stats = ppo_policy_loss(logp, mb.logprobs, mb.advantages, mb.mask, config.clip_range)
                mean_entropy = masked_mean(entropy, mb.mask)
                loss = loss + pg_loss - config.entropy_coef * mean_entropy
                stats.update(policy_loss=float(pg_loss.detach()), entropy=float(mean_entropy.detach()), **pg_stats)
            if use_ptx:
                assert pretrain_batches is not None
                batch = next(pretrain_batches)
                device = next(policy.parameters()).device
                logits = policy(batch["input_ids"].to(device)).logits
                lm_loss = causal_lm_loss(logits, batch["labels"].to(device))
                loss = loss + config.ptx_coef * lm_loss
                stats["ptx_loss"] = float(lm_loss.detach())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
            optimizer.step()
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v
            count += 1
    policy.eval()
    value_model.eval()
    return {k: v / count for k, v in totals.items()}


def _cycle_batches(rows: Mapping[str, torch.Tensor], batch_size: int, seed: int
                   ) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches of ``{"input_ids", "labels"}`` rows (pre-training text for PPO-ptx)."""
    g = torch.Generator().manual_seed(seed)
    n = rows["input_ids"].shape[0]
    while True:
        order = torch.randperm(n, generator=g)
        for start in range(0, n - batch_size + 1, batch_size):
            index = order[start:start + batch_size]
            yield {"input_ids": rows["input_ids"][index], "labels": rows["labels"][index]}


# --- the trainer --------------------------------------------------------------------------------------

class PPOTrainer:
    """PPO for a chat policy: holds the four models, one optimizer, and a seeded sampling generator.

    ``ref_model=None`` makes a frozen copy of the policy (its starting point); a given reference must
    have the policy's shape. ``value_model=None`` builds one from the *reward model's* backbone (a
    common choice: the critic starts from a network that already judges replies), with a fresh head.
    ``pretrain_data`` (rows ``{"input_ids", "labels"}`` such as a
    :class:`~qwen_edu.training.PackedDataset`, or a ``[N, L]`` tensor of token ids) feeds the
    pre-training loss that ``config.ptx_coef > 0`` mixes into every minibatch.
    """

    def __init__(self, policy: nn.Module, reward_model: RewardModel, tokenizer: Any,
                 config: PPOConfig | None = None, *, ref_model: nn.Module | None = None,
                 value_model: ValueModel | None = None, system_prompt: str | None = SYSTEM_PROMPT,
                 pretrain_data: Any = None) -> None:
        self.config = config or PPOConfig()
        self.policy = policy
        if ref_model is None:
            ref_model = frozen_copy(policy)
        else:
            check_same_architecture(policy, ref_model, "reference model")
        self.ref_model = ref_model
        self.reward_model = reward_model
        for p in reward_model.parameters():
            p.requires_grad_(False)
        if value_model is None:
            import copy

            value_model = ValueModel(copy.deepcopy(reward_model.model))
            for p in value_model.parameters():
                p.requires_grad_(True)
        self.value_model = value_model
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.pad_id, self.stop_id = pad_id_of(tokenizer), im_end_id(tokenizer)
        value_lr = self.config.value_lr if self.config.value_lr is not None else 5 * self.config.lr
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": self.config.lr},
             {"params": [p for p in value_model.parameters() if p.requires_grad], "lr": value_lr}],
            weight_decay=0.0, eps=1e-6)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.reward_stats = RunningMoments()
        self.pretrain_batches = None
        if pretrain_data is not None:
            rows = _pretrain_rows(pretrain_data)
            if len(rows["input_ids"]) < self.config.ptx_batch_size:
                raise ValueError(f"pretrain_data has {len(rows['input_ids'])} rows, fewer than "
                                 f"ptx_batch_size={self.config.ptx_batch_size}")
            self.pretrain_batches = _cycle_batches(rows, self.config.ptx_batch_size, self.config.seed)
        elif self.config.ptx_coef > 0:
            raise ValueError("config.ptx_coef > 0 mixes in the pre-training loss: pass pretrain_data")
        self.iteration = 0
        self.history: list[dict[str, float]] = []

    def encode(self, prompts: Sequence[Mapping[str, Any] | list[int]]) -> list[list[int]]:
        """Prompts as ``{"prompt": messages}`` dicts, message lists, or id lists -> id lists."""
        out = []
        for p in prompts:
            if isinstance(p, Mapping):
                p = p["prompt"]
            if p and isinstance(p[0], int):
                out.append(list(p))
            else:
                out.append(encode_prompt(self.tokenizer, p, self.system_prompt))
        return out

    def step(self, prompts: Sequence[Any], *, train_policy: bool = True) -> dict[str, float]:
        """One iteration: rollout on ``prompts`` then :func:`ppo_step`; returns logged statistics.

        ``train_policy=False`` is a value warm-up iteration (the policy does not move). The logged
        ``kl`` is the penalty's own estimate (``config.kl_estimator``) summed over each sampled reply
        and averaged: an unbiased estimate of ``KL(pi || pi_ref)`` per reply when the replies are
        sampled from the policy itself (temperature 1, no ``top_k``/``top_p``).
        """
        rollout = collect_rollout(self.policy, self.ref_model, self.reward_model, self.value_model,
                                  self.encode(prompts), self.config, pad_id=self.pad_id, stop_id=self.stop_id,
                                  generator=self.generator, tokenizer=self.tokenizer,
                                  reward_stats=self.reward_stats)
        stats = ppo_step(self.policy, self.value_model, self.optimizer, rollout, self.config,
                         generator=self.generator, train_policy=train_policy,
                         pretrain_batches=self.pretrain_batches)
        mask = rollout.mask.float()
        record = {
            "iteration": self.iteration,
            "phase": "ppo" if train_policy else "value_warmup",
            "reward": float(rollout.scores.mean()),
            "kl": float((rollout.kl * mask).sum(-1).mean()),  # per reply, summed over its tokens
            "reply_length": float(mask.sum(-1).mean()),
            "return": float(rollout.rewards.sum(-1).mean()),
            **stats,
        }
        self.last_rollout = rollout
        self.history.append(record)
        self.iteration += 1
        return record

    def train(self, prompts: Sequence[Any], iterations: int, *,
              on_step: Callable[[dict[str, float]], None] | None = None, progress: bool = True
              ) -> list[dict[str, float]]:
        """``config.value_warmup_steps`` value-only iterations, then ``iterations`` PPO iterations,
        cycling through ``prompts`` ``batch_size`` at a time."""
        n = self.config.batch_size
        if len(prompts) < n:
            raise ValueError(f"need at least batch_size={n} prompts, got {len(prompts)}")
        warmup = self.config.value_warmup_steps
        bar = progress_bar(warmup + iterations, "PPO", progress)
        out = []
        for i in range(warmup + iterations):
            start = (i * n) % (len(prompts) - n + 1) if len(prompts) > n else 0
            record = self.step(prompts[start:start + n], train_policy=i >= warmup)
            out.append(record)
            if on_step is not None:
                on_step(record)
            bar.update()
            bar.set_postfix(reward=f"{record['reward']:.2f}", kl=f"{record['kl']:.3f}")
        bar.close()
        return out


def _pretrain_rows(data: Any) -> dict[str, torch.Tensor]:
    """``{"input_ids", "labels"}`` ``[N, L]`` from a PackedDataset/PackedSequences, a mapping, or ids."""
    packed = getattr(data, "packed", data)
    if isinstance(packed, torch.Tensor):
        rows = {"input_ids": packed, "labels": packed}
    elif isinstance(packed, Mapping):
        rows = {"input_ids": packed["input_ids"], "labels": packed.get("labels", packed["input_ids"])}
    elif hasattr(packed, "input_ids") and hasattr(packed, "labels"):
        rows = {"input_ids": packed.input_ids, "labels": packed.labels}
    else:
        raise TypeError(f"pretrain_data must be a PackedDataset, PackedSequences, a mapping with input_ids "
                        f"(and labels) or a [N, L] id tensor, got {type(data).__name__}")
    if rows["input_ids"].dim() != 2 or rows["input_ids"].shape != rows["labels"].shape:
        raise ValueError(f"pretrain_data rows must be [N, L] with labels of the same shape, got input_ids "
                         f"{tuple(rows['input_ids'].shape)} and labels {tuple(rows['labels'].shape)}")
    return rows


@torch.no_grad()
def evaluate_policy(policy: nn.Module, reward_model: nn.Module, tokenizer: Any, prompts: Sequence[Mapping[str, Any]],
                    *, ref_model: nn.Module | None = None, max_new_tokens: int = 20, batch_size: int = 64,
                    system_prompt: str | None = SYSTEM_PROMPT, do_sample: bool = False,
                    generator: torch.Generator | None = None, kl_seed: int = 0) -> dict[str, Any]:
    """The reward-model score of the policy's replies and, with ``ref_model``, its KL from the reference.

    * ``reward``: mean score of the replies (greedy by default; ``do_sample=True`` samples them at
      temperature 1 with ``generator``), and ``texts``, the replies.
    * ``kl``: ``KL(pi || pi_ref)`` in nats per reply, estimated on replies **sampled** from the
      policy (temperature 1, no truncation of the distribution): along each sampled reply the exact
      per-token KL over the vocabulary is summed (:func:`~qwen_edu.alignment.core.reply_kl`), then
      averaged over the prompts; ``kl_stderr`` is its standard error. Greedy replies are not samples
      from the policy, so with ``do_sample=False`` a separate sampled pass (seeded by ``kl_seed``)
      measures the KL; with ``do_sample=True`` the scored samples are reused.
    """
    from qwen_edu.alignment.core import reply_kl

    pad, stop = pad_id_of(tokenizer), im_end_id(tokenizer)
    kl_generator = generator if do_sample else torch.Generator().manual_seed(kl_seed)
    scores, kls, texts = [], [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids = [encode_prompt(tokenizer, p["prompt"], system_prompt) for p in chunk]
        resp = generate_responses(policy, ids, pad_id=pad, stop_id=stop, max_new_tokens=max_new_tokens,
                                  do_sample=do_sample, generator=generator)
        scores.append(reward_model(resp.input_ids, resp.attention_mask).float().cpu())
        texts += resp.texts(tokenizer)
        if ref_model is not None:
            sampled = resp if do_sample else generate_responses(
                policy, ids, pad_id=pad, stop_id=stop, max_new_tokens=max_new_tokens, do_sample=True,
                generator=kl_generator)
            kls.append(reply_kl(policy, ref_model, sampled.input_ids, sampled.attention_mask,
                                sampled.response_mask).cpu())
    out: dict[str, Any] = {"reward": float(torch.cat(scores).mean()), "texts": texts}
    if kls:
        kl = torch.cat(kls)
        out["kl"] = float(kl.mean())
        out["kl_stderr"] = float(kl.std() / math.sqrt(len(kl))) if len(kl) > 1 else float("nan")
    if not math.isfinite(out["reward"]):
        raise FloatingPointError("reward model returned a non-finite score")
    return out
