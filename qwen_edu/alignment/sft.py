"""Supervised fine-tuning (SFT): teach the base model the chat format on assistant tokens only.

The objective is the pre-training one -- next-token cross-entropy,
:func:`qwen_edu.training.causal_lm_loss` -- with labels ``-100`` everywhere except on the assistant
replies (:func:`~qwen_edu.alignment.data.sft_labels`). System and user tokens are still *read*
(they are in the context) but never *predicted*. Batches are right-padded; padding gets label
``-100`` and attention mask 0. The optimizer and the warm-up + cosine schedule are the pre-training
ones (:func:`qwen_edu.training.make_optimizer`, :func:`qwen_edu.training.make_scheduler`).

:func:`evaluate_chat` measures what SFT is for: given held-out prompts, does the model answer in the
expected format and stop with ``<|im_end|>`` (format-following rate), and is the answer right?
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from qwen_edu.alignment.core import generate_responses, pad_id_of
from qwen_edu.alignment.data import (
    SYSTEM_PROMPT,
    check_answer,
    encode_prompt,
    encode_sft,
    im_end_id,
    pad_batch,
)
from qwen_edu.training.loss import causal_lm_loss
from qwen_edu.training.optim import make_optimizer, make_scheduler

__all__ = ["SFTConfig", "sft_batches", "train_sft", "evaluate_chat", "progress_bar"]


@dataclass
class SFTConfig:
    steps: int = 150
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 128
    seed: int = 0


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar (auto: notebook widget or console), or a no-op when ``enabled`` is False."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


class _NoBar:
    def update(self, n: int = 1) -> None: ...

    def set_postfix(self, *args: Any, **kwargs: Any) -> None: ...

    def close(self) -> None: ...


def sft_batches(encoded: Sequence[Mapping[str, list[int]]], batch_size: int, pad_id: int, *, seed: int = 0
                ) -> Iterable[dict[str, torch.Tensor]]:
    """Endless right-padded batches ``{"input_ids", "attention_mask", "labels"}``, reshuffled each epoch."""
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            more = list(range(len(encoded)))
            rng.shuffle(more)
            order += more
        rows, order = order[:batch_size], order[batch_size:]
        yield pad_batch([encoded[i]["input_ids"] for i in rows], pad_id, side="right",
                        labels=[encoded[i]["labels"] for i in rows])


def train_sft(model: nn.Module, tokenizer: Any, conversations: Sequence[Mapping[str, Any]],
              config: SFTConfig | None = None, *, on_step: Callable[[dict[str, float]], None] | None = None,
              progress: bool = True, system_prompt: str | None = SYSTEM_PROMPT) -> list[dict[str, float]]:
    """Fine-tune ``model`` in place on ``conversations`` (``messages`` lists or ``{"messages": ...}``).

    Returns the history: one ``{"step", "loss", "lr", "tokens"}`` dict per optimizer step, also
    passed to ``on_step`` as it happens (for live plots).
    """
    config = config or SFTConfig()
    encoded = [encode_sft(tokenizer, c, max_length=config.max_length, system_prompt=system_prompt)
               for c in conversations]
    if not encoded:
        raise ValueError("no conversations to train on")
    device = next(model.parameters()).device
    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    scheduler = make_scheduler(optimizer, warmup_steps=config.warmup_steps, total_steps=config.steps)
    batches = sft_batches(encoded, config.batch_size, pad_id_of(tokenizer), seed=config.seed)
    history = []
    bar = progress_bar(config.steps, "SFT", progress)
    model.train()
    for step in range(config.steps):
        batch = next(batches)
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        logits = model(ids, attention_mask=mask).logits
        loss = causal_lm_loss(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        record = {"step": step, "loss": float(loss.detach()), "lr": optimizer.param_groups[0]["lr"],
                  "grad_norm": float(grad_norm), "tokens": int((labels[:, 1:] != -100).sum())}
        history.append(record)
        if on_step is not None:
            on_step(record)
        bar.update()
        bar.set_postfix(loss=f"{record['loss']:.3f}")
    bar.close()
    model.eval()
    return history


@torch.no_grad()
def evaluate_chat(model: nn.Module, tokenizer: Any, prompts: Sequence[Mapping[str, Any]], *,
                  max_new_tokens: int = 32, batch_size: int = 32, system_prompt: str | None = SYSTEM_PROMPT
                  ) -> dict[str, Any]:
    """Greedy answers to ``prompts`` (from :func:`~qwen_edu.alignment.data.make_prompts`), scored.

    Returns ``format_rate`` (the reply has its kind's shape *and* ends with ``<|im_end|>``),
    ``accuracy`` (right answer), per-kind ``accuracy_<kind>``, and ``samples`` (prompt, reply, ok).
    """
    pad, stop = pad_id_of(tokenizer), im_end_id(tokenizer)
    results = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids = [encode_prompt(tokenizer, p["prompt"], system_prompt) for p in chunk]
        out = generate_responses(model, ids, pad_id=pad, stop_id=stop, max_new_tokens=max_new_tokens)
        for p, reply, done in zip(chunk, out.texts(tokenizer), out.finished.tolist()):
            score = check_answer(p["kind"], reply, p.get("answer"))
            results.append({"question": p["prompt"][-1]["content"], "kind": p["kind"], "reply": reply,
                            "finished": bool(done), "format": score["format"] and bool(done),
                            "correct": score["correct"] and bool(done)})
    n = max(1, len(results))
    metrics: dict[str, Any] = {
        "format_rate": sum(r["format"] for r in results) / n,
        "accuracy": sum(r["correct"] for r in results) / n,
        "finished_rate": sum(r["finished"] for r in results) / n,
    }
    for kind in sorted({r["kind"] for r in results}):
        rows = [r for r in results if r["kind"] == kind]
        metrics[f"accuracy_{kind}"] = sum(r["correct"] for r in rows) / len(rows)
    metrics["samples"] = results
    return metrics


def config_dict(config: Any) -> dict[str, Any]:
    return asdict(config)
