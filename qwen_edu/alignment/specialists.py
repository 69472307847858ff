"""Code and math specialists, trained the way the Qwen report describes them.

The Qwen report (Bai et al., 2023) builds two kinds of specialist from the base model, with
different recipes (:data:`SPECIALIST_RECIPES`):

* **Code-Qwen** continues *pre-training* the base model on code (plain next-token prediction on a
  large code corpus, no chat format); **Code-Qwen-Chat** is Code-Qwen after supervised fine-tuning
  on code conversations. Recipe ``"code"``: continued pre-training, then SFT.
* **Math-Qwen-Chat** is the base model after *math SFT*: supervised fine-tuning on math
  conversations, with the loss on the assistant's replies only -- no continued pre-training.
  Recipe ``"math"``: SFT only.

Here the domains are the book's generated Python functions and arithmetic (:mod:`qwen_edu.corpus`),
and each stage is measured on held-out data:

* **code**: the next-token loss on held-out functions (:func:`text_loss`; what continued
  pre-training improves) and the share of held-out coding requests whose reply is a Python function
  of the requested name and arguments (:func:`code_reply_ok`; what SFT adds);
* **math**: the share of held-out arithmetic questions answered right in the chat format
  (:func:`~qwen_edu.alignment.sft.evaluate_chat`), and, for the base model's kind of text, the
  few-shot completion accuracy :func:`arithmetic_accuracy`;
* both: the loss on ordinary stories, to see what specialising costs (forgetting). A little replay of
  stories during continued pre-training (``replay_fraction``) limits it.
"""

from __future__ import annotations

import ast
import copy
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qwen_edu.alignment.core import pad_id_of
from qwen_edu.alignment.data import IGNORE_INDEX, SYSTEM_PROMPT, pad_batch

__all__ = [
    "SPECIALIST_RECIPES",
    "SPECIALIST_NAMES",
    "SpecialistConfig",
    "arithmetic_problems",
    "arithmetic_accuracy",
    "text_loss",
    "continue_pretraining",
    "domain_corpus",
    "code_conversations",
    "math_conversations",
    "code_reply_ok",
    "code_chat_rate",
    "specialist_measures",
    "train_specialist",
]

#: The stages of each specialist, in order, as the Qwen report describes them.
SPECIALIST_RECIPES: dict[str, tuple[str, ...]] = {
    "code": ("continued_pretraining", "sft"),  # Code-Qwen, then Code-Qwen-Chat
    "math": ("sft",),  # Math-Qwen-Chat: math SFT on the base model
}

#: The model each stage produces, named as in the report.
SPECIALIST_NAMES: dict[str, tuple[str, ...]] = {
    "code": ("Code-Qwen", "Code-Qwen-Chat"),
    "math": ("Math-Qwen-Chat",),
}


@dataclass
class SpecialistConfig:
    """Sizes of the two stages (the book's choices, sized for a CPU; the report gives its own)."""

    steps: int = 150  # continued pre-training steps (code)
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
    sft_steps: int = 150  # supervised fine-tuning steps (both recipes)
    sft_batch_size: int = 16
    sft_lr: float = 1e-3
    num_conversations: int = 1000


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


def _system(system_prompt: str | None) -> list[dict[str, str]]:
    return [{"role": "system", "content": system_prompt}] if system_prompt is not None else []


def _signature(source: str) -> tuple[str, list[str], str]:
    """``(name, argument names, docstring)`` of the single function in ``source``."""
    fn = ast.parse(source).body[0]
    assert isinstance(fn, ast.FunctionDef)
    return fn.name, [a.arg for a in fn.args.args], ast.get_docstring(fn) or ""


def code_conversations(n: int, seed: int = 0, *, system_prompt: str | None = SYSTEM_PROMPT
                       ) -> list[dict[str, Any]]:
    """``n`` coding requests answered with a function from :func:`qwen_edu.corpus.generate_code`.

    The user names the function, its arguments and what it does (its docstring); the reply is the
    function's source. ``kind`` is ``"code"``; ``name`` and ``args`` say what a reply must define.
    """
    from qwen_edu.corpus import generate_code

    out = []
    for source in generate_code(n, seed=seed):
        name, args, doc = _signature(source)
        request = f"Write a Python function {name}({', '.join(args)}). {doc}"
        messages = [*_system(system_prompt), {"role": "user", "content": request},
                    {"role": "assistant", "content": source.rstrip()}]
        out.append({"messages": messages, "kind": "code", "answer": source.rstrip(), "name": name,
                    "args": args})
    return out


def math_conversations(n: int, seed: int = 0, *, max_value: int = 20,
                       system_prompt: str | None = SYSTEM_PROMPT) -> list[dict[str, Any]]:
    """``n`` arithmetic questions and their answers, the ``"math"`` conversations of chapter 5 only."""
    from qwen_edu.alignment.data import _math

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        question, answer, _ = _math(rng, max_value)
        messages = [*_system(system_prompt), {"role": "user", "content": question},
                    {"role": "assistant", "content": answer}]
        out.append({"messages": messages, "kind": "math", "answer": answer})
    return out


def code_reply_ok(reply: str, name: str, args: Sequence[str]) -> bool:
    """Does ``reply`` parse as Python and define ``name`` with exactly the arguments ``args``?

    The reply is parsed (:func:`ast.parse`), never executed.
    """
    try:
        tree = ast.parse(reply)
    except (SyntaxError, ValueError):
        return False
    return any(isinstance(node, ast.FunctionDef) and node.name == name
               and [a.arg for a in node.args.args] == list(args) for node in tree.body)


@torch.no_grad()
def code_chat_rate(model: nn.Module, tokenizer: Any, conversations: Sequence[dict[str, Any]], *,
                   max_new_tokens: int = 96, batch_size: int = 32,
                   system_prompt: str | None = SYSTEM_PROMPT) -> float:
    """Share of coding requests whose greedy reply stops and passes :func:`code_reply_ok`."""
    from qwen_edu.alignment.core import generate_responses
    from qwen_edu.alignment.data import encode_prompt, im_end_id

    pad, stop = pad_id_of(tokenizer), im_end_id(tokenizer)
    ok = 0
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start:start + batch_size]
        ids = [encode_prompt(tokenizer, c["messages"][:-1], system_prompt) for c in chunk]
        resp = generate_responses(model, ids, pad_id=pad, stop_id=stop, max_new_tokens=max_new_tokens)
        for c, reply, done in zip(chunk, resp.texts(tokenizer), resp.finished.tolist()):
            ok += bool(done) and code_reply_ok(reply, c["name"], c["args"])
    return ok / max(1, len(conversations))


def _prompts(conversations: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"prompt": c["messages"][:-1], "kind": c["kind"], "answer": c["answer"]} for c in conversations]


def specialist_measures(model: nn.Module, tokenizer: Any, domain: str, *, eval_size: int = 100
                        ) -> dict[str, float]:
    """The held-out measures of ``domain`` for ``model`` (any model: base, chat or specialist).

    ``"code"``: ``code_loss`` (nats per token on ``eval_size`` held-out functions, plain text) and
    ``code_chat_rate`` (:func:`code_chat_rate` on ``eval_size // 4`` held-out requests);
    ``"math"``: ``math_accuracy`` and ``format_rate`` on ``eval_size`` held-out arithmetic questions
    (:func:`~qwen_edu.alignment.sft.evaluate_chat`); both: ``story_loss`` on ``eval_size // 2``
    held-out stories (what specialising costs). The held-out seeds are never used for training.
    """
    from qwen_edu.alignment.sft import evaluate_chat
    from qwen_edu.corpus import generate_code, generate_stories

    if domain not in SPECIALIST_RECIPES:
        raise ValueError(f"unknown specialist domain {domain!r}; expected one of {sorted(SPECIALIST_RECIPES)}")
    stories = generate_stories(eval_size // 2, seed=10_007)
    if domain == "code":
        out = {"code_loss": text_loss(model, tokenizer, generate_code(eval_size, seed=10_009)),
               "code_chat_rate": code_chat_rate(model, tokenizer,
                                                code_conversations(max(1, eval_size // 4), seed=10_011))}
    else:
        chat = evaluate_chat(model, tokenizer, _prompts(math_conversations(eval_size, seed=10_009)),
                             max_new_tokens=16)
        out = {"math_accuracy": chat["accuracy"], "format_rate": chat["format_rate"]}
    out["story_loss"] = text_loss(model, tokenizer, stories)
    return out


def train_specialist(base: nn.Module, tokenizer: Any, domain: str, config: SpecialistConfig | None = None, *,
                     on_step: Callable[[dict[str, Any]], None] | None = None, progress: bool = True,
                     eval_size: int = 100) -> tuple[nn.Module, dict[str, Any]]:
    """Copy ``base`` and run the stages of ``SPECIALIST_RECIPES[domain]`` on it, measuring each.

    ``"code"``: continued pre-training on code documents (Code-Qwen), then SFT on coding requests
    (Code-Qwen-Chat). ``"math"``: SFT on arithmetic conversations (Math-Qwen-Chat). Returns
    ``(specialist, metrics)``: ``metrics["by_stage"]`` maps ``"base"`` and each stage to its
    :func:`specialist_measures`, ``<measure>_before``/``_after`` compare the base model with the
    specialist, and ``metrics["history"]`` holds each stage's training log. ``on_step`` gets every
    step's record with its ``"stage"``.
    """
    from qwen_edu.alignment.sft import SFTConfig, train_sft

    if domain not in SPECIALIST_RECIPES:
        raise ValueError(f"unknown specialist domain {domain!r}; expected one of {sorted(SPECIALIST_RECIPES)}")
    config = config or SpecialistConfig()
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(True)
    make = code_conversations if domain == "code" else math_conversations
    conversations = make(config.num_conversations, seed=config.seed)

    def log(stage: str) -> Callable[[dict[str, Any]], None] | None:
        return None if on_step is None else (lambda record: on_step({"stage": stage, **record}))

    by_stage = {"base": specialist_measures(model, tokenizer, domain, eval_size=eval_size)}
    history: dict[str, list[dict[str, float]]] = {}
    for stage in SPECIALIST_RECIPES[domain]:
        if stage == "continued_pretraining":
            docs = domain_corpus(domain, config.num_documents, config.seed, replay_fraction=config.replay_fraction)
            history[stage] = continue_pretraining(model, tokenizer, docs, config, on_step=log(stage),
                                                  progress=progress)
        else:
            longest = max(len(tokenizer.apply_chat_template(c["messages"]).ids) for c in conversations)
            sft = SFTConfig(steps=config.sft_steps, batch_size=config.sft_batch_size, lr=config.sft_lr,
                            warmup_steps=config.warmup_steps, max_length=longest, precision=config.precision,
                            seed=config.seed)
            history[stage] = train_sft(model, tokenizer, conversations, sft, on_step=log(stage), progress=progress)
        for p in model.parameters():
            p.requires_grad_(True)
        by_stage[stage] = specialist_measures(model, tokenizer, domain, eval_size=eval_size)
    last = by_stage[SPECIALIST_RECIPES[domain][-1]]
    metrics: dict[str, Any] = {"recipe": SPECIALIST_RECIPES[domain], "names": SPECIALIST_NAMES[domain],
                               "by_stage": by_stage, "history": history}
    metrics.update({f"{k}_before": v for k, v in by_stage["base"].items()})
    metrics.update({f"{k}_after": v for k, v in last.items()})
    return model, metrics
