"""Small sample texts shipped with the package, for compression measurements and toy training.

The texts were written for this book (no third-party copyright): a few kilobytes each of
English prose, Chinese prose, Python code and mathematics (LaTeX-flavoured).
"""

from __future__ import annotations

from importlib import resources

__all__ = ["SAMPLE_NAMES", "load_sample_text", "training_corpus"]

SAMPLE_NAMES = ("english", "chinese", "code", "math")


def load_sample_text(name: str) -> str:
    """The sample called ``name`` (one of ``SAMPLE_NAMES``), as a ``str``."""
    if name not in SAMPLE_NAMES:
        raise ValueError(f"unknown sample text {name!r}; choose one of {SAMPLE_NAMES}")
    path = resources.files("qwen_edu") / "data" / "text" / f"{name}.txt"
    return path.read_text(encoding="utf-8")


def training_corpus() -> list[str]:
    """All samples, one string each: the corpus the book trains its toy BPE on."""
    return [load_sample_text(name) for name in SAMPLE_NAMES]
