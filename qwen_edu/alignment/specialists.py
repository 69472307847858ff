"""Specialists by continued pre-training: the base model, trained further on one domain.

Qwen-Coder and Qwen-Math start from a Qwen base model and continue *pre-training* (plain next-token
prediction, no chat format) on a large domain corpus before any alignment. Here the domains are
the book's generated Python functions and arithmetic lines (:mod:`qwen_edu.corpus`). The gain is
measured on held-out data of the domain:

* **math**: exact-match accuracy of greedy completions of ``"a op b ="`` (:func:`arithmetic_accuracy`),
  with a few solved lines before it as context, the way such lines appear in the corpus;
* **code**: the next-token loss on held-out functions (:func:`text_loss`).

A little replay of the general corpus (``replay_fraction`` of stories) limits forgetting; the story
loss before and after shows what the specialisation costs.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qwen_edu.alignment.core import pad_id_of
from qwen_edu.alignment.data import IGNORE_INDEX, pad_batch

__all__ = [
    "SpecialistConfig",
    "arithmetic_problems",
    "arithmetic_accuracy",
    "text_loss",
    "continue_pretraining",
    "domain_corpus",
    "train_specialist",
]


@dataclass
class SpecialistConfig:
    steps: int = 150
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 5e-4
    warmup_steps: int = 10
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    replay_fraction: float = 0.1
    num_documents: int = 1500
    precision: str = "auto"
    seed: int = 0


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_id", None)
    return int(eos) if eos is not None else pad_id_of(tokenizer)


def arithmetic_problems(n: int, seed: int = 1234, max_value: int = 99) -> list[tuple[str, int]]:
    """``n`` held-out problems ``("23 + 45 =", 68)`` in the corpus's own line format."""
    from qwen_edu.corpus import arithmetic_line

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        line = arithmetic_line(rng, max_value)
        left, right = line.rsplit("=", 1)
        out.append((left.strip() + " =", int(right)))
    return out


@torch.no_grad()
def arithmetic_accuracy(model: nn.Module, tokenizer: Any, problems: Sequence[tuple[str, int]], *, shots: int = 3,
                        max_new_tokens: int = 6, batch_size: int = 64, seed: int = 99,
                        return_samples: bool = False) -> float | tuple[float, list[tuple[str, str, int]]]:
    """Exact-match accuracy of greedy completions; each prompt starts with ``shots`` solved lines."""
    from qwen_edu.alignment.core import generate_responses

    rng = random.Random(seed)
    solved = arithmetic_problems(shots * len(problems), seed=seed + 1)
    prompts = []
    for i, (question, _) in enumerate(problems):
        lines = [f"{q} {a}" for q, a in solved[i * shots:(i + 1) * shots]]
        rng.shuffle(lines)
        prompts.append("\n".join([*lines, question]))
    pad = pad_id_of(tokenizer)
    newline = tokenizer.encode("\n")
    stop = newline[0] if len(newline) == 1 else _eos_id(tokenizer)
    correct, samples = 0, []
    for start in range(0, len(prompts), batch_size):
        ids = [tokenizer.encode(p) for p in prompts[start:start + batch_size]]
        resp = generate_responses(model, ids, pad_id=pad, stop_id=stop, max_new_tokens=max_new_tokens)
        for text, (question, answer) in zip(resp.texts(tokenizer), problems[start:start + batch_size]):
            first = text.strip().split("\n")[0].strip().split(" ")[0] if text.strip() else ""
            ok = first.lstrip("-").isdigit() and int(first) == answer
            correct += ok
            samples.append((question, text, answer))
    accuracy = correct / max(1, len(problems))
    return (accuracy, samples) if return_samples else accuracy


@torch.no_grad()
def text_loss(model: nn.Module, tokenizer: Any, texts: Sequence[str], *, max_length: int = 256,
              batch_size: int = 32) -> float:
    """Mean next-token cross-entropy (nats per token) of ``texts``, each a separate document."""
    from qwen_edu.training.loss import causal_lm_loss

    model.eval()
    device = next(model.parameters()).device
    pad = pad_id_of(tokenizer)
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        ids = [tokenizer.encode(t)[:max_length] for t in texts[start:start + batch_size]]
        batch = pad_batch(ids, pad, side="right", labels=ids)
        logits = model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        labels = batch["labels"].to(device)
        total += float(causal_lm_loss(logits, labels, reduction="sum"))
        count += int((labels[:, 1:] != IGNORE_INDEX).sum())
    return total / max(1, count)


def continue_pretraining(model: nn.Module, tokenizer: Any, documents: Sequence[str],
                         config: SpecialistConfig | None = None, *,
                         on_step: Callable[[dict[str, float]], None] | None = None, progress: bool = True
                         ) -> list[dict[str, float]]:
    """Next-token training on packed ``documents`` with the chapter-3 trainer (pre-training, continued).

    Documents are packed into rows of ``seq_len`` tokens with the end-of-text token after each one
    (:func:`qwen_edu.training.pack_sequences`). Returns one ``{"step", "loss", "lr"}`` per step.
    """
    from qwen_edu.training import PackedDataset, TrainConfig, Trainer, pack_sequences, tokenize_documents

    config = config or SpecialistConfig()
    packed = pack_sequences(tokenize_documents(tokenizer, documents), config.seq_len, _eos_id(tokenizer),
                            pad_id=pad_id_of(tokenizer))
    train_config = TrainConfig(
        max_steps=config.steps, batch_size=config.batch_size, micro_batch_size=config.batch_size,
        seq_len=config.seq_len, lr=config.lr, min_lr=config.lr * 0.1,
        warmup_steps=min(config.warmup_steps, config.steps), weight_decay=config.weight_decay,
        grad_clip=config.max_grad_norm, precision=config.precision, eval_every=0, seed=config.seed,
        progress=progress)
    callback = None
    if on_step is not None:
        def callback(step: int, loss: float, lr: float) -> None:
            on_step({"step": step, "loss": loss, "lr": lr})
    trainer = Trainer(model, train_config, PackedDataset(packed), on_step=callback,
                      device=next(model.parameters()).device)
    result = trainer.train()
    model.eval()
    return [{"step": r.step, "loss": r.loss, "lr": r.lr} for r in result.history]


def domain_corpus(domain: str, n: int, seed: int = 0, *, replay_fraction: float = 0.0) -> list[str]:
    """``n`` documents of ``"code"`` or ``"math"``, with ``replay_fraction`` of them general stories."""
    from qwen_edu.corpus import generate_arithmetic, generate_code, generate_stories

    makers = {"code": generate_code, "math": generate_arithmetic}
    if domain not in makers:
        raise ValueError(f"unknown specialist domain {domain!r}; expected 'code' or 'math'")
    n_replay = int(round(n * replay_fraction))
    docs = makers[domain](n - n_replay, seed=seed) + generate_stories(n_replay, seed=seed + 1)
    random.Random(seed).shuffle(docs)
    return docs


def train_specialist(base: nn.Module, tokenizer: Any, domain: str, config: SpecialistConfig | None = None, *,
                     on_step: Callable[[dict[str, float]], None] | None = None, progress: bool = True,
                     eval_size: int = 100) -> tuple[nn.Module, dict[str, Any]]:
    """Copy ``base``, continue pre-training it on ``domain``, and measure before/after.

    Returns ``(specialist, metrics)``; metrics hold the domain measure (``arithmetic_accuracy`` for
    math, ``code_loss`` for code) and ``story_loss`` (forgetting), each ``_before`` and ``_after``.
    Held-out data use seeds the training data never uses.
    """
    from qwen_edu.corpus import generate_code, generate_stories

    config = config or SpecialistConfig()
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(True)
    stories = generate_stories(eval_size // 2, seed=10_007)
    if domain == "math":
        problems = arithmetic_problems(eval_size, seed=10_009)

        def measure() -> dict[str, float]:
            return {"arithmetic_accuracy": float(arithmetic_accuracy(model, tokenizer, problems)),
                    "story_loss": text_loss(model, tokenizer, stories)}
    elif domain == "code":
        functions = generate_code(eval_size, seed=10_009)

        def measure() -> dict[str, float]:
            return {"code_loss": text_loss(model, tokenizer, functions), "story_loss": text_loss(model, tokenizer, stories)}
    else:
        raise ValueError(f"unknown specialist domain {domain!r}; expected 'code' or 'math'")
    before = measure()
    docs = domain_corpus(domain, config.num_documents, config.seed, replay_fraction=config.replay_fraction)
    history = continue_pretraining(model, tokenizer, docs, config, on_step=on_step, progress=progress)
    after = measure()
    metrics: dict[str, Any] = {f"{k}_before": v for k, v in before.items()}
    metrics.update({f"{k}_after": v for k, v in after.items()})
    metrics["history"] = history
    return model, metrics
