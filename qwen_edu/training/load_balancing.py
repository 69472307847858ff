"""The MoE load-balancing loss in training, two ways: per micro-batch and over the global batch.

The Switch-style auxiliary loss ``E * sum_e f_e * P_e`` (:mod:`qwen_edu.models.moe`) multiplies, per
expert, the fraction ``f_e`` of routing assignments it received (a count: no gradient) by its mean
router probability ``P_e`` (differentiable). It is minimal when the load is uniform -- but uniform
*over which tokens*?

* ``"micro_batch"``: ``f`` and ``P`` of each forward call, as transformers computes it (and as
  Qwen1.5-MoE was trained). With a micro-batch of a few sequences this asks every few sequences to
  use every expert evenly, so a code file must spread over the "story" experts too: specialisation
  by domain is penalised.
* ``"global_batch"``: ``f`` counted over the whole optimizer step -- every micro-batch of gradient
  accumulation and every data-parallel rank -- while ``P`` stays the micro-batch's own. This is the
  Qwen3-MoE recipe (the Qwen3 report; Qiu et al. 2025, "Demons in the Detail"): the counts are
  all-reduced across ranks in each forward pass (a ``[E]`` vector: cheap) and accumulated across the
  micro-batches of the step. A micro-batch can only see the counts of the micro-batches before it, so
  in the first one ``f`` is local and it grows global as the step proceeds -- the book's reading of
  the paper's buffer; across ranks it is exact.
* ``"global_batch_exact"``: the book's variant that makes ``f`` the whole step's from the first
  micro-batch, at the price of one extra gradient-free forward pass per micro-batch to count first.
  The objective is then independent of how the batch is split into micro-batches and ranks.

In every mode each micro-batch contributes ``coef * aux / accumulation_steps`` to its backward pass, so
the loss the optimizer sees is ``coef`` times the mean aux over all micro-batches of all ranks (DDP and
FSDP average gradients over ranks). Layers are pooled into one ``f`` and one ``P``, as transformers'
``load_balancing_loss_func`` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qwen_edu.models.moe import router_stats
from qwen_edu.training.distributed import all_reduce_sum

__all__ = ["BALANCING_MODES", "LoadBalancer"]

BALANCING_MODES = ("none", "micro_batch", "global_batch", "global_batch_exact")


class LoadBalancer:
    """The auxiliary loss of each micro-batch of one optimizer step, in one of :data:`BALANCING_MODES`.

    Use: :meth:`begin_step` (with the step's counts for ``"global_batch_exact"``), then
    :meth:`loss` after each micro-batch's forward pass. In the global modes :meth:`loss` all-reduces
    the micro-batch's counts, a collective: every rank must call it as often as the others.
    """

    def __init__(self, mode: str, top_k: int) -> None:
        if mode not in BALANCING_MODES or mode == "none":
            raise ValueError(f"load balancing mode must be one of {BALANCING_MODES[1:]}, got {mode!r}")
        self.mode, self.top_k = mode, top_k
        self.counts: torch.Tensor | None = None  # this step's global counts so far (or all of them, exact)
        self.rows: torch.Tensor | None = None

    def count(self, router_logits: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(counts [E], rows)`` of one micro-batch, summed over every rank."""
        with torch.no_grad():
            stats = router_stats([logits.detach() for logits in router_logits], self.top_k)
        return all_reduce_sum(stats.counts), all_reduce_sum(stats.rows)

    def begin_step(self, counts: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> None:
        """Start an optimizer step; ``"global_batch_exact"`` needs the step's global ``counts`` and ``rows``."""
        if self.mode == "global_batch_exact" and (counts is None or rows is None):
            raise ValueError("global_batch_exact needs the step's counts: run the counting pass first")
        self.counts, self.rows = counts, rows

    def loss(self, router_logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """This micro-batch's ``E * sum_e f_e * P_e`` (``P`` local and differentiable; ``f`` per mode)."""
        stats = router_stats(router_logits, self.top_k)
        if self.mode == "micro_batch":
            return stats.loss()
        if self.mode == "global_batch":
            counts, rows = self.count(router_logits)
            self.counts = counts if self.counts is None else self.counts + counts
            self.rows = rows if self.rows is None else self.rows + rows
        assert self.counts is not None and self.rows is not None
        fraction = self.counts / self.rows
        return stats.num_experts * torch.sum(fraction * stats.mean_prob)

