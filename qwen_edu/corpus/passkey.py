"""Passkey retrieval ("needle in a haystack"): a fact hidden in a long document, asked for at the end.

A sample is a haystack of the book's generated stories with one *needle* sentence inserted at a
chosen depth (0 = the start of the document, 1 = just before the question)::

    ... stories ... The secret code is range 7. ... stories ... What is the secret code? The secret code is range 7

The code is a word and a digit drawn at random from :data:`SECRET_WORDS` (40 one-token words of the
base model's code vocabulary that never occur in its stories) and 0-9: 400 codes, so a guess is right
0.25 % of the time, and nothing but the needle tells the model the answer. Answering means attending
to two tokens that may lie thousands of positions back, found by their content.

Why not the classic five-digit passkey? Copying digits *in order* needs an induction circuit (attend to
the token after the previous occurrence of the current one). The book's 1.9M-parameter base model has
none -- it predicts a repeated random sequence no better the second time -- and a CPU-sized fine-tune
did not grow one; a code whose tokens are unique in the document is found by content alone, which is the
ability the context-extension methods must keep working at long distances.

- :func:`make_passkey_sample` builds one sample of an exact token length at a given depth;
- :func:`passkey_samples` builds a grid (lengths x depths x repeats) for evaluation;
- :func:`passkey_training_rows` builds short training rows (``input_ids`` + ``labels``) that teach a
  base model the format at its own training length; the needle's code is not a target (it is random),
  the answer is.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from qwen_edu.corpus.stories import generate_stories

__all__ = [
    "SECRET_WORDS",
    "NEEDLE_TEMPLATE",
    "QUESTION",
    "PasskeySample",
    "Haystack",
    "make_passkey_sample",
    "passkey_samples",
    "passkey_training_rows",
]

# One token each in the base model's vocabulary, and absent from its stories (the haystack).
SECRET_WORDS = (
    "return", "result", "count", "value", "total", "range", "factorial", "sum", "list", "step",
    "average", "mean", "loop", "product", "difference", "reverse", "label", "title", "text", "city",
    "color", "line", "item", "points", "scores", "prices", "marks", "sizes", "letters", "values",
    "items", "counts", "recursion", "multiply", "subtract", "greater", "smaller", "larger", "equal", "capital",
)
NEEDLE_TEMPLATE = " The secret code is {code}."
QUESTION = " What is the secret code? The secret code is"
IGNORE_INDEX = -100


class _Tokenizer(Protocol):
    eos_id: int

    def encode(self, text: str, **kwargs: Any) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class PasskeySample:
    """One retrieval prompt: ``prompt_ids`` end right before the answer ``answer_ids`` (the code's tokens).

    ``needle_start`` is the token index where the needle sentence begins, ``code_start`` where its
    code begins; ``distance`` is how far back the answer's first token must be copied from.
    """

    prompt_ids: list[int]
    answer_ids: list[int]
    code: str
    depth: float
    needle_start: int
    code_start: int

    @property
    def length(self) -> int:
        """Tokens of prompt plus answer (what a teacher-forced evaluation feeds the model)."""
        return len(self.prompt_ids) + len(self.answer_ids)

    @property
    def distance(self) -> int:
        return len(self.prompt_ids) - self.code_start

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.answer_ids


class Haystack:
    """An endless, seeded token stream of generated stories (``<|endoftext|>`` between them).

    ``take(n)`` returns ``n`` tokens that end where a sentence ends, and the offsets inside them where
    sentences end (a token ending with ``.``, ``!`` or ``?``, or ``<|endoftext|>``): the only places a
    needle is inserted, so it never splits a word or a sentence of the filler. (The first sentence of
    a window may start mid-way, like any document cut to a context length.)
    """

    def __init__(self, tokenizer: _Tokenizer, seed: int = 0, stories_per_batch: int = 64) -> None:
        self.tokenizer = tokenizer
        self.seed = seed
        self.stories_per_batch = stories_per_batch
        self._batch = 0
        self._buffer: list[int] = []
        self._ends_cache: dict[int, bool] = {}

    def _refill(self) -> None:
        stories = generate_stories(self.stories_per_batch, seed=self.seed * 1_000_003 + self._batch)
        self._batch += 1
        for story in stories:
            self._buffer += self.tokenizer.encode(story) + [self.tokenizer.eos_id]

    def _is_sentence_end(self, token: int) -> bool:
        if token not in self._ends_cache:
            ends = self.tokenizer.decode([token]).rstrip().endswith((".", "!", "?"))
            self._ends_cache[token] = ends or token == self.tokenizer.eos_id
        return self._ends_cache[token]

    def take(self, n: int) -> tuple[list[int], list[int]]:
        """The next ``n`` tokens, chosen to *end* at a sentence boundary (so the question that follows
        never interrupts a sentence), and the sentence boundaries inside them (offsets, 0 included)."""
        while True:
            while len(self._buffer) < n + 256:
                self._refill()
            ends = [i + 1 for i in range(n - 1, len(self._buffer)) if self._is_sentence_end(self._buffer[i])]
            if ends:
                break
            self._buffer = self._buffer[n:]  # no boundary in reach (never happens with stories): skip ahead
        end = ends[0]
        tokens, self._buffer = self._buffer[end - n : end], self._buffer[end:]
        boundaries = [i + 1 for i, t in enumerate(tokens) if self._is_sentence_end(t)]
        return tokens, sorted({0, *boundaries})


def _code(rng: random.Random) -> str:
    return f"{rng.choice(SECRET_WORDS)} {rng.randrange(10)}"


def make_passkey_sample(tokenizer: _Tokenizer, length: int, depth: float, haystack: Haystack,
                        rng: random.Random) -> PasskeySample:
    """A sample of exactly ``length`` tokens (prompt + answer) with the needle at ``depth`` in [0, 1].

    The needle goes to the sentence boundary of the filler nearest to ``depth`` of the filler length
    (depth 0: before the first filler token; depth 1: right before the question).
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    code = _code(rng)
    needle = tokenizer.encode(NEEDLE_TEMPLATE.format(code=code))
    question = tokenizer.encode(QUESTION)
    answer = tokenizer.encode(" " + code)
    filler_length = length - len(needle) - len(question) - len(answer)
    if filler_length < 1:
        raise ValueError(f"length {length} is too short: needle, question and answer alone take "
                         f"{len(needle) + len(question) + len(answer)} tokens")
    offset = len(needle) - len(answer) - 1  # the needle ends with the code and a full stop
    if needle[offset:offset + len(answer)] != answer:
        raise ValueError("the needle's code is not tokenized like the answer; choose another template")
    filler, boundaries = haystack.take(filler_length)
    cut = min(boundaries, key=lambda b: (abs(b - depth * filler_length), b))
    prompt = filler[:cut] + needle + filler[cut:] + question
    return PasskeySample(prompt, answer, code, depth, cut, cut + offset)


def passkey_samples(tokenizer: _Tokenizer, lengths: Sequence[int], depths: Sequence[float], repeats: int = 1,
                    seed: int = 0) -> list[PasskeySample]:
    """Samples for every (length, depth) cell, ``repeats`` each, in the order lengths x depths x repeats.

    The same seed gives the same haystacks and codes, so every method is scored on the same prompts.
    """
    rng = random.Random(seed)
    haystack = Haystack(tokenizer, seed=seed)
    return [make_passkey_sample(tokenizer, length, depth, haystack, rng)
            for length in lengths for depth in depths for _ in range(repeats)]


def passkey_training_rows(tokenizer: _Tokenizer, n: int, max_length: int, seed: int = 0,
                          min_length: int | None = None) -> list[dict[str, list[int]]]:
    """``n`` training rows of random length in ``[min_length, max_length]`` with the needle at a uniform
    random depth: ``{"input_ids", "labels", "answer_mask"}``, labels aligned with the ids (unshifted).

    Every token is a target (so the model keeps its language modelling), except the needle's code,
    which is random and could only be memorised; the answer's tokens are targets (the skill), and
    ``answer_mask`` marks them (1) so that a trainer can weight them separately.
    """
    rng = random.Random(seed)
    haystack = Haystack(tokenizer, seed=seed + 7919)
    low = min_length if min_length is not None else max_length // 4
    rows = []
    for _ in range(n):
        sample = make_passkey_sample(tokenizer, rng.randint(low, max_length), rng.random(), haystack, rng)
        labels = list(sample.input_ids)
        for i in range(sample.code_start, sample.code_start + len(sample.answer_ids)):
            labels[i] = IGNORE_INDEX
        answer_mask = [0] * len(sample.prompt_ids) + [1] * len(sample.answer_ids)
        rows.append({"input_ids": sample.input_ids, "labels": labels, "answer_mask": answer_mask})
    return rows
