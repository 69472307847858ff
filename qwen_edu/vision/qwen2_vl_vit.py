"""The Qwen2-VL vision tower: a ViT over packed images of any size, with 2D RoPE and a 2x2 patch merger.

Reading order, following one forward pass (``pixel_values [N, 1176]`` from
:func:`qwen_edu.vision.dynamic_resolution.patchify`, ``grid_thw [n_items, 3]``):

1. :class:`PatchEmbed` -- each row is a ``[3, 2, 14, 14]`` pixel cube; the Conv3d whose kernel *is* that
   cube reduces to one matrix multiply with the kernel flattened in the same order.
2. :class:`VisionRotaryEmbedding` -- no position table: every patch knows its (row, column) on its own
   image's grid (:func:`vision_position_ids`, in merge-block order), and a quarter of each head's
   frequencies rotate by the row, a quarter by the column (the other half repeats them, rotate_half style).
3. :class:`VisionBlock` x depth -- pre-norm attention + MLP. Attention is *variable length*: all images of a
   batch are packed into one sequence and ``cu_seqlens`` (:func:`vision_cu_seqlens`) cuts it into one
   segment per frame group of each image; a patch never attends outside its segment.
4. :class:`PatchMerger` -- LayerNorm, then each 2x2 block's four patch vectors (four consecutive rows)
   concatenated and sent through an MLP to the LLM width: 4 patches -> 1 LLM token.

Chapter 12 builds Qwen2.5-VL and Qwen3-VL on these modules: the block's norm and MLP are chosen by
:class:`VisionConfig` (``norm="rmsnorm"``, ``mlp="swiglu"``; :func:`register_vision_mlp` adds more), and
:meth:`Qwen2VisionTransformer.forward` is split into overridable steps (``embed``, ``rotary``,
``attention_segments``, ``run_blocks``, ``merge``) so window attention or DeepStack is an override, not a copy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qwen_edu.models.layers import RMSNorm
from qwen_edu.models.rope import RotaryEmbedding, apply_rotary_pos_emb

__all__ = [
    "VisionConfig",
    "PatchEmbed",
    "VisionRotaryEmbedding",
    "vision_position_ids",
    "vision_cu_seqlens",
    "check_vision_inputs",
    "VisionAttention",
    "VisionMLP",
    "VisionSwiGLU",
    "VISION_MLPS",
    "register_vision_mlp",
    "make_norm",
    "VisionBlock",
    "PatchMerger",
    "Qwen2VisionTransformer",
    "quick_gelu",
]

# config.json keys of a Qwen2-VL vision_config that VisionConfig reads (the rest is kept in `extra`).
_HF_KEYS = {"depth", "embed_dim", "hidden_size", "hidden_act", "mlp_ratio", "num_heads", "in_channels", "in_chans",
            "patch_size", "spatial_patch_size", "spatial_merge_size", "temporal_patch_size", "rope_parameters",
            "model_type"}


@dataclass
class VisionConfig:
    """Hyper-parameters of the vision tower, by meaning (defaults: Qwen2-VL-7B's tower).

    ``out_hidden_size`` is the LLM width the merger projects to. Qwen2-VL's ``config.json`` calls it
    ``hidden_size`` (and the ViT width ``embed_dim``); Qwen2.5-VL renamed both -- :meth:`from_hf_config`
    reads the Qwen2-VL dialect, later chapters add their own readers.
    """

    depth: int = 32
    embed_dim: int = 1280
    out_hidden_size: int = 3584
    num_heads: int = 16
    mlp_ratio: float = 4.0
    intermediate_size: int | None = None  # None: embed_dim * mlp_ratio
    hidden_act: str = "quick_gelu"
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    rope_theta: float = 10000.0
    # Extension points: Qwen2-VL uses LayerNorm and an fc1/act/fc2 MLP; Qwen2.5-VL RMSNorm and SwiGLU.
    norm: str = "layernorm"
    norm_eps: float = 1e-6
    mlp: str = "fc"
    mlp_bias: bool = True
    # "sdpa" (segments of equal length batched into one call) or "eager" (explicit softmax per segment).
    attn_implementation: str = "sdpa"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"the 2D rotary embedding needs head_dim divisible by 4, got {self.head_dim}")
        if self.norm not in _NORMS:
            raise ValueError(f"unknown vision norm {self.norm!r}; known: {sorted(_NORMS)}")
        if self.mlp not in VISION_MLPS:
            raise ValueError(f"unknown vision MLP {self.mlp!r}; known: {sorted(VISION_MLPS)}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unknown vision activation {self.hidden_act!r}; known: {sorted(_ACTIVATIONS)}")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {self.attn_implementation!r}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden_size(self) -> int:
        return self.intermediate_size if self.intermediate_size is not None else int(self.embed_dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        """Length of one row of ``pixel_values``: ``C * temporal_patch * patch * patch``."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    def replace(self, **changes: Any) -> VisionConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> VisionConfig:
        """Read a Qwen2-VL ``vision_config`` dict (hub files also carry the legacy ``in_chans``)."""
        rope = hf.get("rope_parameters") or {}
        return cls(
            depth=hf.get("depth", 32),
            embed_dim=hf.get("embed_dim", 1280),
            out_hidden_size=hf.get("hidden_size", 3584),
            num_heads=hf.get("num_heads", 16),
            mlp_ratio=float(hf.get("mlp_ratio", 4)),
            hidden_act=hf.get("hidden_act", "quick_gelu"),
            in_channels=hf.get("in_channels", hf.get("in_chans", 3)),
            patch_size=hf.get("patch_size", hf.get("spatial_patch_size", 14)),
            temporal_patch_size=hf.get("temporal_patch_size", 2),
            spatial_merge_size=hf.get("spatial_merge_size", 2),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            extra={k: v for k, v in hf.items() if k not in _HF_KEYS},
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The Qwen2-VL ``vision_config`` dict."""
        if (self.norm, self.mlp, self.intermediate_size) != ("layernorm", "fc", None):
            raise ValueError("a Qwen2-VL vision_config describes LayerNorm + fc MLP blocks only")
        out = dict(self.extra)
        out.update(depth=self.depth, embed_dim=self.embed_dim, hidden_size=self.out_hidden_size,
                   num_heads=self.num_heads, mlp_ratio=_int_if_whole(self.mlp_ratio), hidden_act=self.hidden_act,
                   in_channels=self.in_channels, patch_size=self.patch_size,
                   temporal_patch_size=self.temporal_patch_size, spatial_merge_size=self.spatial_merge_size)
        if self.rope_theta != 10000.0:
            out["rope_parameters"] = {"rope_type": "axial", "rope_theta": self.rope_theta}
        return out


def _int_if_whole(value: float) -> float | int:
    """4.0 -> 4 (transformers' strict config wants an int ``mlp_ratio``)."""
    return int(value) if float(value).is_integer() else value


# ---------------------------------------------------------------------------------------------------
# Patch embedding and 2D rotary positions
# ---------------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """``[N, C*tp*ps*ps] -> [N, embed_dim]``: a Conv3d with kernel = stride = one patch, done as a matmul.

    The weight keeps the Conv3d shape ``[embed_dim, C, tp, ps, ps]`` (that is what checkpoints store). A
    convolution whose kernel covers its whole input is a dot product with the flattened kernel, and the
    rows of ``pixel_values`` are flattened in the same (C, t, y, x) order, so one ``F.linear`` does it.
    ``bias=True`` adds the convolution's bias (Qwen3-VL's patch embedding has one; Qwen2-VL's has none).
    """

    def __init__(self, patch_size: int = 14, temporal_patch_size: int = 2, in_channels: int = 3,
                 embed_dim: int = 1280, bias: bool = False) -> None:
        super().__init__()
        kernel = (temporal_patch_size, patch_size, patch_size)
        self.embed_dim = embed_dim
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=kernel, stride=kernel, bias=bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        return F.linear(pixel_values.to(weight.dtype), weight.reshape(self.embed_dim, -1), self.proj.bias)


def vision_position_ids(grid_thw: torch.Tensor, spatial_merge_size: int = 2) -> torch.Tensor:
    """``[N, 2]`` (row, column) of every patch on its own image's grid, in the merge-block row order.

    The grid ``[h, w]`` is viewed as ``[h/m, m, w/m, m]`` and permuted to ``[h/m, w/m, m, m]``, exactly as
    :func:`~qwen_edu.vision.dynamic_resolution.patchify` orders the patches; the pattern repeats per frame group.
    """
    out = []
    m = spatial_merge_size
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h).view(h // m, m, 1, 1).expand(h // m, m, w // m, m)
        cols = torch.arange(w).view(1, 1, w // m, m).expand(h // m, m, w // m, m)
        pos = torch.stack([rows.permute(0, 2, 1, 3).reshape(-1), cols.permute(0, 2, 1, 3).reshape(-1)], dim=-1)
        out.append(pos.repeat(t, 1))
    return torch.cat(out).to(grid_thw.device)


def vision_cu_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """``[0, h*w, 2*h*w, ...]`` (int32): where each frame group of each image starts and ends in the packed sequence."""
    lengths = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


class VisionRotaryEmbedding(RotaryEmbedding):
    """2D RoPE for the ViT: ``(row, col) [N, 2]`` -> ``cos, sin [N, head_dim]`` in fp32.

    The frequencies are plain RoPE ones for ``dim = head_dim / 2`` (so this *is* a
    :class:`~qwen_edu.models.rope.RotaryEmbedding` of half the width); the row angles fill the first
    quarter of the head, the column angles the second, and rotate_half's second half repeats both.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__(head_dim // 2, theta)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, past_length: int = 0,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != x.device:
            self.reset_frequencies(x.device)
        freqs = position_ids.to(x.device)[..., None].float() * self.inv_freq  # [N, 2, head_dim/4]
        rot = freqs.flatten(1)  # row frequencies, then column frequencies
        emb = torch.cat((rot, rot), dim=-1)
        return emb.cos(), emb.sin()


def check_vision_inputs(pixel_values: torch.Tensor, grid_thw: torch.Tensor, config: VisionConfig,
                        what: str = "pixel_values") -> None:
    """Raise a clear ``ValueError`` unless ``pixel_values`` is exactly the patches ``grid_thw`` describes."""
    if grid_thw.dim() != 2 or grid_thw.shape[-1] != 3 or grid_thw.shape[0] == 0:
        raise ValueError(f"the grid for {what} must be [n_items, 3] (t, h, w), got shape {tuple(grid_thw.shape)}")
    if bool((grid_thw <= 0).any()):
        raise ValueError(f"the grid for {what} has a non-positive entry: {grid_thw.tolist()}")
    m = config.spatial_merge_size
    if bool(((grid_thw[:, 1:] % m) != 0).any()):
        raise ValueError(f"grid h and w must be multiples of spatial_merge_size={m}, got {grid_thw.tolist()}")
    expected = int(grid_thw.prod(-1).sum())
    if pixel_values.dim() != 2 or pixel_values.shape != (expected, config.patch_dim):
        raise ValueError(
            f"{what} of shape {tuple(pixel_values.shape)} does not match its grid {grid_thw.tolist()}: "
            f"expected [{expected}, {config.patch_dim}] (sum of t*h*w patches, C*{config.temporal_patch_size}*"
            f"{config.patch_size}*{config.patch_size} values each)"
        )


# ---------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------
def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's GELU approximation ``x * sigmoid(1.702 x)``."""
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}

_NORMS: dict[str, Callable[[int, float], nn.Module]] = {
    "layernorm": lambda dim, eps: nn.LayerNorm(dim, eps=eps),
    "rmsnorm": lambda dim, eps: RMSNorm(dim, eps),
}


def make_norm(config: VisionConfig, dim: int | None = None) -> nn.Module:
    """The block norm the config asks for (LayerNorm with bias for Qwen2-VL, RMSNorm for Qwen2.5-VL)."""
    return _NORMS[config.norm](dim if dim is not None else config.embed_dim, config.norm_eps)


class VisionMLP(nn.Module):
    """Qwen2-VL's ViT MLP: ``fc2(act(fc1(x)))`` with biases (``act`` = quick_gelu)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.embed_dim, config.mlp_hidden_size, bias=config.mlp_bias)
        self.fc2 = nn.Linear(config.mlp_hidden_size, config.embed_dim, bias=config.mlp_bias)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionSwiGLU(nn.Module):
    """A gated MLP ``down(act(gate(x)) * up(x))`` (Qwen2.5-VL's ViT uses it with biases and SiLU)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.embed_dim, config.mlp_hidden_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.embed_dim, config.mlp_hidden_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.mlp_hidden_size, config.embed_dim, bias=config.mlp_bias)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


#: ``config.mlp`` -> MLP class; the class's attribute names are the checkpoint keys.
VISION_MLPS: dict[str, Callable[[VisionConfig], nn.Module]] = {"fc": VisionMLP, "swiglu": VisionSwiGLU}


def register_vision_mlp(name: str, builder: Callable[[VisionConfig], nn.Module]) -> None:
    """Make ``VisionConfig(mlp=name)`` build ``builder(config)`` (e.g. Qwen3-VL's linear_fc1/linear_fc2)."""
    VISION_MLPS[name] = builder


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention inside each ``cu_seqlens`` segment, with 2D RoPE on q and k.

    ``qkv`` holds q | k | v as contiguous row thirds, each head-major (``reshape(N, 3, heads, head_dim)``).
    The rotation runs in fp32 (as the reference does for the vision tower) and is cast back.
    """

    def __init__(self, dim: int, num_heads: int, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_implementation = attn_implementation
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim).unbind(1)  # each [N, heads, d]
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
        groups = list(_segments_by_length(q, k, v, cu_seqlens))
        if len(groups) == 1:
            out = self._attend(*groups[0][1:])
        else:
            out = torch.empty_like(q)
            for idx, qs, ks, vs in groups:  # qs [n_segments, heads, len, d] -> their rows of out
                out = out.index_copy(0, idx, self._attend(qs, ks, vs))
        return self.proj(out.reshape(n, -1))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``[S, heads, len, d]`` segments -> ``[S * len, heads, d]`` (rows in packed order)."""
        if self.attn_implementation == "eager":
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(probs, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return out.transpose(1, 2).reshape(-1, self.num_heads, self.head_dim)


def _segments_by_length(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor):
    """Group the ``cu_seqlens`` segments by length and yield each group as one batch.

    Frames of one video (and same-size images) have equal lengths, so they cost one attention call
    together instead of one call each. Yields ``(row_index, q, k, v)`` with ``q [S, heads, len, d]``.
    """
    bounds = cu_seqlens.tolist()
    groups: dict[int, list[int]] = {}
    for start, end in zip(bounds[:-1], bounds[1:]):
        groups.setdefault(end - start, []).append(start)
    if len(groups) == 1:  # one length (a single image, or one video): no gather needed
        (length, starts), = groups.items()
        idx = torch.arange(q.shape[0], device=q.device)
        yield (idx, *(t.view(len(starts), length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v)))
        return
    for length, starts in groups.items():
        idx = (torch.tensor(starts, device=q.device)[:, None] + torch.arange(length, device=q.device)).reshape(-1)
        yield (idx, *(t.index_select(0, idx).view(len(starts), length, *t.shape[1:]).transpose(1, 2)
                      for t in (q, k, v)))


class VisionBlock(nn.Module):
    """Pre-norm ViT block: ``x + attn(norm1(x))``, then ``+ mlp(norm2(x))``."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.norm1 = make_norm(config)
        self.norm2 = make_norm(config)
        self.attn = VisionAttention(config.embed_dim, config.num_heads, config.attn_implementation)
        self.mlp = VISION_MLPS[config.mlp](config)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Norm each patch, concatenate each 2x2 block's four vectors, MLP to the LLM width: 4 patches -> 1 token."""

    def __init__(self, out_dim: int, context_dim: int, spatial_merge_size: int = 2,
                 norm: Callable[[int], nn.Module] | None = None) -> None:
        super().__init__()
        self.hidden_size = context_dim * spatial_merge_size**2
        self.ln_q = norm(context_dim) if norm is not None else nn.LayerNorm(context_dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.hidden_size, self.hidden_size), nn.GELU(),
                                 nn.Linear(self.hidden_size, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.hidden_size))


class Qwen2VisionTransformer(nn.Module):
    """The whole tower: ``pixel_values [N, patch_dim]``, ``grid_thw [n, 3]`` -> ``[N / merge**2, out_hidden_size]``.

    Module names equal the checkpoint keys under ``visual.``: ``patch_embed.proj``, ``blocks.{i}.norm1``,
    ``blocks.{i}.attn.qkv``, ``blocks.{i}.mlp.fc1``, ``merger.ln_q``, ``merger.mlp.{0,2}``.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.spatial_merge_size = config.spatial_merge_size
        self.patch_embed = PatchEmbed(config.patch_size, config.temporal_patch_size, config.in_channels,
                                      config.embed_dim)
        self.rotary_pos_emb = VisionRotaryEmbedding(config.head_dim, config.rope_theta)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config.out_hidden_size, config.embed_dim, config.spatial_merge_size,
                                  norm=lambda dim: make_norm(config, dim))

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def set_attn_implementation(self, name: str) -> None:
        self.config.attn_implementation = name
        self.config.__post_init__()
        for block in self.blocks:
            block.attn.attn_implementation = name

    # The forward pass in overridable steps ------------------------------------------------------
    def embed(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Patch vectors ``[N, embed_dim]``."""
        return self.patch_embed(pixel_values)

    def rotary(self, x: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The 2D RoPE tables ``cos, sin [N, head_dim]`` for the packed sequence."""
        return self.rotary_pos_emb(x, vision_position_ids(grid_thw, self.spatial_merge_size))

    def attention_segments(self, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """``cu_seqlens`` for each block (Qwen2-VL: the same per-frame segments everywhere)."""
        cu = vision_cu_seqlens(grid_thw)
        return [cu] * len(self.blocks)

    def run_blocks(self, x: torch.Tensor, segments: list[torch.Tensor], cos: torch.Tensor,
                   sin: torch.Tensor) -> torch.Tensor:
        for block, cu in zip(self.blocks, segments):
            x = block(x, cu, cos, sin)
        return x

    def merge(self, x: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        return self.merger(x)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, what: str = "pixel_values") -> torch.Tensor:
        check_vision_inputs(pixel_values, grid_thw, self.config, what)
        x = self.embed(pixel_values, grid_thw)
        cos, sin = self.rotary(x, grid_thw)
        x = self.run_blocks(x, self.attention_segments(grid_thw), cos, sin)
        return self.merge(x, grid_thw)
