"""The pre-training objective: predict token ``t + 1`` from tokens ``0 .. t``.

``labels`` are given *unshifted* (``labels = input_ids``, with ``-100`` where nothing should be
learnt), as in Hugging Face. :func:`shift_labels` moves them one position to the left, so that the
logits at position ``t`` are scored against the token at ``t + 1``; the last position has no next
token and gets ``-100``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwen_edu.training.data import IGNORE_INDEX

__all__ = ["shift_labels", "causal_lm_loss", "count_targets"]


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``[B, L]`` -> ``[B, L]``: ``out[:, t] = labels[:, t + 1]``, ``out[:, -1] = ignore_index``."""
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def count_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """How many positions of (unshifted) ``labels`` are scored: the non-ignored ones after the shift."""
    return (labels[..., 1:] != ignore_index).sum()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX,
                   reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of ``logits [B, L, V]`` against unshifted ``labels [B, L]``.

    The logits are upcast to fp32 first (under bf16/fp16 autocast they arrive in low precision, and
    log-softmax over thousands of classes needs the range). ``reduction="sum"`` returns the summed
    loss, which the trainer divides by the number of targets of the *whole* optimizer step -- the
    only normalisation under which gradient accumulation equals one big batch exactly.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not line up")
    targets = shift_labels(labels, ignore_index)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=ignore_index, reduction=reduction)
