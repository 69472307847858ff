"""Evaluations that measure what a model can do, beyond its loss.

- :mod:`qwen_edu.evaluation.retrieval` -- passkey retrieval ("needle in a haystack") scored by exact
  match over a grid of context lengths and needle depths, and its heatmap.
"""

from qwen_edu.evaluation.retrieval import (
    RetrievalGrid,
    passkey_correct,
    plot_retrieval_heatmap,
    retrieval_grid,
)

__all__ = ["RetrievalGrid", "passkey_correct", "plot_retrieval_heatmap", "retrieval_grid"]
