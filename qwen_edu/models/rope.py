"""Rotary position embedding (RoPE) in the half-split ("rotate_half", GPT-NeoX) convention.

Everything that differs between RoPE variants is *which inverse frequencies* are used and by how much
cos/sin are scaled. So each variant is one function ``(head_dim, rope_theta, scaling, max_position_
embeddings, seq_len) -> (inv_freq, attention_scaling)``, looked up by ``rope_scaling["rope_type"]`` in
:data:`ROPE_INIT_FUNCTIONS`. The long-context chapter adds or inspects variants there; the rest of the
model never changes. ``linear``, ``dynamic`` and ``yarn`` follow transformers 5.x op for op, so that
their frequencies are bit-identical; ``qwen1_ntk`` is Qwen-1's NTK-alpha rule (reference §5.4).

Inverse frequencies are always float32: in bf16 the angle ``position * inv_freq`` would be off by
whole radians at long positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = [
    "ROPE_INIT_FUNCTIONS",
    "RotaryEmbedding",
    "apply_rotary_pos_emb",
    "compute_rope_parameters",
    "register_rope_type",
    "rotate_half",
    "qwen1_ntk_alpha",
]

RopeInitFn = Callable[..., tuple[torch.Tensor, float]]


def _exponents(dim: int) -> torch.Tensor:
    """``2j / dim`` for ``j = 0 .. dim/2 - 1`` in fp32, built exactly like the reference (int64 arange)."""
    return torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / dim


def _default(head_dim: int, rope_theta: float, scaling: dict[str, Any], max_position_embeddings: int,
             seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Plain RoPE: ``inv_freq[j] = theta ** (-2j/d)``."""
    return 1.0 / (rope_theta ** _exponents(head_dim)), 1.0


def _linear(head_dim: int, rope_theta: float, scaling: dict[str, Any], max_position_embeddings: int,
            seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Position interpolation: dividing every frequency by ``factor`` squeezes positions by it."""
    inv_freq, _ = _default(head_dim, rope_theta, scaling, max_position_embeddings)
    return inv_freq / scaling["factor"], 1.0


def _ntk(head_dim: int, rope_theta: float, scaling: dict[str, Any], max_position_embeddings: int,
         seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Static NTK-aware scaling: raise the base to ``theta * factor ** (d / (d - 2))``.

    The lowest frequency is then divided by exactly ``factor`` (like position interpolation), while
    the highest barely moves: high frequencies keep resolving neighbouring tokens.
    """
    base = rope_theta * scaling["factor"] ** (head_dim / (head_dim - 2))
    return 1.0 / (base ** _exponents(head_dim)), 1.0


def _dynamic(head_dim: int, rope_theta: float, scaling: dict[str, Any], max_position_embeddings: int,
             seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """HF dynamic NTK: grow the base once the sequence outgrows ``max_position_embeddings``.

    The reference computes the new base in fp32 tensor arithmetic (``seq_len`` is a tensor there), so
    we do the same to get identical bits.
    """
    factor = scaling["factor"]
    exponent = head_dim / (head_dim - 2)
    if seq_len is None:  # at init the reference uses Python floats (and the ratio is exactly 1)
        base = rope_theta * ((factor * max_position_embeddings / max_position_embeddings) - (factor - 1)) ** exponent
    else:
        length = torch.tensor(max(int(seq_len), max_position_embeddings))
        base = rope_theta * ((factor * length / max_position_embeddings) - (factor - 1)) ** exponent
    return 1.0 / (base ** _exponents(head_dim)), 1.0


def _yarn(head_dim: int, rope_theta: float, scaling: dict[str, Any], max_position_embeddings: int,
          seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, keep high ones, blend in between; scale cos/sin too."""
    dim, base = head_dim, rope_theta
    original = scaling.get("original_max_position_embeddings") or max_position_embeddings
    factor = scaling.get("factor") or max_position_embeddings / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        if scaling.get("mscale") and scaling.get("mscale_all_dim"):
            attention_factor = float(mscale(factor, scaling["mscale"]) / mscale(factor, scaling["mscale_all_dim"]))
        else:
            attention_factor = mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # The feature index whose wavelength fits `rotations` times into the original context.
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)

    pos_freqs = base ** _exponents(dim)
    inv_extrapolation = 1.0 / pos_freqs
    inv_interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_weight = 1 - ramp
    inv_freq = inv_interpolation * (1 - extrapolation_weight) + inv_extrapolation * extrapolation_weight
    return inv_freq, attention_factor


def qwen1_ntk_alpha(length: int, seq_length: int) -> int:
    """Qwen-1's NTK alpha: 1 up to the training length, then 3, 7, 15, ... per doubling."""
    context = math.log(length / seq_length, 2) + 1
    return max(2 ** math.ceil(context) - 1, 1)


def _qwen1_ntk(head_dim: int, rope_theta: float, scaling: dict[str, Any], max_position_embeddings: int,
               seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Qwen-1 NTK-aware RoPE: ``base' = base * alpha ** (d/(d-2))`` with alpha chosen from the prefill."""
    alpha = qwen1_ntk_alpha(seq_len or 1, scaling["seq_length"])
    base = rope_theta * alpha ** (head_dim / (head_dim - 2))
    return 1.0 / (base ** _exponents(head_dim)), 1.0


ROPE_INIT_FUNCTIONS: dict[str, RopeInitFn] = {
    "default": _default,
    "linear": _linear,
    "ntk": _ntk,
    "dynamic": _dynamic,
    "yarn": _yarn,
    "qwen1_ntk": _qwen1_ntk,
}


def register_rope_type(name: str, fn: RopeInitFn) -> None:
    """Add a RoPE variant: ``fn(head_dim, rope_theta, scaling, max_position_embeddings, seq_len)``."""
    ROPE_INIT_FUNCTIONS[name] = fn


def compute_rope_parameters(head_dim: int, rope_theta: float, rope_scaling: dict[str, Any] | None = None,
                            max_position_embeddings: int = 32768, seq_len: int | None = None,
                            ) -> tuple[torch.Tensor, float]:
    """``(inv_freq [head_dim/2] fp32, attention_scaling)`` for the variant named in ``rope_scaling``."""
    scaling = dict(rope_scaling or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise NotImplementedError(f"rope_type {rope_type!r}; known: {sorted(ROPE_INIT_FUNCTIONS)}")
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"RoPE rotates pairs of features: head_dim must be even and >= 2, got {head_dim}")
    factor = scaling.get("factor")
    if factor is not None and factor < 1:
        raise ValueError(f"rope_scaling factor must be >= 1 (it extends the context), got {factor} for {rope_type!r}")
    return ROPE_INIT_FUNCTIONS[rope_type](head_dim, rope_theta, scaling, max_position_embeddings, seq_len)


class RotaryEmbedding(nn.Module):
    """Turns position ids into the ``(cos, sin)`` tables shared by every layer of one forward pass.

    ``rotate_in_fp32=False`` returns cos/sin in the activation dtype, so the rotation runs in bf16 as in
    HF Qwen2; ``True`` keeps them fp32, which makes :func:`apply_rotary_pos_emb` rotate in fp32 as the
    original Qwen-1 code does. ``partial_rotary_factor < 1`` (Qwen3-Next: 0.25) rotates only the first
    ``rotary_dim = int(head_dim * factor)`` features of each head: the frequencies are those of a
    ``rotary_dim``-wide head and the tables are ``rotary_dim`` wide; the other features carry no position.
    """

    inv_freq: torch.Tensor

    def __init__(self, head_dim: int, rope_theta: float = 10000.0, rope_scaling: dict[str, Any] | None = None,
                 max_position_embeddings: int = 32768, rotate_in_fp32: bool = False,
                 partial_rotary_factor: float = 1.0) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = int(head_dim * partial_rotary_factor)
        self.rope_theta = rope_theta
        self.rope_scaling = dict(rope_scaling) if rope_scaling else None
        self.rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        self.max_position_embeddings = max_position_embeddings
        self.rotate_in_fp32 = rotate_in_fp32
        self.register_buffer("inv_freq", torch.empty(self.rotary_dim // 2, device="cpu"), persistent=False)
        self.reset_frequencies()

    def reset_frequencies(self, device: torch.device | None = None) -> None:
        """Recompute the fp32 frequencies (at init, and after any ``.to()``: a bf16 copy would be wrong)."""
        with torch.device("cpu"):  # real numbers even while the model is being built on "meta"
            inv_freq, self.attention_scaling = compute_rope_parameters(
                self.rotary_dim, self.rope_theta, self.rope_scaling, self.max_position_embeddings
            )
        device = device if device is not None else self.inv_freq.device
        self.inv_freq = inv_freq.to(device)
        self.original_inv_freq = self.inv_freq
        self.max_seq_len_cached = self.max_position_embeddings  # for "dynamic"
        self.ntk_length: int | None = None  # for "qwen1_ntk": the prefill length alpha was chosen from

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        super()._apply(fn, recurse)
        if self.inv_freq.device.type != "meta":
            self.reset_frequencies(self.inv_freq.device)
        return self

    def _update_frequencies(self, position_ids: torch.Tensor, past_length: int) -> None:
        if self.rope_type == "dynamic":
            # Same rule as HF: grow when the sequence outgrows the cache, restore when short again.
            seq_len = int(position_ids.max()) + 1
            cached = self.max_seq_len_cached
            if seq_len > cached:
                with torch.device("cpu"):
                    inv_freq, self.attention_scaling = compute_rope_parameters(
                        self.rotary_dim, self.rope_theta, self.rope_scaling, self.max_position_embeddings, seq_len
                    )
                self.inv_freq = inv_freq.to(self.inv_freq.device)
                self.max_seq_len_cached = seq_len
            if seq_len < self.max_position_embeddings < cached:
                self.inv_freq = self.original_inv_freq
                self.max_seq_len_cached = self.max_position_embeddings
        elif self.rope_type == "qwen1_ntk" and past_length == 0:
            # Qwen-1 picks alpha from the prompt length at prefill and keeps it while decoding.
            length = position_ids.shape[-1]
            if length != self.ntk_length:
                with torch.device("cpu"):
                    inv_freq, _ = compute_rope_parameters(self.rotary_dim, self.rope_theta, self.rope_scaling,
                                                          self.max_position_embeddings, length)
                self.inv_freq = inv_freq.to(self.inv_freq.device)
                self.ntk_length = length

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, past_length: int = 0,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``position_ids [B, L]`` -> ``cos, sin [B, L, rotary_dim]`` (dtype of ``x`` unless fp32 rotation)."""
        if self.rope_type in ("dynamic", "qwen1_ntk"):
            self._update_frequencies(position_ids, past_length)
        if self.inv_freq.device != x.device:
            self.reset_frequencies(x.device)
        freqs = position_ids[..., None].to(torch.float32) * self.inv_freq  # [B, L, d/2], exact in fp32
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        out_dtype = torch.float32 if self.rotate_in_fp32 else x.dtype
        return cos.to(out_dtype), sin.to(out_dtype)

    def extra_repr(self) -> str:
        partial = f", rotary_dim={self.rotary_dim}" if self.rotary_dim != self.head_dim else ""
        return f"head_dim={self.head_dim}{partial}, theta={self.rope_theta}, type={self.rope_type}"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]``: feature i is paired with feature i + d/2 (not with i + 1)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q, k [B, heads, L, d]`` by the angles in ``cos, sin [B, L, d]``.

    The arithmetic runs in the wider of the two dtypes and the result is cast back to q's dtype: bf16
    tables give HF Qwen2's bf16 rotation, fp32 tables give Qwen-1's fp32 rotation. Tables narrower
    than the head (partial rotary, ``r < d``) rotate features ``0..r-1`` (feature i paired with i + r/2)
    and pass the rest through unchanged.
    """
    rotary_dim = cos.shape[-1]
    if rotary_dim < q.shape[-1]:
        q_rot, k_rot = apply_rotary_pos_emb(q[..., :rotary_dim], k[..., :rotary_dim], cos, sin, unsqueeze_dim)
        return (torch.cat([q_rot, q[..., rotary_dim:]], dim=-1), torch.cat([k_rot, k[..., rotary_dim:]], dim=-1))
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    dtype = torch.promote_types(q.dtype, cos.dtype)
    q_, k_ = q.to(dtype), k.to(dtype)
    q_out = q_ * cos + rotate_half(q_) * sin
    k_out = k_ * cos + rotate_half(k_) * sin
    return q_out.to(q.dtype), k_out.to(k.dtype)
