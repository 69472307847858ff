"""The Qwen3-VL vision tower: 16-pixel patches, a learned position table resampled to every image, DeepStack taps.

Compared with chapter 10's tower (reference ``qwen_later_generations.md`` §2.4), following one forward pass:

1. **Patch embedding** of ``[3, 2, 16, 16]`` pixel cubes (1,536 values; the resize factor is 16 x 2 = 32 px),
   with a bias this time (:class:`~qwen_edu.vision.qwen2_vl_vit.PatchEmbed` ``bias=True``).
2. **A learned absolute position table** on top of the 2D RoPE: ``pos_embed`` holds a ``side x side`` grid of
   vectors (48 x 48 = 2,304 in the released towers), and every image samples it at its own grid size by
   bilinear interpolation with aligned corners (:func:`interpolate_position_table`): the table's corners land
   on the image's corner patches whatever the image's shape, so one table serves every resolution.
3. The blocks are chapter 10's (LayerNorm, cu_seqlens attention with 2D RoPE) with a ``linear_fc1`` /
   ``linear_fc2`` GELU-tanh MLP (:class:`VisionLinearMLP`).
4. **DeepStack taps**: after each block listed in ``deepstack_visual_indexes`` the patch vectors go through a
   merger of their own (:class:`VisionPatchMerger` with the norm *after* the 2 x 2 concatenation), giving one
   extra LLM-width feature per vision token per tap. The LLM adds tap ``j`` to the vision tokens' hidden
   states after its decoder layer ``j`` (:mod:`qwen_edu.vision.deepstack`): low-level ViT features reach the
   LLM's first layers directly instead of only through the last ViT layer.
5. The final merger (norm per patch, then concatenate 2 x 2, MLP), as in Qwen2-VL but with new key names.

:meth:`Qwen3VisionTransformer.forward` returns the merged features (like chapter 10's tower);
:meth:`Qwen3VisionTransformer.encode` returns them with the DeepStack features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from qwen_edu.vision.qwen2_5_vl_vit import read_vision_fields, write_vision_fields
from qwen_edu.vision.qwen2_vl_vit import (
    _ACTIVATIONS,
    PatchEmbed,
    Qwen2VisionTransformer,
    VisionConfig,
    check_vision_inputs,
    register_vision_mlp,
    vision_position_ids,
)

__all__ = ["Qwen3VisionConfig", "VisionLinearMLP", "VisionPatchMerger", "interpolate_position_table",
           "VisionOutput", "Qwen3VisionTransformer"]

_HF_KEYS = {"depth", "hidden_size", "out_hidden_size", "intermediate_size", "hidden_act", "num_heads", "in_channels",
            "in_chans", "patch_size", "spatial_patch_size", "spatial_merge_size", "temporal_patch_size",
            "num_position_embeddings", "deepstack_visual_indexes", "rope_parameters", "model_type"}


class VisionLinearMLP(nn.Module):
    """Qwen3-VL's ViT MLP: ``linear_fc2(act(linear_fc1(x)))`` with biases (``act`` = tanh-approximated GELU)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.linear_fc1 = nn.Linear(config.embed_dim, config.mlp_hidden_size, bias=True)
        self.linear_fc2 = nn.Linear(config.mlp_hidden_size, config.embed_dim, bias=True)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


register_vision_mlp("linear_fc", VisionLinearMLP)


@dataclass
class Qwen3VisionConfig(VisionConfig):
    """:class:`VisionConfig` with Qwen3-VL's choices; defaults are transformers' ``Qwen3VLVisionConfig``.

    ``num_position_embeddings`` is the size of the learned table (a square: 2,304 = 48 x 48);
    ``deepstack_visual_indexes`` are the blocks whose outputs are tapped for DeepStack (0-based).
    """

    depth: int = 27
    embed_dim: int = 1152
    out_hidden_size: int = 3584
    intermediate_size: int | None = 4304
    hidden_act: str = "gelu_pytorch_tanh"
    patch_size: int = 16
    mlp: str = "linear_fc"
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: list[int] = field(default_factory=lambda: [8, 16, 24])

    def __post_init__(self) -> None:
        super().__post_init__()
        self.deepstack_visual_indexes = [int(i) for i in self.deepstack_visual_indexes]
        bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"deepstack_visual_indexes {bad} are not blocks of a depth-{self.depth} tower")
        if len(set(self.deepstack_visual_indexes)) != len(self.deepstack_visual_indexes):
            raise ValueError(f"deepstack_visual_indexes {self.deepstack_visual_indexes} name a block twice")
        if self.num_position_embeddings < 1:
            raise ValueError(f"num_position_embeddings must be >= 1, got {self.num_position_embeddings}")

    @property
    def position_grid_side(self) -> int:
        """Side of the learned position grid: ``int(sqrt(num_position_embeddings))``, as the reference takes it."""
        return math.isqrt(self.num_position_embeddings)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> Qwen3VisionConfig:
        """Read a Qwen3-VL ``vision_config`` (``hidden_size`` = ViT width, ``out_hidden_size`` = LLM width)."""
        defaults = cls()
        return cls(
            **read_vision_fields(hf, defaults),
            num_position_embeddings=hf.get("num_position_embeddings", defaults.num_position_embeddings),
            deepstack_visual_indexes=list(hf.get("deepstack_visual_indexes", defaults.deepstack_visual_indexes)),
            extra={k: v for k, v in hf.items() if k not in _HF_KEYS},
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The Qwen3-VL ``vision_config`` dict."""
        if (self.norm, self.mlp) != ("layernorm", "linear_fc"):
            raise ValueError("a Qwen3-VL vision_config describes LayerNorm + linear_fc blocks only")
        return write_vision_fields(self, num_position_embeddings=self.num_position_embeddings,
                                   deepstack_visual_indexes=list(self.deepstack_visual_indexes))


class VisionPatchMerger(nn.Module):
    """2 x 2 patches -> one LLM-width token: LayerNorm, concatenate the four, ``linear_fc1``, GELU, ``linear_fc2``.

    ``postshuffle_norm=False`` (the final merger) normalises each patch vector before concatenating them, as
    chapter 10's merger does; ``True`` (the DeepStack mergers) normalises the concatenated ``4 * D`` vector.
    """

    def __init__(self, dim: int, out_dim: int, spatial_merge_size: int = 2, postshuffle_norm: bool = False) -> None:
        super().__init__()
        self.hidden_size = dim * spatial_merge_size**2
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(self.hidden_size if postshuffle_norm else dim, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.hidden_size, self.hidden_size)
        self.act = nn.GELU()
        self.linear_fc2 = nn.Linear(self.hidden_size, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.postshuffle_norm:
            x = self.norm(x.view(-1, self.hidden_size))
        else:
            x = self.norm(x).view(-1, self.hidden_size)
        return self.linear_fc2(self.act(self.linear_fc1(x)))


def _axis_taps(index: torch.Tensor, size: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two table rows (``[n, 2]``) a coordinate falls between, and their bilinear weights (aligned corners).

    Coordinate ``i`` of an axis of ``size`` cells maps to ``i * (side - 1) / (size - 1)`` on the table; the
    arithmetic (float32, this order) is transformers' so that the sums are bit-identical with it.
    """
    src = index.to(torch.float32) * (side - 1) / max(size - 1, 1)
    floor = torch.floor(src)
    offsets = torch.arange(2)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    weights = (1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)
    return taps, weights


def interpolate_position_table(table: torch.Tensor, grid_thw: torch.Tensor, spatial_merge_size: int = 2,
                               ) -> torch.Tensor:
    """``[N, D]`` learned position of every packed patch: the ``[side * side, D]`` table resampled per image.

    Row ``r * side + c`` of ``table`` is grid cell ``(r, c)``. A patch at ``(row, col)`` of an ``h x w`` grid
    reads the four cells around ``(row * (side-1)/(h-1), col * (side-1)/(w-1))``, weighted bilinearly; patches
    come in chapter 10's merge-block order and every frame group of a video gets the same positions.
    """
    side = math.isqrt(table.shape[0])
    out = []
    for t, h, w in grid_thw.tolist():
        pos = vision_position_ids(torch.tensor([[1, h, w]]), spatial_merge_size)  # [h*w, 2] in merge order
        row_taps, row_w = _axis_taps(pos[:, 0], h, side)
        col_taps, col_w = _axis_taps(pos[:, 1], w, side)
        index = (row_taps[:, :, None] * side + col_taps[:, None, :]).reshape(-1, 4).to(table.device)
        weight = (row_w[:, :, None] * col_w[:, None, :]).reshape(-1, 4).to(table.device)
        out.append((F.embedding(index, table) * weight[:, :, None]).sum(1).repeat(t, 1))
    return torch.cat(out)


class VisionOutput(NamedTuple):
    """The tower's output: merged features ``[N/4, out]`` and one ``[N/4, out]`` tensor per DeepStack tap."""

    features: torch.Tensor
    deepstack: list[torch.Tensor]


class Qwen3VisionTransformer(Qwen2VisionTransformer):
    """Chapter 10's tower with a learned interpolated position table, a new merger and DeepStack taps.

    Module names equal the checkpoint keys under ``model.visual.``: ``patch_embed.proj`` (weight and bias),
    ``pos_embed``, ``blocks.{i}.norm1`` / ``attn.qkv`` / ``mlp.linear_fc1``, ``merger.norm`` / ``linear_fc1`` /
    ``linear_fc2`` and ``deepstack_merger_list.{j}.*``.
    """

    config: Qwen3VisionConfig

    def __init__(self, config: Qwen3VisionConfig) -> None:
        super().__init__(config)
        self.patch_embed = PatchEmbed(config.patch_size, config.temporal_patch_size, config.in_channels,
                                      config.embed_dim, bias=True)
        self.pos_embed = nn.Embedding(config.num_position_embeddings, config.embed_dim)
        self.merger = VisionPatchMerger(config.embed_dim, config.out_hidden_size, config.spatial_merge_size)
        self.deepstack_merger_list = nn.ModuleList(
            VisionPatchMerger(config.embed_dim, config.out_hidden_size, config.spatial_merge_size,
                              postshuffle_norm=True) for _ in config.deepstack_visual_indexes)

    def embed(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Patch vectors plus their interpolated learned positions."""
        x = super().embed(pixel_values, grid_thw)
        table = interpolate_position_table(self.pos_embed.weight, grid_thw, self.spatial_merge_size)
        return x + table.to(x.dtype)

    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, what: str = "pixel_values") -> VisionOutput:
        """Merged features and the DeepStack features (tap ``j`` after block ``deepstack_visual_indexes[j]``)."""
        check_vision_inputs(pixel_values, grid_thw, self.config, what)
        x = self.embed(pixel_values, grid_thw)
        cos, sin = self.rotary(x, grid_thw)
        taps = self.config.deepstack_visual_indexes
        deepstack: list[torch.Tensor] = []  # in block order, each through the merger listed with its block
        for i, (block, cu) in enumerate(zip(self.blocks, self.attention_segments(grid_thw))):
            x = block(x, cu, cos, sin)
            if i in taps:
                deepstack.append(self.deepstack_merger_list[taps.index(i)](x))
        return VisionOutput(self.merge(x, grid_thw), deepstack)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, what: str = "pixel_values") -> torch.Tensor:
        return self.encode(pixel_values, grid_thw, what).features
