"""Gated DeltaNet: linear attention whose fixed-size memory is edited by a gated delta rule (Qwen3-Next).

Softmax attention keeps every past key and value; one new token costs O(length). Linear attention
replaces them by a matrix memory ``S [d_k, d_v]`` per head: a token *writes* ``k v^T`` into it and
*reads* with ``S^T q``, so a token costs O(1) whatever the length. Plain linear attention only adds,
so old associations pile up and blur each other. The **delta rule** first reads what the memory already
returns for ``k`` and writes only the error, ``beta * (v - S^T k)``: for a unit-norm key that
"erases" the old value stored under ``k`` and "writes" the new one (``beta = 1``: replace it). The
**gate** ``exp(g) <= 1`` decays the whole memory each step, so stale content fades. Per head and token:

    S_t = exp(g_t) S_{t-1};  S_t += k_t (beta_t (v_t - S_t^T k_t))^T;  o_t = S_t^T q_t

This module has that recurrence twice: :func:`recurrent_gated_delta_rule` (one token at a time, the
definition, used for decoding) and :func:`chunk_gated_delta_rule` (chunks of 64 tokens handled with
matrix products and one triangular solve, used for training and prefill). They are equal up to float
rounding (tests). :func:`causal_conv1d` is the short depthwise convolution in front of the recurrence,
with the cached window it needs for decoding. :class:`GatedDeltaNet` is the whole Qwen3-Next layer;
parameter names equal the checkpoint keys (``linear_attn.in_proj_qkvz`` ...). Numerics follow HF's
pure-PyTorch path (reference §1.5-1.6): the recurrence runs in fp32, ``g`` is computed in fp32,
``beta`` in the model dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "l2norm",
    "recurrent_gated_delta_rule",
    "chunk_gated_delta_rule",
    "causal_conv1d",
    "DeltaNetState",
    "GatedRMSNorm",
    "GatedDeltaNet",
]


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim. The eps sits on the *sum* (as in fla / HF), not a mean."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def recurrent_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                               beta: torch.Tensor, initial_state: torch.Tensor | None = None,
                               output_all_states: bool = False,
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule, one token at a time (the definition). Everything runs in fp32.

    ``q, k [B, H, L, d_k]`` (already normalised; q also scaled by ``d_k^-0.5``), ``v [B, H, L, d_v]``,
    ``g`` (log decay, <= 0) and ``beta`` (write strength in (0, 1)) ``[B, H, L]``; ``initial_state
    [B, H, d_k, d_v]`` or ``None`` (zeros). Returns ``(o [B, H, L, d_v], state)`` where ``state`` is the
    final ``[B, H, d_k, d_v]`` memory, or with ``output_all_states`` the memory after *every* token,
    ``[B, H, L, d_k, d_v]`` (speculative decoding uses them to roll back rejected tokens).
    """
    q, k, v, g, beta = (t.to(torch.float32) for t in (q, k, v, g, beta))
    b, h, length, d_k = k.shape
    d_v = v.shape[-1]
    state = (torch.zeros(b, h, d_k, d_v, dtype=torch.float32, device=v.device) if initial_state is None
             else initial_state.to(torch.float32))
    out = v.new_empty(b, h, length, d_v)
    states = v.new_empty(b, h, length, d_k, d_v) if output_all_states else None
    for t in range(length):
        k_t = k[:, :, t, None, :]                                 # [B, H, 1, d_k]
        state = state * g[:, :, t, None, None].exp()              # forget a little of everything
        predicted = k_t @ state                                   # what the memory returns for k_t: [B, H, 1, d_v]
        delta = beta[:, :, t, None, None] * (v[:, :, t, None, :] - predicted)
        state = state + k_t.transpose(-1, -2) @ delta             # erase the old value under k_t, write v_t
        out[:, :, t] = (q[:, :, t, None, :] @ state)[:, :, 0]     # read
        if states is not None:
            states[:, :, t] = state
    return out, (states if states is not None else state)


def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                           beta: torch.Tensor, initial_state: torch.Tensor | None = None,
                           chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The same recurrence, ``chunk_size`` tokens at a time; same arguments and results (final state only).

    Within a chunk (local index i, ``Gamma_i = sum_{s<=i} g_s``, ``D_ij = exp(Gamma_i - Gamma_j)`` for
    j <= i) unrolling the recurrence gives a *lower-triangular* linear system for the values that
    are really written, ``(I + A) U = beta V`` with ``A = strict_lower((beta K) K^T * D)``. One
    triangular solve per chunk replaces the token loop; only the chunk-to-chunk state hand-over
    stays sequential:

        V' = U - W S,   O = (Q * e^Gamma) S + ((Q K^T) * D) V',   S <- e^Gamma_last S + (K * e^(Gamma_last-Gamma))^T V'

    with ``W = (I + A)^-1 (beta K e^Gamma)`` (how much of the *old* state each write cancels). The
    sequence is zero-padded to a multiple of the chunk; padded steps have ``g = beta = 0`` and change
    nothing.
    """
    q, k, v, g, beta = (t.to(torch.float32) for t in (q, k, v, g, beta))
    b, h, length, d_k = k.shape
    d_v = v.shape[-1]
    pad = (-length) % chunk_size
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
    n = (length + pad) // chunk_size
    q, k, v = (t.reshape(b, h, n, chunk_size, -1) for t in (q, k, v))
    g, beta = g.reshape(b, h, n, chunk_size), beta.reshape(b, h, n, chunk_size)

    gamma = g.cumsum(dim=-1)                                              # [B, H, n, C]
    future = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).triu(1)
    decay = (gamma[..., :, None] - gamma[..., None, :]).masked_fill(future, float("-inf")).exp()  # D
    k_beta = k * beta[..., None]
    # (I + A) U = beta V and (I + A) W = beta K e^Gamma; the diagonal is taken as 1 (unitriangular).
    system = (k_beta @ k.transpose(-1, -2)) * decay
    u = torch.linalg.solve_triangular(system, v * beta[..., None], upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, k_beta * gamma.exp()[..., None], upper=False, unitriangular=True)
    scores = (q @ k.transpose(-1, -2)) * decay                            # causal, decayed q.k inside the chunk
    # O = (Q e^Gamma) S + scores (U - W S) = (Q e^Gamma - scores W) S + scores U: everything but the
    # products with the state S is computed for all chunks at once, outside the loop.
    reads = torch.cat([w, q * gamma.exp()[..., None] - scores @ w], dim=-2)  # rows that multiply S
    out = scores @ u
    k_decayed = k * (gamma[..., -1:] - gamma).exp()[..., None]            # writes, decayed to the chunk end
    chunk_decay = gamma[..., -1].exp()[..., None, None]

    state = (torch.zeros(b, h, d_k, d_v, dtype=torch.float32, device=v.device) if initial_state is None
             else initial_state.to(torch.float32))
    for i in range(n):
        w_state, q_state = (reads[:, :, i] @ state).split(chunk_size, dim=-2)
        out[:, :, i] += q_state
        state = state * chunk_decay[:, :, i] + k_decayed[:, :, i].transpose(-1, -2) @ (u[:, :, i] - w_state)
    return out.reshape(b, h, n * chunk_size, d_v)[:, :, :length], state


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution plus SiLU: ``y[c, t] = silu(sum_i w[c, i] x[c, t - K + 1 + i])``.

    ``x [B, C, L]``, ``weight [C, K]``; ``conv_state [B, C, K-1]`` holds the inputs just before ``x``
    (zeros at the start of a sequence). Returns ``(y [B, C, L], new_state [B, C, K-1])``: the last
    K-1 inputs are all the next call needs, so decoding one token costs O(K), not O(length).
    (HF's cache keeps K columns; the oldest is never read.)
    """
    channels, width = weight.shape
    if conv_state is None:  # start of a sequence: zero history, i.e. plain left padding
        y = F.conv1d(x.to(weight.dtype), weight[:, None, :], padding=width - 1, groups=channels)[..., :x.shape[-1]]
        full = F.pad(x[..., -(width - 1):], (max(0, width - 1 - x.shape[-1]), 0))
    else:
        full = torch.cat([conv_state.to(x.dtype), x], dim=-1)
        y = F.conv1d(full.to(weight.dtype), weight[:, None, :], groups=channels)
    return F.silu(y).to(x.dtype), full[..., full.shape[-1] - (width - 1):]


@dataclass
class DeltaNetState:
    """The whole cache of one Gated DeltaNet layer: its size does not grow with the sequence.

    ``conv [B, C, K-1]``: the last pre-convolution inputs; ``recurrent [B, H_v, d_k, d_v]`` (fp32): the
    memory; ``seen``: tokens consumed. With ``keep_history`` a call also keeps the memory before and
    after each of its tokens and the conv inputs around them, so :meth:`rollback` can forget the
    newest tokens (speculative decoding's rejected drafts) without recomputing anything.
    """

    conv: torch.Tensor | None = None
    recurrent: torch.Tensor | None = None
    seen: int = 0
    keep_history: bool = False
    # (conv inputs [B, C, K-1+L], memories [B, H, L+1, d_k, d_v]: before the call, then after each token)
    history: tuple[torch.Tensor, torch.Tensor] | None = None

    def rollback(self, n: int) -> None:
        """Forget the last ``n`` tokens; all of them must come from the last call (made with ``keep_history``)."""
        if n == 0:
            return
        calls = self.history[1].shape[2] - 1 if self.history is not None else 0
        if not 0 < n <= calls:
            raise ValueError(f"cannot roll back {n} tokens: the last call kept the history of {calls} "
                             "(set keep_history=True before the call to be rolled back)")
        window, states = self.history  # type: ignore[misc]
        keep = calls - n  # tokens of the last call that stay
        width = window.shape[-1] - calls  # K - 1
        self.recurrent, self.conv = states[:, :, keep], window[..., keep:keep + width]
        self.seen -= n
        self.history = None

    def nbytes(self) -> int:
        """Bytes held (the number the hybrid-vs-attention memory plot reads)."""
        return sum(t.numel() * t.element_size() for t in (self.conv, self.recurrent) if t is not None)


class GatedRMSNorm(nn.Module):
    """``weight * rmsnorm(o) * silu(z)``: per value head, normalise the read-out, then let ``z`` gate it.

    The weight is a plain gain (initialised to ones, *not* zero-centred). As in HF, the normalised
    value is cast to the input dtype before the weight multiply; the gate's silu runs in fp32.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.weight * x32.to(dtype)
        return (y * F.silu(gate.to(torch.float32))).to(dtype)


class GatedDeltaNet(nn.Module):
    """Qwen3-Next's linear-attention layer (``model.layers.N.linear_attn``).

    ``x [B, L, hidden]`` -> projections -> causal conv + SiLU over ``[q | k | v]`` -> per value head:
    ``beta = sigmoid(b)``, ``g = -exp(A_log) softplus(a + dt_bias)``, l2-normalised q and k, the gated
    delta rule -> gated RMSNorm with ``silu(z)`` -> ``out_proj``. There are ``H_k`` key heads and
    ``H_v = r H_k`` value heads; value head j reads key head ``j // r`` (like GQA, with the roles of
    keys and values swapped). No positional encoding: the conv and the recurrence carry order.
    """

    def __init__(self, hidden_size: int, num_k_heads: int, num_v_heads: int, head_k_dim: int,
                 head_v_dim: int, conv_kernel_size: int = 4, eps: float = 1e-6, layer_idx: int = 0,
                 chunk_size: int = 64) -> None:
        super().__init__()
        if num_v_heads % num_k_heads:
            raise ValueError(f"linear_num_value_heads={num_v_heads} must be a multiple of "
                             f"linear_num_key_heads={num_k_heads}")
        self.num_k_heads, self.num_v_heads = num_k_heads, num_v_heads
        self.head_k_dim, self.head_v_dim = head_k_dim, head_v_dim
        self.key_dim, self.value_dim = num_k_heads * head_k_dim, num_v_heads * head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.layer_idx = layer_idx
        self.chunk_size = chunk_size
        self.in_proj_qkvz = nn.Linear(hidden_size, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(hidden_size, 2 * num_v_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, conv_kernel_size, groups=self.conv_dim,
                                padding=conv_kernel_size - 1, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(num_v_heads))
        self.A_log = nn.Parameter(torch.log(torch.linspace(1.0, 16.0, num_v_heads)))
        self.norm = GatedRMSNorm(head_v_dim, eps)
        self.out_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``x [B, L, hidden]`` -> ``q, k [B, L, H_k, d_k]``, ``v, z [B, L, H_v, d_v]``, ``b, a [B, L, H_v]``.

        The checkpoint groups the rows by key head: for each key head ``[q | k | v of its r value heads
        | z of its r value heads]``, and ``in_proj_ba`` likewise ``[b (r) | a (r)]`` per key head.
        """
        b_, length, _ = x.shape
        r = self.num_v_heads // self.num_k_heads
        qkvz = self.in_proj_qkvz(x).view(b_, length, self.num_k_heads, -1)
        q, k, v, z = qkvz.split([self.head_k_dim, self.head_k_dim, r * self.head_v_dim, r * self.head_v_dim], dim=-1)
        b, a = self.in_proj_ba(x).view(b_, length, self.num_k_heads, 2 * r).split([r, r], dim=-1)
        v = v.reshape(b_, length, self.num_v_heads, self.head_v_dim)
        z = z.reshape(b_, length, self.num_v_heads, self.head_v_dim)
        return q, k, v, z, b.reshape(b_, length, -1), a.reshape(b_, length, -1)

    def gates(self, b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``beta = sigmoid(b)`` (model dtype) and ``g = -exp(A_log) * softplus(a + dt_bias)`` (fp32, <= 0)."""
        return b.sigmoid(), -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)

    def forward(self, x: torch.Tensor, state: DeltaNetState | None = None,
                padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, L, hidden]`` -> ``[B, L, hidden]``, updating ``state`` (if given) in place.

        ``padding_mask [B, >=L]`` (1 = token) zeroes padded inputs of a multi-token call: a zero input
        writes nothing (its key is zero), so left padding is neutral.
        """
        batch, length, _ = x.shape
        if padding_mask is not None and length > 1:
            x = x * padding_mask[:, -length:, None].to(x.dtype)
        q, k, v, z, b, a = self.project(x)
        pre = torch.cat([t.reshape(batch, length, -1) for t in (q, k, v)], dim=-1).transpose(1, 2)
        old_conv = state.conv if state is not None else None
        mixed, conv_state = causal_conv1d(pre, self.conv1d.weight[:, 0], old_conv)
        q, k, v = mixed.transpose(1, 2).split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        r = self.num_v_heads // self.num_k_heads
        # [B, L, heads * d] -> [B, H_v, L, d] (contiguous); key head j // r serves value head j.
        q = q.reshape(batch, length, self.num_k_heads, self.head_k_dim).transpose(1, 2).repeat_interleave(r, dim=1)
        k = k.reshape(batch, length, self.num_k_heads, self.head_k_dim).transpose(1, 2).repeat_interleave(r, dim=1)
        v = v.reshape(batch, length, self.num_v_heads, self.head_v_dim).transpose(1, 2).contiguous()
        beta, g = self.gates(b, a)
        beta, g = beta.transpose(1, 2), g.transpose(1, 2)
        q = l2norm(q.float()) * (1.0 / math.sqrt(self.head_k_dim))
        k = l2norm(k.float())

        initial = state.recurrent if state is not None else None
        keep = state is not None and state.keep_history
        if keep or (length == 1 and initial is not None):  # decoding (and verifying drafts) token by token
            out, rec = recurrent_gated_delta_rule(q, k, v, g, beta, initial, output_all_states=keep)
        else:
            out, rec = chunk_gated_delta_rule(q, k, v, g, beta, initial, self.chunk_size)
        if state is not None:
            if keep:
                before = initial if initial is not None else rec.new_zeros(rec[:, :, 0].shape)
                old = old_conv if old_conv is not None else pre.new_zeros(*conv_state.shape)
                state.history = (torch.cat([old, pre], dim=-1), torch.cat([before[:, :, None], rec], dim=2))
                rec = rec[:, :, -1]
            state.conv, state.recurrent, state.seen = conv_state, rec, state.seen + length
        out = out.to(x.dtype).transpose(1, 2)                                  # [B, L, H_v, d_v]
        y = self.norm(out, z)
        return self.out_proj(y.reshape(batch, length, self.value_dim))
