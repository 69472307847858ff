"""The sparse mixture-of-experts (MoE) block shared by every Qwen MoE model, and its load-balancing loss.

One block replaces the dense SwiGLU MLP of a decoder layer (reference §4.3; transformers 5.x §5):

1. the **router** (``gate``, a bias-free ``[E, H]`` matrix) gives every token one logit per expert;
2. a **softmax in fp32 over all E experts** turns them into probabilities, and each token keeps its
   **top-k** experts (optionally renormalising the k kept probabilities to sum to 1);
3. each kept expert -- a small SwiGLU MLP -- processes the token, and the outputs are summed with the
   kept probabilities as weights;
4. an optional **shared expert** (a wider SwiGLU that every token passes through) is added, scaled by
   its own per-token **sigmoid gate**.

Qwen1.5-MoE / Qwen2-MoE use all four steps without renormalisation; Qwen3-MoE drops the shared expert
and renormalises; Qwen3-Next keeps both. The experts are stored the way transformers 5.x stores them,
as two stacked tensors ``experts.gate_up_proj [E, 2I, H]`` (gate rows first) and
``experts.down_proj [E, H, I]``, so parameter names match today's checkpoints; the per-expert hub
keys are mapped onto them by :class:`qwen_edu.models.layouts.MoeLayout`.

**Dispatch.** Looping over tokens would be hopeless, and computing every expert for every token
throws away the point of sparsity. :class:`Experts` sorts the ``T * k`` (token, slot) pairs by
expert so each expert's tokens are one contiguous block, then runs one matmul per expert block --
as a single grouped matmul (``torch.nn.functional.grouped_mm``, the default wherever its kernel takes
the operands) or as a Python loop over the non-empty blocks (the fallback; on CPU it is about as fast
for inference but ~3x slower to train with many small experts, see ``bench/bench_moe.py``) -- and
finally puts the rows back in token order and sums each token's k weighted contributions (the order transformers' ``grouped_mm``
path uses, so fp32 results agree to rounding and bf16 results follow the same rounding steps).

**Load balancing.** :func:`router_stats` collects, per expert, how many (token, slot) assignments it
received (the counts behind ``f_e``) and the summed router probability (behind ``P_e``), separately,
so that a training loop can accumulate the counts over micro-batches or ranks before combining them;
:func:`load_balancing_loss` is the Switch-Transformer loss ``E * sum_e f_e * P_e`` exactly as
transformers computes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qwen_edu.models.layers import MLP

__all__ = [
    "TopKRouter",
    "Experts",
    "SparseMoeBlock",
    "RouterStats",
    "router_stats",
    "load_balancing_loss",
    "EXPERT_IMPLEMENTATIONS",
]

#: How :class:`Experts` runs its per-expert matmuls once the tokens are grouped by expert.
#: ``"auto"``: ``"grouped_mm"`` when the kernel accepts the operands (on CPU: 16-byte aligned strides,
#: i.e. ``moe_intermediate_size * element size`` a multiple of 16), else ``"loop"``.
EXPERT_IMPLEMENTATIONS = ("auto", "loop", "grouped_mm")


@torch.no_grad()
def _uniform_fan_in_(weight: torch.Tensor) -> None:
    """``nn.Linear``'s default scale, ``U(-1/sqrt(in), 1/sqrt(in))`` per ``[out, in]`` matrix, so a freshly
    built block is usable; trained or loaded weights overwrite it (on the meta device it is a no-op)."""
    bound = weight.shape[-1] ** -0.5
    weight.uniform_(-bound, bound)


class TopKRouter(nn.Module):
    """The router (checkpoint name ``mlp.gate``): scores every expert, keeps the ``top_k`` best per token.

    The softmax runs in fp32 over **all** experts before the top-k (so the kept weights of a token
    sum to less than 1 unless ``norm_topk_prob``); the kept weights are cast back to the model dtype.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool = False) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts={num_experts}: a sparse block needs at least one expert")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok={top_k} must be between 1 and num_experts={num_experts}")
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, top_k, norm_topk_prob
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        _uniform_fan_in_(self.weight)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [T, H]`` -> ``(logits [T, E] model dtype, weights [T, k] model dtype, indices [T, k])``."""
        logits = F.linear(x, self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, indices = torch.topk(probs, self.top_k, dim=-1)  # sorted, best first
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(logits.dtype), indices

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, hidden={self.weight.shape[1]}, top_k={self.top_k}, "
                f"norm_topk_prob={self.norm_topk_prob}")


def _can_grouped_mm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``F.grouped_mm`` can take these operands (its CPU kernel wants 16-byte aligned strides)."""
    if not hasattr(F, "grouped_mm"):
        return False
    if x.device.type == "cpu":
        size = x.element_size()
        return all(n * size % 16 == 0 for n in weight.shape[1:]) and x.data_ptr() % 16 == 0 \
            and weight.data_ptr() % 16 == 0
    return True


class Experts(nn.Module):
    """All routed experts of one layer, stacked: ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``.

    Expert ``e`` computes ``down_proj[e] @ (silu(g) * u)`` with ``[g; u] = gate_up_proj[e] @ x``: the
    same SwiGLU as :class:`~qwen_edu.models.layers.MLP`, with ``gate_proj`` and ``up_proj`` stacked
    row-wise. ``implementation`` is one of :data:`EXPERT_IMPLEMENTATIONS`.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 implementation: str = "auto") -> None:
        super().__init__()
        if intermediate_size < 1:
            raise ValueError(f"moe_intermediate_size={intermediate_size} must be positive")
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        _uniform_fan_in_(self.gate_up_proj)
        _uniform_fan_in_(self.down_proj)
        self.implementation = implementation

    @property
    def implementation(self) -> str:
        return self._implementation

    @implementation.setter
    def implementation(self, name: str) -> None:
        if name not in EXPERT_IMPLEMENTATIONS:
            raise ValueError(f"experts implementation must be one of {EXPERT_IMPLEMENTATIONS}, got {name!r}")
        self._implementation = name

    def _grouped_linear(self, x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows of ``x`` grouped by expert (``counts[e]`` rows each) times ``weight[e]^T``, group by group."""
        x = x.to(weight.dtype)  # grouped_mm is not autocast-aware; keep both paths alike
        if self.implementation != "loop" and _can_grouped_mm(x, weight):
            offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
            return F.grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
        outs, start = [], 0
        for e, n in enumerate(counts.tolist()):  # one host sync; then only the experts that got tokens
            if n:
                outs.append(F.linear(x[start:start + n], weight[e]))
                start += n
        return torch.cat(outs) if len(outs) != 1 else outs[0]

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``x [T, H]``, ``indices, weights [T, k]`` -> ``sum_j weights[t, j] * expert_{indices[t, j]}(x[t])``."""
        tokens, k = indices.shape
        flat = indices.reshape(-1)
        order = torch.argsort(flat, stable=True)  # the (token, slot) pairs, grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts)
        hidden = self._grouped_linear(x[order // k], self.gate_up_proj, counts)
        gate, up = hidden.chunk(2, dim=-1)
        out = self._grouped_linear(F.silu(gate) * up, self.down_proj, counts)
        out = out * weights.reshape(-1)[order, None]
        unsorted = torch.empty_like(out).index_copy_(0, order, out)  # back to (token, slot) order
        return unsorted.view(tokens, k, -1).sum(dim=1)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, hidden={self.gate_up_proj.shape[2]}, "
                f"intermediate={self.intermediate_size}, implementation={self.implementation!r}")


class SparseMoeBlock(nn.Module):
    """Router + routed experts + optional sigmoid-gated shared expert; a drop-in for the dense MLP.

    ``forward(x [B, L, H]) -> [B, L, H]``. The router logits of the latest call are kept in
    :attr:`router_logits` (``[B*L, E]``, before the softmax) for the auxiliary loss and for
    inspecting expert load; they are not a parameter or buffer and are overwritten on every call.
    ``shared_expert_intermediate_size=0`` means no shared expert (Qwen3-MoE).
    """

    def __init__(self, hidden_size: int, num_experts: int, num_experts_per_tok: int, moe_intermediate_size: int,
                 *, norm_topk_prob: bool = False, shared_expert_intermediate_size: int = 0,
                 experts_implementation: str = "auto") -> None:
        super().__init__()
        self.gate = TopKRouter(hidden_size, num_experts, num_experts_per_tok, norm_topk_prob)
        self.experts = Experts(num_experts, hidden_size, moe_intermediate_size, experts_implementation)
        self.shared_expert: MLP | None = None
        self.shared_expert_gate: nn.Linear | None = None
        if shared_expert_intermediate_size < 0:
            raise ValueError(f"shared_expert_intermediate_size={shared_expert_intermediate_size} must be >= 0")
        if shared_expert_intermediate_size:
            self.shared_expert = MLP(hidden_size, shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)
        self.router_logits: torch.Tensor | None = None

    @classmethod
    def from_config(cls, config: Any) -> SparseMoeBlock:
        """Build from any config with the transformers MoE field names (``num_experts``, ...)."""
        return cls(config.hidden_size, config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size,
                   norm_topk_prob=config.norm_topk_prob,
                   shared_expert_intermediate_size=getattr(config, "shared_expert_intermediate_size", 0) or 0,
                   experts_implementation=getattr(config, "experts_implementation", "auto"))

    @property
    def num_experts(self) -> int:
        return self.gate.num_experts

    @property
    def top_k(self) -> int:
        return self.gate.top_k

    def shared_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """``sigmoid(x . w_gate) * shared_expert(x)`` for ``x [T, H]`` (``None`` without a shared expert)."""
        if self.shared_expert is None or self.shared_expert_gate is None:
            return None
        return torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        logits, weights, indices = self.gate(flat)
        out = self.experts(flat, indices, weights)
        shared = self.shared_output(flat)
        if shared is not None:
            out = out + shared
        self.router_logits = logits
        return out.view_as(x)


# ---------------------------------------------------------------------------------------------------
# The load-balancing loss
# ---------------------------------------------------------------------------------------------------
@dataclass
class RouterStats:
    """Per-expert sums behind the Switch load-balancing loss, kept apart so they can be accumulated.

    ``counts[e]``: (token, layer, slot) assignments to expert e (padding excluded); no gradient.
    ``prob_sum[e]``: router probability of expert e summed over the (token, layer) rows; carries the
    gradient. ``rows``: how many (token, layer) rows were counted. ``a + b`` adds two batches' sums,
    which is how a global-batch variant accumulates ``counts`` over micro-batches and ranks.
    """

    counts: torch.Tensor
    prob_sum: torch.Tensor
    rows: torch.Tensor

    def __add__(self, other: RouterStats) -> RouterStats:
        return RouterStats(self.counts + other.counts, self.prob_sum + other.prob_sum, self.rows + other.rows)

    @property
    def num_experts(self) -> int:
        return self.counts.shape[-1]

    @property
    def fraction(self) -> torch.Tensor:
        """``f_e``: assignments per row; sums to k over the experts (balanced: k / E each)."""
        return self.counts / self.rows

    @property
    def mean_prob(self) -> torch.Tensor:
        """``P_e``: the mean router probability; sums to 1 over the experts."""
        return self.prob_sum / self.rows

    def loss(self) -> torch.Tensor:
        """``E * sum_e f_e * P_e``: k when perfectly balanced (``f_e = k/E``, ``P_e = 1/E``); it grows
        towards E as the probability mass collapses onto experts that are always picked."""
        return torch.sum(self.fraction * self.mean_prob) * self.num_experts


def router_stats(router_logits: Sequence[torch.Tensor], top_k: int,
                 attention_mask: torch.Tensor | None = None) -> RouterStats:
    """Pool every layer's ``[T, E]`` router logits into :class:`RouterStats` (transformers' arithmetic).

    As in transformers, the probabilities are a softmax in the logits' own dtype and the counts use
    the top-k of those probabilities. ``attention_mask`` (``[B, L]`` with ``B * L = T``, or wider: its
    last ``L`` columns are used, as during cached decoding) excludes padding from both sums.
    """
    if not router_logits:
        raise ValueError("router_stats needs the router logits of at least one layer")
    first = router_logits[0]
    device, num_experts = first.device, first.shape[-1]
    mask = None
    if attention_mask is not None:
        tokens = first.shape[0]
        length = tokens // attention_mask.shape[0]
        mask = attention_mask[:, -length:].reshape(-1).to(device=device, dtype=torch.float32)
        if mask.numel() != tokens:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not cover the {tokens} routed tokens")
    counts = torch.zeros(num_experts, dtype=torch.float32, device=device)
    prob_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    for logits in router_logits:
        probs = torch.softmax(logits, dim=-1)
        selected = torch.topk(probs, top_k, dim=-1).indices.reshape(-1)
        with torch.no_grad():
            ones = mask.repeat_interleave(top_k) if mask is not None else torch.ones_like(selected, dtype=torch.float32)
            counts = counts + torch.zeros_like(counts).scatter_add_(0, selected, ones)
        if mask is None:
            prob_sum = prob_sum + probs.float().sum(dim=0)
            rows = rows + probs.shape[0]
        else:
            prob_sum = prob_sum + (probs.float() * mask[:, None]).sum(dim=0)
            rows = rows + mask.sum()
    return RouterStats(counts, prob_sum, rows)


def load_balancing_loss(router_logits: Sequence[torch.Tensor], top_k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The Switch auxiliary loss ``E * sum_e f_e * P_e`` over all layers and (unpadded) tokens."""
    return router_stats(router_logits, top_k, attention_mask).loss()
