"""AdamW with weight decay on the matrices only, and a warm-up + cosine learning-rate schedule.

**Which parameters decay.** Weight decay pulls every decayed weight towards zero a little each
step. That is a useful prior for the big matrices (projections, MLP, the embedding table -- which
in a tied model *is* the output head). It is not for the 1-D tensors: an RMSNorm gain of 0 switches
a feature off rather than making the model simpler, and the q/k/v biases are offsets, not
capacity. So the rule is the one GPT-2/nanoGPT and most LLM recipes use: **decay every parameter
with 2 or more dimensions, nothing else**. ``decay_embeddings=False`` additionally exempts the
embedding (some recipes do; a tied head then goes undecayed too).

**Schedule.** :func:`lr_at_step` gives the learning rate of optimizer step ``step`` (0-based): a
linear ramp that reaches ``max_lr`` at step ``warmup_steps - 1``, then half a cosine from ``max_lr``
(at ``warmup_steps``) down to ``min_lr`` (at ``total_steps``); beyond the end it stays at ``min_lr``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["param_groups", "lr_at_step", "make_optimizer", "make_scheduler", "train_steps"]


def param_groups(model: nn.Module, weight_decay: float, *, decay_embeddings: bool = True) -> list[dict]:
    """Two AdamW groups: ``"decay"`` (matrices) with ``weight_decay`` and ``"no_decay"`` (vectors) with 0.

    Each group also carries ``"names"`` (the parameter names, for display and checks). A tied
    weight appears once (``named_parameters`` already deduplicates). Frozen parameters are skipped.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_matrix = p.dim() >= 2 and (decay_embeddings or id(p) not in embeddings)
        (decay if is_matrix else no_decay).append((name, p))
    return [
        {"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": weight_decay,
         "group": "decay"},
        {"params": [p for _, p in no_decay], "names": [n for n, _ in no_decay], "weight_decay": 0.0,
         "group": "no_decay"},
    ]


def lr_at_step(step: int, *, max_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Learning rate at 0-based optimizer step ``step``: linear warm-up, then cosine decay to ``min_lr``.

    >>> lr_at_step(9, max_lr=1.0, warmup_steps=10, total_steps=110)   # last warm-up step
    1.0
    >>> lr_at_step(60, max_lr=1.0, warmup_steps=10, total_steps=110)  # halfway down the cosine
    0.5
    >>> lr_at_step(110, max_lr=1.0, warmup_steps=10, total_steps=110)
    0.0
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps < 0 or total_steps < warmup_steps:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps, got {warmup_steps} and {total_steps}")
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
                   eps: float = 1e-8, *, decay_embeddings: bool = True) -> torch.optim.AdamW:
    """``AdamW`` over :func:`param_groups` (``foreach`` implementation: fast and deterministic)."""
    groups = param_groups(model, weight_decay, decay_embeddings=decay_embeddings)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps)


def make_scheduler(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                   min_lr_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` that multiplies each group's initial lr by ``lr_at_step(step, max_lr=1, ...)``."""
    lr_at_step(0, max_lr=1.0, warmup_steps=warmup_steps, total_steps=total_steps)  # validates the arguments
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_at_step(step, max_lr=1.0, warmup_steps=warmup_steps, total_steps=total_steps,
                                min_lr=min_lr_ratio),
    )


def train_steps(model: nn.Module, loss_at: Callable[[int], torch.Tensor], *, steps: int, lr: float,
                warmup_steps: int, min_lr_ratio: float = 0.1, weight_decay: float = 0.0, clip_norm: float = 1.0,
                progress: str | None = None, on_step: Callable[[int, float], None] | None = None,
                ) -> list[dict[str, float]]:
    """The small models' plain loop: AdamW, warm-up + cosine schedule, gradient clipping, one batch a step.

    ``loss_at(step)`` builds the batch of ``step`` and returns its loss (with the graph); the loop does the
    rest and returns the per-step log ``{"step", "loss", "lr"}``. ``progress`` names a tqdm bar (None: none).
    The model is left in train mode; the optimizer is made here, after the caller's initialisation.
    """
    model.train()
    optimizer = make_optimizer(model, lr, weight_decay)
    log: list[dict[str, float]] = []
    step_range: Iterable[int] = range(steps)
    if progress is not None:
        from tqdm.auto import tqdm

        step_range = tqdm(step_range, desc=progress)
    for step in step_range:
        rate = lr_at_step(step, max_lr=lr, warmup_steps=warmup_steps, total_steps=steps, min_lr=min_lr_ratio * lr)
        for group in optimizer.param_groups:
            group["lr"] = rate
        loss = loss_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()
        log.append({"step": step, "loss": loss.item(), "lr": rate})
        if on_step is not None:
            on_step(step, log[-1]["loss"])
    return log
