"""Passkey retrieval scored by exact match, over a grid of context lengths and needle depths.

Scoring is *teacher-forced greedy exact match*: one forward pass over ``prompt + answer`` and a check
that the arg-max at each answer position is the answer's token. By induction this is exactly "greedy
decoding reproduces the answer": if every arg-max matches, greedy decoding emits the answer token by
token; at the first mismatch it would emit the wrong token. One pass per sample instead of one per
digit, and no KV cache needed, so every context-extension method is scored the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qwen_edu.corpus.passkey import PasskeySample, passkey_samples

__all__ = ["passkey_correct", "RetrievalGrid", "retrieval_grid", "plot_retrieval_heatmap"]


@torch.inference_mode()
def passkey_correct(model: nn.Module, samples: Sequence[PasskeySample], batch_size: int = 8) -> torch.Tensor:
    """``[len(samples)]`` booleans: does greedy decoding reproduce each sample's answer exactly?

    Samples of equal length are batched together (no padding, which some attention variants such as
    Dual Chunk Attention do not support).
    """
    device = next(model.parameters()).device
    correct = torch.zeros(len(samples), dtype=torch.bool)
    by_length: dict[int, list[int]] = {}
    for index, sample in enumerate(samples):
        by_length.setdefault(sample.length, []).append(index)
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            ids = torch.tensor([samples[i].input_ids for i in chunk], device=device)
            prompt = len(samples[chunk[0]].prompt_ids)
            answer = len(samples[chunk[0]].answer_ids)
            logits = model(ids, logits_to_keep=answer + 1).logits[:, :answer]  # predictions of the answer
            predicted = logits.argmax(-1).cpu()
            expected = ids[:, prompt:].cpu()
            correct[chunk] = (predicted == expected).all(-1)
    return correct


@dataclass
class RetrievalGrid:
    """Exact-match accuracy per (context length, needle depth) cell, ``accuracy [lengths, depths]``."""

    lengths: list[int]
    depths: list[float]
    accuracy: torch.Tensor
    repeats: int

    def overall(self) -> float:
        return float(self.accuracy.mean())

    def table(self) -> str:
        """A small text table (rows: lengths, columns: depths), accuracies in percent."""
        head = f"{'length':>8} |" + "".join(f"{d:>7.0%}" for d in self.depths)
        rows = [f"{n:>8,} |" + "".join(f"{a:>7.0%}" for a in self.accuracy[i].tolist())
                for i, n in enumerate(self.lengths)]
        return "\n".join([head + "   (needle depth)", "-" * len(head), *rows])


def retrieval_grid(model: nn.Module, tokenizer: Any, lengths: Sequence[int], depths: Sequence[float],
                   repeats: int = 4, seed: int = 0, batch_size: int = 8,
                   progress: Callable[[Any], Any] | None = None) -> RetrievalGrid:
    """Score ``model`` on ``repeats`` passkey samples per (length, depth) cell (same seed -> same prompts).

    ``progress`` wraps the per-length loop (e.g. ``tqdm``).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    accuracy = torch.zeros(len(lengths), len(depths))
    rows = enumerate(lengths) if progress is None else progress(list(enumerate(lengths)))
    for i, length in rows:
        samples = passkey_samples(tokenizer, [length], depths, repeats, seed=seed + 1009 * length)
        correct = passkey_correct(model, samples, batch_size).float().view(len(depths), repeats)
        accuracy[i] = correct.mean(-1)
    return RetrievalGrid(list(lengths), list(depths), accuracy, repeats)


def plot_retrieval_heatmap(grid: RetrievalGrid, ax: Any = None, title: str = "", training_length: int | None = None,
                           colorbar: bool = True) -> Any:
    """The familiar needle-in-a-haystack heatmap: context length across, needle depth down, green = found."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(4, 3))
    image = ax.imshow(grid.accuracy.T.numpy(), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(grid.lengths)), [f"{n:,}" for n in grid.lengths], fontsize=7)
    ax.set_yticks(range(len(grid.depths)), [f"{d:.0%}" for d in grid.depths], fontsize=7)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    if training_length is not None and training_length in grid.lengths:
        ax.axvline(grid.lengths.index(training_length) + 0.5, color="black", lw=1, ls="--")
    ax.set_title(title or f"exact match {grid.overall():.0%}", fontsize=9)
    if colorbar:
        ax.figure.colorbar(image, ax=ax, shrink=0.8)
    return ax
