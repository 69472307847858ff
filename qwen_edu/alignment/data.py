"""Alignment data: seeded chat conversations, preference pairs, and how both become tensors.

Everything is generated from rules (no downloads), in the world of the base model's stories:

* :func:`make_conversations` -- supervised fine-tuning data in the ``messages`` format
  (``[{"role": "system"|"user"|"assistant", "content": ...}, ...]``): arithmetic questions,
  questions about a character described in the prompt, and polite small talk, some multi-turn.
  Each example also records its ``kind`` and the expected ``answer`` (for scoring generations).
* :func:`make_comparisons` -- preference pairs ``{"prompt": messages, "chosen": str, "rejected": str}``
  whose preference is *measurable*: the chosen reply is the correct sum, the right name, the polite
  answer; the rejected one is a wrong sum, the wrong name, a rude answer.
* :func:`make_pmp_pairs` -- plain-text comparisons mined from the pre-training corpus without any
  labelling (the true next sentence of a story against one from another story, a right sum against a
  wrong one, a function's own body against another's): data for preference-model pre-training.

Tensors:

* :func:`sft_labels` turns a :class:`~qwen_edu.tokenizer.ChatEncoding` into labels: the token id on
  assistant tokens (content and closing ``<|im_end|>``), ``-100`` everywhere else;
* :func:`pad_batch` pads a list of id lists on the right (training) or on the left (generation)
  and returns the attention mask;
* :func:`encode_pair` renders a prompt with the generation header ``<|im_start|>assistant\\n`` and
  appends a reply plus ``<|im_end|>``; ``response_mask`` marks the reply tokens.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from qwen_edu.tokenizer.chat import IM_END, ChatEncoding, validate_messages

__all__ = [
    "IGNORE_INDEX",
    "SYSTEM_PROMPT",
    "make_conversations",
    "make_comparisons",
    "make_pmp_pairs",
    "make_prompts",
    "validate_conversation",
    "validate_pair",
    "sft_labels",
    "encode_sft",
    "pad_batch",
    "encode_prompt",
    "encode_pair",
    "encode_text_pair",
    "collate_pairs",
    "check_answer",
    "parse_number",
    "im_end_id",
]

IGNORE_INDEX = -100
SYSTEM_PROMPT = "You are a helpful assistant."

# --- the little world ------------------------------------------------------------------------------
_NAMES = ["Lily", "Mia", "Emma", "Sara", "Anna", "Zoe", "Lucy", "Tom", "Ben", "Sam", "Max", "Leo", "Jack", "Finn"]
_ANIMALS = ["rabbit", "cat", "dog", "bear", "fox", "duck", "mouse", "bird"]
_TRAITS = ["kind", "brave", "curious", "shy", "happy", "clever", "funny", "gentle"]
_PLACES = ["park", "forest", "beach", "garden", "farm", "school", "river", "town"]
_THINGS = ["ball", "kite", "hat", "book", "box", "drum", "boat", "doll", "cup", "map"]
_COLORS = ["red", "blue", "green", "yellow", "pink", "purple", "orange"]

_MATH_QUESTIONS = ["What is {a} {op} {b}?", "How much is {a} {op} {b}?", "Please compute {a} {op} {b}.",
                   "Can you tell me what {a} {op} {b} is?"]
_GREETINGS = [("Hello!", "Hello! How can I help you today?"),
              ("Hi there!", "Hi! How can I help you today?"),
              ("Good morning!", "Good morning! How can I help you today?")]
_THANKS = [("Thank you!", "You are welcome! I am glad I could help."),
           ("Thanks a lot.", "You are welcome! I am glad I could help."),
           ("That was helpful, thanks.", "You are welcome! I am glad I could help.")]
_HELP = [("Can you help me?", "Of course! I am happy to help. What do you need?"),
         ("I have a question.", "Of course! I am happy to help. What is your question?"),
         ("Will you help me with my homework?", "Of course! I am happy to help. What is the homework about?")]
_RUDE = ["No. Go away.", "I do not care.", "Figure it out yourself.", "That is a silly thing to say.",
         "Stop asking me things."]

_ANSWER_FORMATS = {
    "math": re.compile(r"^\d+ [-+*] \d+ = -?\d+\.$"),
    "qa": re.compile(r"^[A-Z][a-z]+ (is|has|lives|likes) .+\.$"),
    "chat": re.compile(r"^(Hello|Hi|Good morning|You are welcome|Of course)! .+[.?!]$"),
}


def _math(rng: random.Random, max_value: int) -> tuple[str, str, int]:
    """A question, the reference answer sentence and the numeric result."""
    op = rng.choice("+-")
    a, b = rng.randint(0, max_value), rng.randint(0, max_value)
    if op == "-" and b > a:
        a, b = b, a
    value = a + b if op == "+" else a - b
    question = rng.choice(_MATH_QUESTIONS).format(a=a, op=op, b=b)
    return question, f"{a} {op} {b} = {value}.", value


def _character(rng: random.Random) -> dict[str, str]:
    animal = rng.random() < 0.4
    return {"name": rng.choice(_NAMES), "kind": rng.choice(_ANIMALS) if animal else rng.choice(["girl", "boy"]),
            "trait": rng.choice(_TRAITS), "place": rng.choice(_PLACES),
            "thing": f"{rng.choice(_COLORS)} {rng.choice(_THINGS)}"}


def _describe(c: dict[str, str]) -> str:
    article = "an" if c["trait"][0] in "aeiou" else "a"
    return (f"{c['name']} is {article} {c['trait']} {c['kind']} who lives near the {c['place']}. "
            f"{c['name']} has a {c['thing']}.")


_QA = [  # (question, answer template)
    ("Who has the {thing}?", "{name} has the {thing}."),
    ("Where does {name} live?", "{name} lives near the {place}."),
    ("What does {name} have?", "{name} has a {thing}."),
    ("What is {name} like?", "{name} is {trait}."),
]


def _qa(rng: random.Random) -> tuple[str, str, str, dict[str, str]]:
    """(context + question, correct answer, a wrong answer of the same shape, the character)."""
    c = _character(rng)
    question, answer = rng.choice(_QA)
    other = dict(c)
    while other == c:  # change one fact, so the wrong answer differs
        key = rng.choice(["name", "place", "thing", "trait"])
        other[key] = {"name": rng.choice(_NAMES), "place": rng.choice(_PLACES),
                      "thing": f"{rng.choice(_COLORS)} {rng.choice(_THINGS)}", "trait": rng.choice(_TRAITS)}[key]
    wrong = answer.format(**other)
    if wrong == answer.format(**c):
        wrong = answer.format(**{**c, "name": next(n for n in _NAMES if n != c["name"])})
        if wrong == answer.format(**c):  # the answer does not mention the name: change the thing instead
            wrong = answer.format(**{**c, "thing": "lost " + c["thing"], "place": "old " + c["place"],
                                     "trait": "not " + c["trait"]})
    return f"{_describe(c)} {question.format(**c)}", answer.format(**c), wrong, c


def _chat(rng: random.Random) -> tuple[str, str]:
    return rng.choice(rng.choice([_GREETINGS, _THANKS, _HELP]))


def make_conversations(n: int, seed: int = 0, *, max_value: int = 20, multi_turn: float = 0.3,
                       system_prompt: str | None = SYSTEM_PROMPT) -> list[dict[str, Any]]:
    """``n`` conversations ``{"messages": [...], "kind": "math"|"qa"|"chat", "answer": str}``.

    ``kind`` and ``answer`` describe the *last* assistant turn (what :func:`check_answer` scores).
    About ``multi_turn`` of them start with a greeting exchange before the real question.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rng.choice(["math", "math", "qa", "chat"])
        messages: list[dict[str, str]] = []
        if system_prompt is not None:
            messages.append({"role": "system", "content": system_prompt})
        if rng.random() < multi_turn:
            hello, reply = rng.choice(_GREETINGS)
            messages += [{"role": "user", "content": hello}, {"role": "assistant", "content": reply}]
        if kind == "math":
            question, answer, _ = _math(rng, max_value)
        elif kind == "qa":
            question, answer, _, _ = _qa(rng)
        else:
            question, answer = _chat(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        out.append({"messages": messages, "kind": kind, "answer": answer})
    return out


def _wrong_number(rng: random.Random, value: int) -> int:
    return max(0, value + rng.choice([-10, -2, -1, 1, 2, 10])) if value > 10 else value + rng.randint(1, 5)


def make_comparisons(n: int, seed: int = 0, *, max_value: int = 20,
                     system_prompt: str | None = SYSTEM_PROMPT) -> list[dict[str, Any]]:
    """``n`` preference pairs ``{"prompt": messages, "chosen": str, "rejected": str, "kind": str}``.

    * ``math``: chosen ``"3 + 4 = 7."``, rejected the same sentence with a wrong result;
    * ``qa``: chosen states the fact from the prompt, rejected changes one detail;
    * ``chat``: chosen is the polite reply, rejected a rude one.
    """
    rng = random.Random(seed)
    system = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    out = []
    for _ in range(n):
        kind = rng.choice(["math", "math", "qa", "chat"])
        if kind == "math":
            question, chosen, value = _math(rng, max_value)
            wrong = _wrong_number(rng, value)
            if wrong == value:
                wrong = value + 1
            rejected = chosen.rsplit("=", 1)[0] + f"= {wrong}."
        elif kind == "qa":
            question, chosen, rejected, _ = _qa(rng)
        else:
            question, chosen = _chat(rng)
            rejected = rng.choice(_RUDE)
        pair = {"prompt": [*system, {"role": "user", "content": question}], "chosen": chosen,
                "rejected": rejected, "kind": kind}
        validate_pair(pair)
        out.append(pair)
    return out


def _sentences(text: str) -> list[str]:
    """Rough sentence split (PMP data may be noisy): at ". ", keeping each sentence's full stop."""
    parts = [p.strip() for p in text.replace("\n", " ").split(". ") if p.strip(" .")]
    return [p if p.endswith((".", "!", "?", '"')) else p + "." for p in parts]


def make_pmp_pairs(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` plain-text comparisons ``{"context", "chosen", "rejected", "kind"}`` from the corpus.

    Preference-model pre-training (PMP) needs many comparisons, cheaper and noisier than the
    curated ones the reward model is fine-tuned on. These are made from the pre-training corpus's
    generators (:mod:`qwen_edu.corpus`) with no labelling at all:

    * ``story``: the start of a story; chosen = its next sentence, rejected = a sentence from
      another story (usually about other characters);
    * ``math``: ``"a op b ="``; chosen = the right result, rejected = a wrong one;
    * ``code``: a function's first line and docstring; chosen = its own body, rejected = the body of
      a different function.
    """
    from qwen_edu.corpus import arithmetic_line, code_function, generate_story

    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    while len(out) < n:
        kind = rng.choice(["story", "story", "math", "code"])
        if kind == "story":
            own, other = _sentences(generate_story(rng)), _sentences(generate_story(rng))
            k = rng.randint(1, len(own) - 1)
            context, chosen, rejected = " ".join(own[:k]), " " + own[k], " " + rng.choice(other)
        elif kind == "math":
            line = arithmetic_line(rng)
            left, right = line.rsplit("=", 1)
            value = int(right)
            context, chosen, rejected = left + "=", f" {value}", f" {_wrong_number(rng, value)}"
        else:
            own, other = code_function(rng), code_function(rng)
            cut, other_cut = own.index('"""\n') + 4, other.index('"""\n') + 4  # after the docstring
            context, chosen, rejected = own[:cut], own[cut:], other[other_cut:]
        if chosen.strip() != rejected.strip():
            out.append({"context": context, "chosen": chosen, "rejected": rejected, "kind": kind})
    return out


def make_prompts(n: int, seed: int = 0, **kwargs: Any) -> list[dict[str, Any]]:
    """Prompts for generation (RL and evaluation): ``{"prompt": messages, "kind", "answer"}``."""
    out = []
    for c in make_conversations(n, seed, **kwargs):
        out.append({"prompt": c["messages"][:-1], "kind": c["kind"], "answer": c["answer"]})
    return out


def parse_number(text: str) -> int | None:
    """The number right after the last ``=`` in ``text`` (``"3 + 4 = 7."`` -> 7), or ``None``."""
    if "=" not in text:
        return None
    match = re.match(r"\s*(-?\d+)", text.rsplit("=", 1)[1])
    return int(match.group(1)) if match else None


def check_answer(kind: str, reply: str, answer: str | None = None) -> dict[str, bool]:
    """Score one generated reply: ``format`` (the reply has the shape of its kind) and ``correct``.

    ``correct`` compares with the reference ``answer``: the number for ``math``, the exact sentence
    otherwise.
    """
    reply = reply.strip()
    pattern = _ANSWER_FORMATS.get(kind)
    if pattern is None:
        raise ValueError(f"unknown kind {kind!r}; expected one of {sorted(_ANSWER_FORMATS)}")
    formatted = bool(pattern.match(reply))
    if answer is None:
        return {"format": formatted, "correct": False}
    if kind == "math":
        correct = formatted and parse_number(reply) == parse_number(answer)
    else:
        correct = reply == answer.strip()
    return {"format": formatted, "correct": correct}


# --- validation --------------------------------------------------------------------------------------

def validate_conversation(messages: Iterable[Mapping[str, str]], *, require_assistant: bool = True
                          ) -> list[dict[str, str]]:
    """Check a conversation for SFT; return it as a list of ``{"role", "content"}`` dicts.

    Raises ``ValueError`` naming the message for an unknown role, an empty (or whitespace-only)
    assistant turn, a system message after the start, or -- with ``require_assistant`` -- a
    conversation without an assistant turn (nothing to learn from).
    """
    if isinstance(messages, Mapping) and "messages" in messages:
        messages = messages["messages"]
    turns = validate_messages(messages)
    if not turns:
        raise ValueError("conversation is empty")
    for index, (role, content) in enumerate(turns):
        if role == "assistant" and not content.strip():
            raise ValueError(f"message {index} is an empty assistant turn: there is nothing to learn from it")
        if role == "system" and index != 0:
            raise ValueError(f"message {index} is a system message; only the first message may be one")
    if require_assistant and not any(role == "assistant" for role, _ in turns):
        raise ValueError("conversation has no assistant turn: its SFT loss would be empty")
    return [{"role": role, "content": content} for role, content in turns]


def validate_pair(pair: Mapping[str, Any]) -> None:
    """Check a preference pair ``{"prompt": messages, "chosen": str, "rejected": str}``."""
    for key in ("prompt", "chosen", "rejected"):
        if key not in pair:
            raise ValueError(f"comparison pair is missing {key!r} (keys: {sorted(pair)})")
    prompt = validate_conversation(pair["prompt"], require_assistant=False)
    if prompt[-1]["role"] != "user":
        raise ValueError(f"comparison prompt must end with a user message, got {prompt[-1]['role']!r}")
    for key in ("chosen", "rejected"):
        if not isinstance(pair[key], str):
            raise TypeError(f"comparison {key!r} must be a str, got {type(pair[key]).__name__}")
        if not pair[key].strip():
            raise ValueError(f"comparison {key!r} reply is empty")
    if pair["chosen"].strip() == pair["rejected"].strip():
        raise ValueError(f"comparison pair has identical chosen and rejected replies ({pair['chosen']!r}): "
                         "it carries no preference")


# --- tensors -----------------------------------------------------------------------------------------

def sft_labels(encoding: ChatEncoding, ignore_index: int = IGNORE_INDEX) -> list[int]:
    """Labels for SFT: the token id where ``loss_mask`` is 1 (assistant replies), ``ignore_index`` elsewhere.

    Labels are *unshifted* (aligned with ``ids``), as :func:`qwen_edu.training.causal_lm_loss` expects.
    """
    if len(encoding.ids) != len(encoding.loss_mask):
        raise ValueError("encoding ids and loss_mask have different lengths")
    return [t if m else ignore_index for t, m in zip(encoding.ids, encoding.loss_mask)]


def encode_sft(tokenizer: Any, messages: Iterable[Mapping[str, str]] | Mapping[str, Any], *,
               max_length: int | None = None, system_prompt: str | None = SYSTEM_PROMPT) -> dict[str, list[int]]:
    """One conversation -> ``{"input_ids", "labels"}`` (validated, ChatML, assistant-only labels).

    ``max_length`` truncates on the right (a truncated conversation keeps its leading turns).
    """
    turns = validate_conversation(messages)
    encoding = tokenizer.apply_chat_template(turns, system_prompt=system_prompt)
    ids, labels = list(encoding.ids), sft_labels(encoding)
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, *, side: str = "right",
              labels: Sequence[Sequence[int]] | None = None) -> dict[str, torch.Tensor]:
    """Pad id lists to one length: ``{"input_ids", "attention_mask"}`` (+ ``"labels"`` padded with -100).

    ``side="right"`` for training (causal attention never looks right, so the mask only has to stop
    the loss); ``side="left"`` for generation (every row's next token is at the last position).
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not sequences:
        raise ValueError("cannot pad an empty batch")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    lab = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long) if labels is not None else None
    for i, seq in enumerate(sequences):
        n = len(seq)
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[i, cols] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[i, cols] = 1
        if lab is not None:
            assert labels is not None
            if len(labels[i]) != n:
                raise ValueError(f"row {i}: labels ({len(labels[i])}) and ids ({n}) differ in length")
            lab[i, cols] = torch.as_tensor(list(labels[i]), dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": mask}
    if lab is not None:
        out["labels"] = lab
    return out


def encode_prompt(tokenizer: Any, prompt: Iterable[Mapping[str, str]],
                  system_prompt: str | None = SYSTEM_PROMPT) -> list[int]:
    """A prompt's ChatML ids, ending with the generation header ``<|im_start|>assistant\\n``."""
    turns = validate_conversation(prompt, require_assistant=False)
    return list(tokenizer.apply_chat_template(turns, add_generation_prompt=True, system_prompt=system_prompt).ids)


def encode_pair(tokenizer: Any, pair: Mapping[str, Any], *, system_prompt: str | None = SYSTEM_PROMPT
                ) -> dict[str, list[int]]:
    """A preference pair -> ids of ``prompt + chosen + <|im_end|>`` and of the rejected version.

    Returns ``chosen_ids``, ``rejected_ids`` and their ``*_response_mask`` (1 on the reply tokens
    and the closing ``<|im_end|>``, i.e. exactly the tokens whose log-probability DPO compares).
    The reply is encoded as the assistant turn of the full conversation, so its tokens are the ones
    SFT trained on.
    """
    validate_pair(pair)
    out: dict[str, list[int]] = {}
    for key in ("chosen", "rejected"):
        messages = [*pair["prompt"], {"role": "assistant", "content": pair[key]}]
        enc = tokenizer.apply_chat_template(messages, system_prompt=system_prompt)
        ids, mask = list(enc.ids), list(enc.loss_mask)
        last = max(i for i, m in enumerate(mask) if m)  # the closing <|im_end|>; drop the trailing "\n"
        out[f"{key}_ids"] = ids[: last + 1]
        out[f"{key}_response_mask"] = mask[: last + 1]
    return out


def encode_text_pair(tokenizer: Any, pair: Mapping[str, str]) -> dict[str, list[int]]:
    """A plain-text comparison (:func:`make_pmp_pairs`) -> the layout of :func:`encode_pair`.

    ``context + reply`` as plain text (no chat format): the context and the reply are encoded
    separately and concatenated, so ``*_response_mask`` marks exactly the reply's tokens.
    """
    for key in ("context", "chosen", "rejected"):
        if not isinstance(pair.get(key), str) or (key != "context" and not pair[key].strip()):
            raise ValueError(f"text comparison needs a non-empty string {key!r} (keys: {sorted(pair)})")
    context = list(tokenizer.encode(pair["context"]))
    out: dict[str, list[int]] = {}
    for key in ("chosen", "rejected"):
        reply = list(tokenizer.encode(pair[key]))
        out[f"{key}_ids"] = context + reply
        out[f"{key}_response_mask"] = [0] * len(context) + [1] * len(reply)
    return out


def collate_pairs(encoded: Sequence[Mapping[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack encoded pairs into one right-padded batch: rows ``[chosen_0..chosen_n, rejected_0..rejected_n]``.

    Returns ``input_ids``, ``attention_mask`` and ``response_mask`` of shape ``[2n, L]``.
    """
    seqs = [e["chosen_ids"] for e in encoded] + [e["rejected_ids"] for e in encoded]
    masks = [e["chosen_response_mask"] for e in encoded] + [e["rejected_response_mask"] for e in encoded]
    batch = pad_batch(seqs, pad_id, side="right")
    resp = torch.zeros_like(batch["input_ids"])
    for i, m in enumerate(masks):
        resp[i, : len(m)] = torch.as_tensor(m)
    batch["response_mask"] = resp
    return batch


def im_end_id(tokenizer: Any) -> int:
    """The id of ``<|im_end|>`` (the end of an assistant turn, where generation stops)."""
    try:
        return int(tokenizer.special_tokens[IM_END])
    except KeyError:
        raise ValueError("this tokenizer has no <|im_end|> token: it cannot do ChatML") from None
