"""Hybrid thinking on the book's chat model: one model, a thinking mode and a non-thinking mode.

Qwen3 folds a reasoning model and a chat model into one (the Qwen3 report's "thinking mode fusion"):
the same weights answer either after a ``<think>`` block of worked reasoning or at once, behind an
empty ``<think>\\n\\n</think>\\n\\n``. The user switches with ``/think`` or ``/no_think`` in the message
(or the chat template's ``enable_thinking``), and a *thinking budget* caps how long the reasoning may
run: at the cap the block is closed by force and the model must answer from what it has.

The book reproduces that on its 1.9M-parameter SFT model (``qwen_edu/assets/sft_model``):

* :func:`make_problem` -- sums of 2 to 4 small numbers (``"What is 7 + 12 + 5?"``). The base model
  learnt two-number sums (``12 + 35 = 47`` lines), so the worked reasoning is a chain of those:
  ``7 + 12 = 19.`` / ``19 + 5 = 24.``; the answer is ``7 + 12 + 5 = 24.``. The evaluation uses
  held-out sums of 3 or 4 numbers (:func:`problem_set`);
* :func:`thinking_conversations` -- every problem once in each mode, in the Qwen3 chat format
  (:mod:`qwen_edu.tokenizer.qwen3_chat`): ``/think`` with the steps in the think block, ``/no_think``
  with an empty block;
* :func:`add_think_tokens` -- the book's tokenizer gets ``<think>`` and ``</think>`` as two new
  tokens in unused embedding rows (1477 and 1478 of 1536), not "special", as in Qwen's tokenizer;
* :func:`train_thinking` -- SFT on both formats (loss on the think block, the answer and ``<|im_end|>``);
* :func:`solve` -- greedy answers with thinking on or off, and with a budget; :func:`evaluate_thinking`
  scores accuracy and counts the generated tokens.

The fine-tuned model ships in ``qwen_edu/assets/thinking_model``, built by::

    python -m qwen_edu.alignment.thinking --out qwen_edu/assets/thinking_model

The problem sizes, the data mix, the step count and the learning rate are the book's choices.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qwen_edu.alignment.core import generate_responses, pad_id_of
from qwen_edu.alignment.data import pad_batch, sft_labels
from qwen_edu.tokenizer.core import Tokenizer
from qwen_edu.tokenizer.qwen3_chat import THINK_END, THINK_START, encode_qwen3, split_thinking
from qwen_edu.training.data import PackedDataset, PackedSequences

__all__ = ["ThinkingConfig", "make_problem", "make_problems", "problem_set", "thinking_conversations", "add_think_tokens",
           "thinking_dataset", "train_thinking", "solve", "evaluate_thinking", "thinking_model_path",
           "build_thinking_model"]

THINK_FLAG, NO_THINK_FLAG = "/think", "/no_think"


@dataclass(frozen=True)
class ThinkingConfig:
    """The book's fine-tuning settings."""

    problems: int = 3000  # each one in both formats
    min_terms: int = 2  # two-number sums train the single reasoning step too
    max_terms: int = 4
    max_value: int = 20
    steps: int = 800
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 30
    seed: int = 0
    eval_problems: int = 200
    eval_min_terms: int = 3  # held-out problems that need 2 or 3 reasoning steps
    eval_seed: int = 12345
    budgets: tuple[int, ...] = (4, 8, 12, 16, 20, 24, 32)


def make_problem(rng: random.Random, terms: int, max_value: int = 20) -> dict[str, Any]:
    """A sum of ``terms`` numbers in ``1..max_value``: question, reasoning steps, answer and value."""
    numbers = [rng.randint(1, max_value) for _ in range(terms)]
    steps, total = [], numbers[0]
    for n in numbers[1:]:
        steps.append(f"{total} + {n} = {total + n}.")
        total += n
    expression = " + ".join(str(n) for n in numbers)
    return {"question": f"What is {expression}?", "steps": steps, "answer": f"{expression} = {total}.",
            "value": total, "terms": terms}


def make_problems(n: int, seed: int = 0, min_terms: int = 3, max_terms: int = 4, max_value: int = 20
                  ) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [make_problem(rng, rng.randint(min_terms, max_terms), max_value) for _ in range(n)]


def problem_set(n: int, config: ThinkingConfig = ThinkingConfig()) -> list[dict[str, Any]]:
    """The held-out problems of the evaluation (``eval_seed``; 3 or 4 numbers by default)."""
    return make_problems(n, config.eval_seed, config.eval_min_terms, config.max_terms, config.max_value)


def _messages(question: str, thinking: bool, system_prompt: str | None = None) -> list[dict[str, str]]:
    system = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    return system + [{"role": "user", "content": f"{question} {THINK_FLAG if thinking else NO_THINK_FLAG}"}]


def thinking_conversations(problems: Sequence[Mapping[str, Any]]) -> list[list[dict[str, Any]]]:
    """Each problem twice: thinking (steps in ``reasoning_content``) and non-thinking (no reasoning,
    which the Qwen3 template renders as an empty think block)."""
    out = []
    for p in problems:
        out.append(_messages(p["question"], True)
                   + [{"role": "assistant", "reasoning_content": "\n".join(p["steps"]), "content": p["answer"]}])
        out.append(_messages(p["question"], False) + [{"role": "assistant", "content": p["answer"]}])
    return out


def add_think_tokens(tokenizer: Tokenizer, embedding_rows: int | None = None) -> Tokenizer:
    """A copy of ``tokenizer`` with ``<think>`` and ``</think>`` added as the next two ids (not control
    tokens: decoding keeps them, as in Qwen's tokenizer). ``embedding_rows`` checks they fit the model."""
    specials = tokenizer.special_tokens
    if THINK_START in specials and THINK_END in specials:
        return tokenizer
    start = tokenizer.vocab_size
    if embedding_rows is not None and start + 2 > embedding_rows:
        raise ValueError(f"the model has {embedding_rows} embedding rows; ids {start} and {start + 1} do not fit")
    specials.update({THINK_START: start, THINK_END: start + 1})
    return Tokenizer(tokenizer.model, specials, pattern=tokenizer.pattern, nfc=tokenizer.nfc,
                     control_tokens=tokenizer.control_tokens, eos_token=tokenizer.eos_token,
                     name=f"{tokenizer.name}+think")


def thinking_dataset(tokenizer: Tokenizer, conversations: Sequence[Sequence[Mapping[str, Any]]]) -> PackedDataset:
    """Conversations as right-padded rows, labels on what the assistant writes (``encode_qwen3``'s mask)."""
    encoded = [encode_qwen3(tokenizer, c) for c in conversations]
    batch = pad_batch([e.ids for e in encoded], pad_id_of(tokenizer), side="right",
                      labels=[sft_labels(e) for e in encoded])
    return PackedDataset(PackedSequences(batch["input_ids"], batch["labels"]))


def train_thinking(model: nn.Module, tokenizer: Tokenizer, config: ThinkingConfig = ThinkingConfig(), *,
                   progress: bool = True) -> list[float]:
    """Fine-tune ``model`` in place on both formats with the chapter-3 trainer; returns the losses."""
    from qwen_edu.training import TrainConfig, Trainer

    problems = make_problems(config.problems, config.seed, config.min_terms, config.max_terms, config.max_value)
    data = thinking_dataset(tokenizer, thinking_conversations(problems))
    train = TrainConfig(max_steps=config.steps, batch_size=config.batch_size, micro_batch_size=config.batch_size,
                        seq_len=data.packed.input_ids.shape[1], lr=config.lr, min_lr=config.min_lr,
                        warmup_steps=config.warmup_steps, weight_decay=0.0, precision="fp32", eval_every=0,
                        seed=config.seed, progress=progress)
    result = Trainer(model, train, data, device=next(model.parameters()).device).train()
    model.eval()
    return result.losses


def _answer_value(text: str) -> int | None:
    match = re.search(r"=\s*(-?\d+)\s*\.?\s*$", text.strip())
    return int(match.group(1)) if match else None


@torch.no_grad()
def solve(model: nn.Module, tokenizer: Tokenizer, questions: Sequence[str], *, thinking: bool,
          budget: int | None = None, max_answer_tokens: int = 32, max_thinking_tokens: int = 96
          ) -> list[dict[str, Any]]:
    """Greedy replies to ``questions``. With ``thinking``, the model writes its think block first; a
    ``budget`` of ``b`` tokens stops the reasoning after ``b`` tokens and closes the block
    (``\\n</think>\\n\\n``) so that the model answers from what it has. Returns per question the
    reasoning, the answer, the tokens generated by the model, and whether the budget cut in."""
    end_id, im_end, pad = tokenizer.special_tokens[THINK_END], tokenizer.im_end_id, pad_id_of(tokenizer)
    prompts = [encode_qwen3(tokenizer, _messages(q, thinking), add_generation_prompt=True,
                            enable_thinking=thinking).ids for q in questions]
    thought: list[list[int]] = [[] for _ in questions]  # the think block as it stands before the answer
    generated = [0] * len(questions)  # of which the model wrote these many tokens
    cut = [False] * len(questions)
    if thinking:
        limit = max_thinking_tokens if budget is None else budget
        out = generate_responses(model, prompts, pad_id=pad, stop_id=end_id, max_new_tokens=limit)
        mask = out.response_mask[:, out.prompt_length:].tolist()
        for i, row in enumerate(out.response_ids.tolist()):
            thought[i] = [t for t, m in zip(row, mask[i], strict=True) if m]
            generated[i] = len(thought[i])
            if not thought[i] or thought[i][-1] != end_id:  # the budget ran out: close the block by force
                cut[i] = True
                thought[i] = thought[i] + tokenizer.encode("\n") + [end_id]
            thought[i] = thought[i] + tokenizer.encode("\n\n")  # "...\n</think>\n\n" then the answer
    answers = generate_responses(model, [p + t for p, t in zip(prompts, thought, strict=True)], pad_id=pad,
                                 stop_id=im_end, max_new_tokens=max_answer_tokens)
    results = []
    for i, (text, n, done) in enumerate(zip(answers.texts(tokenizer), answers.response_lengths.tolist(),
                                            answers.finished.tolist(), strict=True)):
        reasoning = split_thinking(tokenizer.decode(thought[i]))[0] if thinking else ""
        results.append({"question": questions[i], "reasoning": reasoning, "answer": text.strip(),
                        "finished": bool(done), "budget_cut": cut[i], "tokens": generated[i] + int(n)})
    return results


def evaluate_thinking(model: nn.Module, tokenizer: Tokenizer, problems: Sequence[Mapping[str, Any]], *,
                      thinking: bool, budget: int | None = None) -> dict[str, Any]:
    """Accuracy (the number after the answer's ``=``) and mean generated tokens per problem."""
    replies = solve(model, tokenizer, [p["question"] for p in problems], thinking=thinking, budget=budget)
    correct = [r["finished"] and _answer_value(r["answer"]) == p["value"]
               for r, p in zip(replies, problems, strict=True)]
    n = max(1, len(problems))
    return {"accuracy": sum(correct) / n, "mean_tokens": sum(r["tokens"] for r in replies) / n,
            "budget_cut_rate": sum(r["budget_cut"] for r in replies) / n,
            "replies": [{**r, "correct": ok} for r, ok in zip(replies, correct, strict=True)]}


# ---------------------------------------------------------------------------------------------------
# The shipped model
# ---------------------------------------------------------------------------------------------------
def thinking_model_path() -> Path:
    """The shipped thinking fine-tune (``qwen_edu/assets/thinking_model``)."""
    path = Path(str(files("qwen_edu") / "assets" / "thinking_model"))
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} holds no model; build it with "
                                "`python -m qwen_edu.alignment.thinking --out qwen_edu/assets/thinking_model`")
    return path


def build_thinking_model(out: str | Path, config: ThinkingConfig = ThinkingConfig()) -> dict[str, Any]:
    """Fine-tune the shipped SFT model on both formats; save model, tokenizer and a log into ``out``."""
    import qwen_edu
    from qwen_edu.alignment.assets import sft_model_path
    from qwen_edu.checkpoint import save_model
    from qwen_edu.tokenizer import save_pretrained

    torch.manual_seed(config.seed)
    source = sft_model_path()
    model = qwen_edu.load_model(source, dtype="float32")
    tokenizer = add_think_tokens(qwen_edu.load_tokenizer(source), model.config.vocab_size)
    problems = problem_set(config.eval_problems, config)
    before = {mode: evaluate_thinking(model, tokenizer, problems, thinking=mode == "thinking")
              for mode in ("thinking", "no_thinking")}
    start = time.perf_counter()
    losses = train_thinking(model, tokenizer, config)
    seconds = time.perf_counter() - start
    after = {mode: evaluate_thinking(model, tokenizer, problems, thinking=mode == "thinking")
             for mode in ("thinking", "no_thinking")}
    after.update({f"budget_{b}": evaluate_thinking(model, tokenizer, problems, thinking=True, budget=b)
                  for b in config.budgets})
    folder = Path(out)
    save_model(model.to(torch.bfloat16), folder)
    save_pretrained(tokenizer, folder)
    log = {"command": f"python -m qwen_edu.alignment.thinking --out {out}", "config": asdict(config),
           "train_seconds": round(seconds, 1), "final_loss": losses[-1], "losses": losses[::10],
           **{f"{stage}_{mode}": {k: v for k, v in result.items() if k != "replies"}
              for stage, results in (("before", before), ("after", after)) for mode, result in results.items()}}
    (folder / "thinking_log.json").write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")
    return log


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="fine-tune the book's chat model for hybrid thinking")
    p.add_argument("--out", required=True, help="output folder (the shipped one: qwen_edu/assets/thinking_model)")
    p.add_argument("--steps", type=int, default=ThinkingConfig.steps)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    log = build_thinking_model(args.out, ThinkingConfig(steps=args.steps))
    print(json.dumps({k: v for k, v in log.items() if k != "losses"}, indent=1))


if __name__ == "__main__":
    main()
