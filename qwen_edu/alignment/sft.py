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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from qwen_edu.alignment.core import generate_responses, pad_id_of
from qwen_edu.alignment.data import (
    IGNORE_INDEX,
    SYSTEM_PROMPT,
    check_answer,
    encode_prompt,
    encode_sft,
    im_end_id,
    pad_batch,
)
from qwen_edu.training.data import PackedDataset, PackedSequences

__all__ = ["SFTConfig", "sft_dataset", "train_sft", "evaluate_chat", "progress_bar"]


@dataclass
class SFTConfig:
    steps: int = 150
    batch_size: int = 16
    micro_batch_size: int | None = None  # None: no gradient accumulation
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 128
    packing: bool = False
    precision: str = "auto"  # the chapter-3 trainer's: fp32 on a CPU, bf16/fp16 autocast on a GPU
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


def sft_dataset(tokenizer: Any, conversations: Sequence[Mapping[str, Any]], *, max_length: int = 128,
                packing: bool = False, system_prompt: str | None = SYSTEM_PROMPT) -> PackedDataset:
    """Conversations as fixed-length training rows ``{"input_ids", "labels"}`` for the chapter-3 trainer.

    * ``packing=False``: one conversation per row, right-padded to the longest one (at most
      ``max_length``; longer ones are truncated). Padding has label ``-100``; because attention is
      causal, no real token ever attends to the padding on its right, so no attention mask is needed.
    * ``packing=True``: conversations are concatenated into one stream cut into rows of exactly
      ``max_length`` tokens (no padding is wasted; a conversation may continue in the next row).
      A conversation then also *sees* the end of the
      previous one in its row -- the usual price of packing -- but every label outside an assistant
      reply is still ``-100``, so nothing but assistant tokens is learnt.
    """
    limit = None if packing else max_length
    encoded = [encode_sft(tokenizer, c, max_length=limit, system_prompt=system_prompt) for c in conversations]
    if not encoded:
        raise ValueError("no conversations to train on")
    pad = pad_id_of(tokenizer)
    if packing:
        ids = [t for e in encoded for t in e["input_ids"]]
        labels = [t for e in encoded for t in e["labels"]]
        rows = max(1, -(-len(ids) // max_length))
        width = max_length
        ids += [pad] * (rows * width - len(ids))
        labels += [IGNORE_INDEX] * (rows * width - len(labels))
        input_ids = torch.tensor(ids).view(rows, width)
        label_rows = torch.tensor(labels).view(rows, width)
    else:
        width = max(len(e["input_ids"]) for e in encoded)
        batch = pad_batch([e["input_ids"] for e in encoded], pad, side="right",
                          labels=[e["labels"] for e in encoded])
        input_ids, label_rows = batch["input_ids"], batch["labels"]
    return PackedDataset(PackedSequences(input_ids, label_rows))


def train_sft(model: nn.Module, tokenizer: Any, conversations: Sequence[Mapping[str, Any]],
              config: SFTConfig | None = None, *, on_step: Callable[[dict[str, float]], None] | None = None,
              progress: bool = True, system_prompt: str | None = SYSTEM_PROMPT) -> list[dict[str, float]]:
    """Fine-tune ``model`` in place on ``conversations`` with the chapter-3 :class:`~qwen_edu.training.Trainer`.

    The loss is :func:`~qwen_edu.training.causal_lm_loss` on :func:`sft_dataset` rows (assistant
    tokens only), summed over the targets of a whole optimizer step and divided by their number;
    AdamW with warm-up + cosine decay, gradient clipping, mixed precision on GPUs.
    Returns the history: one ``{"step", "loss", "lr", "grad_norm", "tokens"}`` dict per optimizer step
    (``step`` counts from 1); ``on_step`` receives each record as it happens (for live plots).
    """
    from qwen_edu.training import TrainConfig, Trainer

    config = config or SFTConfig()
    data = sft_dataset(tokenizer, conversations, max_length=config.max_length, packing=config.packing,
                       system_prompt=system_prompt)
    train_config = TrainConfig(
        max_steps=config.steps, batch_size=config.batch_size,
        micro_batch_size=config.micro_batch_size or config.batch_size, seq_len=data.seq_len, lr=config.lr,
        min_lr=config.lr * config.min_lr_ratio, warmup_steps=min(config.warmup_steps, config.steps),
        weight_decay=config.weight_decay, grad_clip=config.max_grad_norm, precision=config.precision,
        eval_every=0, seed=config.seed, progress=progress)
    trainer = Trainer(model, train_config, data, device=next(model.parameters()).device)
    history: list[dict[str, float]] = []
    if on_step is not None:
        def report(step: int, loss: float, lr: float) -> None:
            record = trainer.result.history[-1]
            on_step({"step": step, "loss": loss, "lr": lr, "grad_norm": record.grad_norm,
                     "tokens": record.tokens})
        trainer.on_step = report
    result = trainer.train()
    history = [{"step": r.step, "loss": r.loss, "lr": r.lr, "grad_norm": r.grad_norm, "tokens": r.tokens}
               for r in result.history]
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
