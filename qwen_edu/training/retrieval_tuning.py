"""Teach the book's base model passkey retrieval at its own training length; ship the result.

The base model (chapter 3) was trained on 256-token rows of stories and has never seen a question
about a fact stated earlier. A short fine-tune on :func:`~qwen_edu.corpus.passkey.passkey_training_rows`
(rows of at most 256 tokens, the needle at a uniform random depth) teaches it the *format*: find
"The secret code is ..." and copy the code. Every row is at most the training length, so what the
context-extension methods of chapter 9 then stretch to 8x that length is a real long-range ability
learnt at short range, not a behaviour the model was shown at long range.

``python -m qwen_edu.training.retrieval_tuning --out qwen_edu/assets/retrieval_model`` rebuilds the
shipped model (seed 0; bit for bit on the same machine and thread count).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "RetrievalTuningConfig",
    "retrieval_loss",
    "tune_for_retrieval",
    "retrieval_model_path",
    "build_retrieval_model",
]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


@dataclass
class RetrievalTuningConfig:
    """The fine-tune's settings (the book's choices, sized for a 2-core CPU)."""

    steps: int = 250
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    max_length: int = 256
    min_length: int = 32
    answer_weight: float = 5.0  # loss = LM loss (mean over all targets) + answer_weight * mean over the answer
    seed: int = 0


def retrieval_model_path() -> Path:
    """The shipped retrieval-tuned model (``qwen_edu/assets/retrieval_model``)."""
    path = Path(str(files("qwen_edu") / "assets" / "retrieval_model"))
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} holds no model; build it with "
                                "`python -m qwen_edu.training.retrieval_tuning --out qwen_edu/assets/retrieval_model`")
    return path


def _batch(rows: list[dict[str, list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to one length: padding comes after every real token, so causal attention never sees it."""
    from qwen_edu.training.data import IGNORE_INDEX

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    answer = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        answer[i, :n] = torch.tensor(row["answer_mask"], dtype=torch.bool)
    return ids, labels, answer


def retrieval_loss(logits: torch.Tensor, labels: torch.Tensor, answer_mask: torch.Tensor,
                   answer_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, answer_loss)``: the LM loss over every target plus ``answer_weight`` times the mean loss on
    the answer's tokens. They are 3 of ~150 targets per row; without the extra weight their signal drowns
    in the filler's."""
    from qwen_edu.training.data import IGNORE_INDEX
    from qwen_edu.training.loss import causal_lm_loss

    lm = causal_lm_loss(logits, labels)
    answer_labels = labels.masked_fill(~answer_mask, IGNORE_INDEX)
    answer = causal_lm_loss(logits, answer_labels)
    return lm + answer_weight * answer, answer


def tune_for_retrieval(model: nn.Module, tokenizer: Any, config: RetrievalTuningConfig | None = None, *,
                       progress: bool = True) -> list[dict[str, float]]:
    """Fine-tune ``model`` in place on fresh passkey rows (no row is seen twice); returns per-step logs."""
    from qwen_edu.corpus.passkey import passkey_training_rows
    from qwen_edu.training.optim import make_optimizer, make_scheduler

    config = config or RetrievalTuningConfig()
    rows = passkey_training_rows(tokenizer, config.steps * config.batch_size, config.max_length, seed=config.seed,
                                 min_length=config.min_length)
    device = next(model.parameters()).device
    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    scheduler = make_scheduler(optimizer, warmup_steps=config.warmup_steps, total_steps=config.steps,
                               min_lr_ratio=config.min_lr_ratio)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, desc="retrieval tuning")
    history = []
    model.train()
    for step in range(config.steps):
        ids, labels, answer = _batch(rows[step * config.batch_size : (step + 1) * config.batch_size],
                                     tokenizer.eos_id)
        loss, answer_loss = retrieval_loss(model(ids.to(device)).logits, labels.to(device), answer.to(device),
                                           config.answer_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        history.append({"step": step, "loss": float(loss.detach()), "answer_loss": float(answer_loss.detach()),
                        "lr": scheduler.get_last_lr()[0]})
        if bar is not None:
            bar.update()
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", answer=f"{history[-1]['answer_loss']:.3f}")
    if bar is not None:
        bar.close()
    model.eval()
    return history


def _held_out_loss(model: nn.Module, tokenizer: Any, length: int, seed: int = 4321) -> float:
    """Mean next-token loss on packed held-out stories (a corpus seed neither model trained on)."""
    from qwen_edu.context_extension import per_position_nll
    from qwen_edu.corpus import generate_stories
    from qwen_edu.training import pack_sequences, tokenize_documents

    docs = tokenize_documents(tokenizer, generate_stories(120, seed=seed))
    ids = pack_sequences(docs, length, tokenizer.eos_id, drop_last=True).input_ids[:16]
    return float(per_position_nll(model, ids).mean())


def build_retrieval_model(out: str | Path, config: RetrievalTuningConfig | None = None) -> dict[str, Any]:
    """Tune the shipped base model, evaluate it, and write the folder (weights, tokenizer, README, log)."""
    import qwen_edu
    from qwen_edu.checkpoint import save_model
    from qwen_edu.evaluation.retrieval import retrieval_grid
    from qwen_edu.training import base_model_path

    config = config or RetrievalTuningConfig()
    out = Path(out)
    base_dir = base_model_path()
    tokenizer = qwen_edu.load_tokenizer(base_dir)
    torch.manual_seed(config.seed)
    model = qwen_edu.load_model(base_dir, dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(True)
    base = qwen_edu.load_model(base_dir, dtype=torch.float32)
    start = time.perf_counter()
    history = tune_for_retrieval(model, tokenizer, config)
    seconds = time.perf_counter() - start
    save_model(model.to(torch.bfloat16), out)
    for name in _TOKENIZER_FILES:
        shutil.copy(base_dir / name, out / name)
    shipped = qwen_edu.load_model(out, dtype=torch.float32)  # evaluate what users load (bf16 weights)
    lengths, depths = [64, 128, 192, 256], [0.0, 0.25, 0.5, 0.75, 1.0]
    grid = retrieval_grid(shipped, tokenizer, lengths, depths, repeats=8, seed=2024)
    base_grid = retrieval_grid(base, tokenizer, lengths, depths, repeats=8, seed=2024)
    T = model.config.max_position_embeddings
    facts = {
        "command": f"python -m qwen_edu.training.retrieval_tuning --out {out}",
        "config": asdict(config),
        "seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "final_loss": round(sum(h["loss"] for h in history[-20:]) / 20, 4),
        "final_answer_loss": round(sum(h["answer_loss"] for h in history[-20:]) / 20, 4),
        "retrieval_lengths": lengths,
        "retrieval_depths": depths,
        "retrieval_accuracy": [[round(float(a), 4) for a in row] for row in grid.accuracy],
        "retrieval_overall": round(grid.overall(), 4),
        "base_retrieval_overall": round(base_grid.overall(), 4),
        "heldout_story_loss": round(_held_out_loss(shipped, tokenizer, T), 4),
        "base_heldout_story_loss": round(_held_out_loss(base, tokenizer, T), 4),
        "loss_every_20_steps": [round(h["loss"], 4) for h in history[::20]],
        "answer_loss_every_20_steps": [round(h["answer_loss"], 4) for h in history[::20]],
    }
    (out / "retrieval_log.json").write_text(json.dumps(facts, indent=2) + "\n")
    (out / "README.md").write_text(model_card(facts, T))
    return facts


def model_card(facts: dict[str, Any], training_length: int) -> str:
    """The README of the shipped model, written from its ``retrieval_log.json`` facts."""
    from qwen_edu.evaluation.retrieval import RetrievalGrid

    c = facts["config"]
    table = RetrievalGrid(facts["retrieval_lengths"], facts["retrieval_depths"],
                          torch.tensor(facts["retrieval_accuracy"]), repeats=8).table()
    return f"""# qwen-edu retrieval model

The book's base model (`qwen_edu/assets/base_model`, chapter 3) fine-tuned to answer passkey questions:
a story haystack with one sentence "The secret code is WORD D." (one of 40 words and a digit) at a random
depth, and at the end "What is the secret code? The secret code is" followed by the code. Chapter 9 extends it
far beyond its training length with YaRN and Dual Chunk Attention.

Every training row is at most {c["max_length"]} tokens, no longer than the base model's training length
({training_length}): the model learns the *format* at short range, and whatever it retrieves at longer range
comes from the context-extension method, not from long training data.

| | |
|---|---|
| architecture | the base model's (Qwen2, 4 layers, 1.87M parameters), weights in bfloat16 |
| training | {c["steps"]} steps x {c["batch_size"]} fresh rows of {c["min_length"]}-{c["max_length"]} tokens, AdamW lr {c["lr"]} (warm-up {c["warmup_steps"]}, cosine to {c["min_lr_ratio"]}x), weight decay {c["weight_decay"]}, seed {c["seed"]} |
| loss | next-token loss on every token except the needle's random code, plus {c["answer_weight"]} x the mean loss on the answer |
| time | {facts["seconds"]:.0f} s on {facts["threads"]} thread(s), torch {facts["torch"]} (a 2-core CPU shared with other jobs) |
| retrieval at <= {training_length} tokens | **{facts["retrieval_overall"]:.0%}** exact match (the base model: {facts["base_retrieval_overall"]:.0%}) |
| held-out story loss at {training_length} tokens | {facts["heldout_story_loss"]:.4f} nats/token (the base model: {facts["base_heldout_story_loss"]:.4f}) |

Exact match per context length and needle depth (8 samples per cell, the shipped bf16 weights):

```text
{table}
```

## Reproduce

```bash
{facts["command"]}
```

Seed {c["seed"]} fixes the data (`qwen_edu.corpus.passkey.passkey_training_rows`) and the order; the same
machine and thread count repeat the run bit for bit. `retrieval_log.json` holds the numbers above and the
loss curve.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="qwen_edu/assets/retrieval_model")
    parser.add_argument("--steps", type=int, default=RetrievalTuningConfig.steps)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (changes neither the data nor the schedule)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    facts = build_retrieval_model(args.out, RetrievalTuningConfig(steps=args.steps))
    print(json.dumps({k: v for k, v in facts.items() if not k.endswith("steps")}, indent=2))


if __name__ == "__main__":
    main()
