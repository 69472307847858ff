"""Reward models: the Qwen backbone with a scalar head, trained on preference pairs.

A reward model reads ``prompt + reply`` and outputs one number. It is the base (or SFT) model with
the LM head replaced by ``score = Linear(hidden, 1)``; the number is read at the **last real
token** of each row (:func:`last_token_index`), the only position that has seen the whole reply.

Training uses the Bradley-Terry model of pairwise preferences (Bradley and Terry, 1952; Ouyang et al.,
2022): ``P(chosen > rejected) = sigmoid(r_chosen - r_rejected)``, so the loss is
``-log sigmoid(r_chosen - r_rejected)`` (:func:`bradley_terry_loss`). Only differences of rewards
matter; the scale is anchored by the data.

:class:`ValueModel` is the same construction read at *every* position (PPO's critic).

**Preference-model pre-training (PMP).** Qwen's reward model (Bai et al., 2023) starts from the
*pretrained* model of the same size, is first trained on a large set of comparisons (PMP, after
Anthropic's preference-model pre-training), and is then fine-tuned on fewer, higher-quality
preference labels. ``RewardConfig(pmp_steps=N)`` switches that first stage on: N Bradley-Terry steps
on plain-text comparisons mined from the pre-training corpus
(:func:`~qwen_edu.alignment.data.make_pmp_pairs`), then the fine-tuning on the chat pairs. The
book's default is ``pmp_steps=0`` on a reward model initialised from the *SFT* model (InstructGPT's
choice): see :func:`train_reward_model`.
"""

from __future__ import annotations

import copy
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qwen_edu.alignment.core import pad_id_of
from qwen_edu.alignment.data import (
    SYSTEM_PROMPT,
    collate_pairs,
    encode_pair,
    encode_text_pair,
    make_pmp_pairs,
)
from qwen_edu.alignment.sft import progress_bar
from qwen_edu.generation import left_padded_positions
from qwen_edu.models import Qwen2ForCausalLM, Qwen2Model

__all__ = [
    "last_token_index",
    "ScalarHeadModel",
    "RewardModel",
    "ValueModel",
    "bradley_terry_loss",
    "RewardConfig",
    "train_reward_model",
    "evaluate_reward_model",
    "evaluate_text_pairs",
]


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of ``attention_mask [B, L]`` (right or left padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (positions + 1)).argmax(-1)


class ScalarHeadModel(nn.Module):
    """``Qwen2Model`` backbone + ``score = Linear(hidden, 1)``; ``hidden_states -> [B, L]`` scores."""

    def __init__(self, backbone: Qwen2Model) -> None:
        super().__init__()
        self.config = backbone.config
        self.model = backbone
        self.score = nn.Linear(backbone.config.hidden_size, 1, bias=True)
        nn.init.normal_(self.score.weight, std=1.0 / (backbone.config.hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.score.bias)

    @classmethod
    def from_causal_lm(cls, lm: Qwen2ForCausalLM) -> ScalarHeadModel:
        """A new model whose backbone is a *copy* of ``lm.model`` (the LM itself is untouched)."""
        return cls(copy.deepcopy(lm.model))

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """``config.json`` (the backbone's Qwen2 config) + ``model.safetensors`` (``model.*``, ``score.*``)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save(folder)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()
                   if not k.endswith("rotary_emb.inv_freq")}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt", "head": type(self).__name__})
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> ScalarHeadModel:
        """Load what :meth:`save_pretrained` wrote; every key must be present with its shape."""
        from safetensors.torch import load_file

        from qwen_edu.models import QwenConfig

        folder = Path(folder)
        if not (folder / "model.safetensors").is_file():
            raise FileNotFoundError(f"{folder} has no model.safetensors (write it with save_pretrained)")
        with torch.device("meta"):
            model = cls(Qwen2Model(QwenConfig.from_hf_config(folder)))
        tensors = {k: v.to(dtype) for k, v in load_file(str(folder / "model.safetensors")).items()}
        expected = {k: tuple(p.shape) for k, p in model.named_parameters()}
        found = {k: tuple(v.shape) for k, v in tensors.items()}
        if expected != found:
            missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
            wrong = [k for k in set(expected) & set(found) if expected[k] != found[k]]
            raise ValueError(f"{folder}: missing keys {missing}, unexpected keys {unexpected}, "
                             f"wrong shapes {[(k, expected[k], found[k]) for k in wrong]}")
        model.load_state_dict(tensors, strict=False, assign=True)
        model.model.rotary_emb.to("cpu")  # rebuild the (non-persistent) RoPE frequencies off the meta device
        return model.eval()

    def token_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One score per position ``[B, L]`` (fp32); padded batches get positions counting real tokens."""
        positions = left_padded_positions(attention_mask) if attention_mask is not None else None
        hidden, _ = self.model(input_ids, attention_mask, positions)
        return self.score(hidden).squeeze(-1).float()


class RewardModel(ScalarHeadModel):
    """Reward ``[B]`` = score at the last non-padding token of each row."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        scores = self.token_scores(input_ids, attention_mask)
        if attention_mask is None:
            return scores[:, -1]
        index = last_token_index(attention_mask)
        return scores.gather(1, index[:, None]).squeeze(1)


class ValueModel(ScalarHeadModel):
    """Value estimates ``[B, L]``: the score at every position (PPO's critic)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.token_scores(input_ids, attention_mask)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | float = 0.0
                       ) -> tuple[torch.Tensor, dict[str, float]]:
    """``mean(-log sigmoid(r_chosen - r_rejected - margin))`` and stats (accuracy, mean margin)."""
    diff = r_chosen.float() - r_rejected.float()
    loss = -F.logsigmoid(diff - margin).mean()
    stats = {"accuracy": float((diff > 0).float().mean()), "margin": float(diff.mean().detach())}
    return loss, stats


@dataclass
class RewardConfig:
    steps: int = 100  # fine-tuning steps on the preference pairs
    batch_size: int = 16
    lr: float = 5e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    pmp_steps: int = 0  # preference-model pre-training steps before fine-tuning (0: no PMP, the book's default)
    pmp_lr: float | None = None  # None: lr
    pmp_num_pairs: int = 4000  # PMP comparisons generated when none are given


def _pair_batches(encoded: Sequence[Mapping[str, list[int]]], batch_size: int, pad_id: int, seed: int):
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            more = list(range(len(encoded)))
            rng.shuffle(more)
            order += more
        rows, order = order[:batch_size], order[batch_size:]
        yield collate_pairs([encoded[i] for i in rows], pad_id)


def _bradley_terry_steps(model: RewardModel, encoded: Sequence[Mapping[str, list[int]]], pad_id: int, *,
                         steps: int, lr: float, config: RewardConfig, stage: str,
                         on_step: Callable[[dict[str, Any]], None] | None, progress: bool) -> list[dict[str, Any]]:
    """``steps`` AdamW steps (warm-up + cosine) of the Bradley-Terry loss over shuffled ``encoded`` pairs."""
    from qwen_edu.training.optim import make_optimizer, make_scheduler

    device = next(model.parameters()).device
    optimizer = make_optimizer(model, lr, config.weight_decay)
    scheduler = make_scheduler(optimizer, warmup_steps=min(10, steps // 10), total_steps=steps)
    batches = _pair_batches(encoded, config.batch_size, pad_id, config.seed)
    history = []
    bar = progress_bar(steps, "reward model" if stage == "finetune" else "PMP", progress)
    model.train()
    for step in range(steps):
        batch = next(batches)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        rewards = model(ids, mask)
        r_chosen, r_rejected = rewards.chunk(2)
        loss, stats = bradley_terry_loss(r_chosen, r_rejected)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        record = {"step": step, "stage": stage, "loss": float(loss.detach()), **stats}
        history.append(record)
        if on_step is not None:
            on_step(record)
        bar.update()
        bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{stats['accuracy']:.2f}")
    bar.close()
    model.eval()
    return history


def train_reward_model(model: RewardModel, tokenizer: Any, pairs: Sequence[Mapping[str, Any]],
                       config: RewardConfig | None = None, *,
                       on_step: Callable[[dict[str, Any]], None] | None = None, progress: bool = True,
                       system_prompt: str | None = SYSTEM_PROMPT,
                       pmp_pairs: Sequence[Mapping[str, str]] | None = None) -> list[dict[str, Any]]:
    """Train ``model`` in place with the Bradley-Terry loss; returns per-step ``loss/accuracy/margin``.

    With ``config.pmp_steps > 0`` a preference-model pre-training stage comes first: that many steps
    on ``pmp_pairs`` (plain-text comparisons; default ``make_pmp_pairs(config.pmp_num_pairs)``) at
    ``config.pmp_lr``, then ``config.steps`` fine-tuning steps on the chat ``pairs``. Each record
    says its ``stage`` (``"pmp"`` or ``"finetune"``).

    Where the reward model starts is the caller's choice. Qwen starts from the pretrained model and
    uses PMP (Bai et al., 2023); the book's chapters start from the SFT model without PMP: its
    preference data are in the chat format the SFT model already reads, and one short stage fits the
    time budget.
    """
    config = config or RewardConfig()
    encoded = [encode_pair(tokenizer, p, system_prompt=system_prompt) for p in pairs]
    if not encoded:
        raise ValueError("no comparison pairs to train on")
    pad = pad_id_of(tokenizer)
    history: list[dict[str, Any]] = []
    if config.pmp_steps > 0:
        if pmp_pairs is None:
            pmp_pairs = make_pmp_pairs(config.pmp_num_pairs, seed=config.seed + 7)
        pmp_encoded = [encode_text_pair(tokenizer, p) for p in pmp_pairs]
        if not pmp_encoded:
            raise ValueError("pmp_steps > 0 but there are no PMP comparison pairs")
        history += _bradley_terry_steps(model, pmp_encoded, pad, steps=config.pmp_steps,
                                        lr=config.pmp_lr if config.pmp_lr is not None else config.lr,
                                        config=config, stage="pmp", on_step=on_step, progress=progress)
    history += _bradley_terry_steps(model, encoded, pad, steps=config.steps, lr=config.lr, config=config,
                                    stage="finetune", on_step=on_step, progress=progress)
    return history


@torch.no_grad()
def evaluate_text_pairs(model: RewardModel, tokenizer: Any, pairs: Sequence[Mapping[str, str]], *,
                        batch_size: int = 64) -> dict[str, Any]:
    """Held-out accuracy of the reward model on plain-text (PMP) comparisons, overall and per kind."""
    return _pair_accuracy(model, [encode_text_pair(tokenizer, p) for p in pairs], pad_id_of(tokenizer),
                          [p.get("kind", "all") for p in pairs], batch_size)


def _pair_accuracy(model: RewardModel, encoded: Sequence[Mapping[str, list[int]]], pad: int,
                   kinds: Sequence[str], batch_size: int) -> dict[str, Any]:
    model.eval()
    device = next(model.parameters()).device
    diffs = []
    for start in range(0, len(encoded), batch_size):
        batch = collate_pairs(encoded[start:start + batch_size], pad)
        rewards = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        r_c, r_r = rewards.chunk(2)
        diffs.append((r_c - r_r).cpu())
    diff = torch.cat(diffs)
    out: dict[str, Any] = {"accuracy": float((diff > 0).float().mean()), "loss": float(-F.logsigmoid(diff).mean()),
                           "margin": float(diff.mean())}
    for kind in sorted(set(kinds)):
        sel = torch.tensor([k == kind for k in kinds])
        out[f"accuracy_{kind}"] = float((diff[sel] > 0).float().mean())
    return out


@torch.no_grad()
def evaluate_reward_model(model: RewardModel, tokenizer: Any, pairs: Sequence[Mapping[str, Any]], *,
                          batch_size: int = 64, system_prompt: str | None = SYSTEM_PROMPT) -> dict[str, Any]:
    """Held-out pairwise accuracy (``r_chosen > r_rejected``), mean loss and margin, per kind too."""
    encoded = [encode_pair(tokenizer, p, system_prompt=system_prompt) for p in pairs]
    return _pair_accuracy(model, encoded, pad_id_of(tokenizer), [p.get("kind", "all") for p in pairs], batch_size)
