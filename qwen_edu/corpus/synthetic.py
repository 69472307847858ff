"""Seeded generators of simple Python functions and arithmetic lines, and the mixed training corpus.

The stories (:mod:`qwen_edu.corpus.stories`) teach the base model English; these two small
"domains" are there for the specialisation chapter, which continues training on one of them:

* :func:`generate_code` -- short, correct Python functions (sums, maxima, string helpers, loops)
  with varied names, each a complete ``def`` with a docstring;
* :func:`generate_arithmetic` -- lines like ``12 + 35 = 47``, always with the right answer.

:func:`build_corpus` mixes the three kinds into one list of documents; the same seed gives the
same documents, in the same order, everywhere.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from qwen_edu.corpus.stories import generate_story

__all__ = ["generate_code", "generate_arithmetic", "arithmetic_line", "code_function", "build_corpus"]

_NOUNS = ["numbers", "values", "items", "scores", "prices", "ages", "points", "sizes", "counts", "marks"]
_WORDS = ["name", "word", "text", "label", "title", "line", "city", "color"]
_VARS = ["x", "y", "a", "b", "n", "m", "first", "second", "left", "right"]


def _two(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(_VARS[:4], 2) if rng.random() < 0.5 else rng.choice([("a", "b"), ("x", "y"),
                                                                         ("first", "second"), ("left", "right")])
    return a, b


def _f_binary(rng: random.Random) -> str:
    a, b = _two(rng)
    op, verb, name = rng.choice([("+", "Return the sum of", "add"), ("-", "Return the difference of", "subtract"),
                                 ("*", "Return the product of", "multiply")])
    name = rng.choice([name, f"{name}_numbers", f"{name}_two"])
    return f'def {name}({a}, {b}):\n    """{verb} {a} and {b}."""\n    return {a} {op} {b}\n'


def _f_max(rng: random.Random) -> str:
    a, b = _two(rng)
    big = rng.random() < 0.5
    name = rng.choice(["larger", "bigger", "max_of_two"] if big else ["smaller", "min_of_two"])
    cmp = ">" if big else "<"
    word = "larger" if big else "smaller"
    return (f'def {name}({a}, {b}):\n    """Return the {word} of {a} and {b}."""\n'
            f"    if {a} {cmp} {b}:\n        return {a}\n    return {b}\n")


def _f_sum_list(rng: random.Random) -> str:
    noun = rng.choice(_NOUNS)
    item = rng.choice(["value", "item", "number", "x"])
    total = rng.choice(["total", "result", "acc"])
    return (f'def total_{noun}({noun}):\n    """Add up all the {noun}."""\n    {total} = 0\n'
            f"    for {item} in {noun}:\n        {total} = {total} + {item}\n    return {total}\n")


def _f_count(rng: random.Random) -> str:
    noun = rng.choice(_NOUNS)
    limit = rng.randint(0, 100)
    cmp, word = rng.choice([(">", "greater than"), ("<", "less than"), ("==", "equal to")])
    return (f'def count_{noun}({noun}):\n    """Count the {noun} {word} {limit}."""\n    count = 0\n'
            f"    for value in {noun}:\n        if value {cmp} {limit}:\n            count += 1\n"
            f"    return count\n")


def _f_average(rng: random.Random) -> str:
    noun = rng.choice(_NOUNS)
    return (f'def average_{noun}({noun}):\n    """Return the mean of the {noun}."""\n'
            f"    if not {noun}:\n        return 0\n    return sum({noun}) / len({noun})\n")


def _f_string(rng: random.Random) -> str:
    w = rng.choice(_WORDS)
    kind = rng.randrange(4)
    if kind == 0:
        return f'def shout({w}):\n    """Return the {w} in capital letters."""\n    return {w}.upper() + "!"\n'
    if kind == 1:
        return f'def reverse_{w}({w}):\n    """Return the {w} backwards."""\n    return {w}[::-1]\n'
    if kind == 2:
        greet = rng.choice(["Hello", "Hi", "Welcome"])
        return f'def greet({w}):\n    """Say {greet.lower()} to a {w}."""\n    return "{greet}, " + {w} + "!"\n'
    return (f'def count_letters({w}):\n    """Return how many letters the {w} has."""\n'
            f"    return len({w})\n")


def _f_even(rng: random.Random) -> str:
    n = rng.choice(["n", "number", "x", "value"])
    k = rng.choice([2, 3, 5, 10])
    name = "is_even" if k == 2 else f"is_multiple_of_{k}"
    return f'def {name}({n}):\n    """Return True if {n} can be divided by {k}."""\n    return {n} % {k} == 0\n'


def _f_range(rng: random.Random) -> str:
    n = rng.randint(2, 20)
    step = rng.choice([1, 2])
    return (f'def first_numbers():\n    """Return a list of numbers from 0 to {n - 1}, step {step}."""\n'
            f"    result = []\n    for i in range(0, {n}, {step}):\n        result.append(i)\n"
            f"    return result\n")


def _f_factorial(rng: random.Random) -> str:
    n = rng.choice(["n", "k", "number"])
    if rng.random() < 0.5:
        return (f'def factorial({n}):\n    """Return {n}! computed with a loop."""\n    result = 1\n'
                f"    for i in range(2, {n} + 1):\n        result = result * i\n    return result\n")
    return (f'def factorial({n}):\n    """Return {n}! computed by recursion."""\n    if {n} <= 1:\n        return 1\n'
            f"    return {n} * factorial({n} - 1)\n")


_CODE: list[Callable[[random.Random], str]] = [_f_binary, _f_max, _f_sum_list, _f_count, _f_average, _f_string,
                                               _f_even, _f_range, _f_factorial]


def code_function(rng: random.Random) -> str:
    """One small Python function (source text ending in a newline), drawn with ``rng``."""
    return rng.choice(_CODE)(rng)


def generate_code(n: int, seed: int = 0) -> list[str]:
    """``n`` Python functions; each one compiles (the tests check it)."""
    rng = random.Random(seed)
    return [code_function(rng) for _ in range(n)]


def arithmetic_line(rng: random.Random, max_value: int = 99) -> str:
    """``"a op b = c"`` with the correct ``c``; ``op`` in + - * (subtraction never goes negative)."""
    op = rng.choice("+-*")
    a, b = rng.randint(0, max_value), rng.randint(0, max_value)
    if op == "-" and b > a:
        a, b = b, a
    if op == "*":
        b = rng.randint(0, 12)
    value = a + b if op == "+" else a - b if op == "-" else a * b
    return f"{a} {op} {b} = {value}"


def generate_arithmetic(n: int, seed: int = 0, lines_per_doc: int = 8, max_value: int = 99) -> list[str]:
    """``n`` documents of ``lines_per_doc`` arithmetic lines each, separated by newlines."""
    rng = random.Random(seed)
    return ["\n".join(arithmetic_line(rng, max_value) for _ in range(lines_per_doc)) for _ in range(n)]


def build_corpus(n_docs: int, seed: int = 0, *, code_fraction: float = 0.1,
                 arithmetic_fraction: float = 0.1) -> list[str]:
    """``n_docs`` documents: stories, with about ``code_fraction`` code and ``arithmetic_fraction`` sums.

    Each document's kind is drawn from one ``random.Random(seed)`` stream, so the corpus -- and its
    order -- is a pure function of ``(n_docs, seed, fractions)``.
    """
    if not 0 <= code_fraction + arithmetic_fraction <= 1 or min(code_fraction, arithmetic_fraction) < 0:
        raise ValueError("code_fraction and arithmetic_fraction must be >= 0 and sum to at most 1")
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        u = rng.random()
        if u < code_fraction:
            docs.append(code_function(rng))
        elif u < code_fraction + arithmetic_fraction:
            docs.append("\n".join(arithmetic_line(rng) for _ in range(rng.randint(4, 10))))
        else:
            docs.append(generate_story(rng))
    return docs
