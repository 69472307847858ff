"""The Qwen2.5-VL vision tower: chapter 10's ViT with RMSNorm, SwiGLU and window attention.

What changed from Qwen2-VL's tower (reference ``qwen_architectures.md`` §10), and where it lives here:

* ``norm1``/``norm2`` and the merger's ``ln_q`` are RMSNorms and the MLP is a SwiGLU **with biases**
  (``gate_proj``/``up_proj``/``down_proj``, SiLU) -- the same choices as the LLM, so one set of kernels serves
  both. These are options of chapter 10's blocks (``VisionConfig(norm="rmsnorm", mlp="swiglu")``).
* Window attention (:mod:`qwen_edu.vision.window_attention`): the patch sequence and its rotary table are
  permuted window by window after the patch embedding; blocks in ``fullatt_block_indexes`` attend over each
  frame (chapter 10's ``cu_seqlens``), the others inside each window (``cu_window_seqlens``); the merged tokens
  are put back in their original order at the end. :class:`Qwen2_5VisionTransformer` overrides three of the
  tower's steps for this, nothing else.

**A naming trap in ``config.json``:** Qwen2.5-VL's ``vision_config.hidden_size`` is the *ViT* width (1280) and
``out_hidden_size`` the LLM width, where Qwen2-VL used ``embed_dim`` and ``hidden_size``. :class:`Qwen2_5VisionConfig`
stores both by meaning (``embed_dim``, ``out_hidden_size``) and reads and writes the 2.5 names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from qwen_edu.vision.qwen2_vl_vit import Qwen2VisionTransformer, VisionConfig
from qwen_edu.vision.window_attention import permute_units, unpermute_units, window_partition

__all__ = ["Qwen2_5VisionConfig", "Qwen2_5VisionTransformer", "read_vision_fields", "write_vision_fields"]

# vision_config keys Qwen2_5VisionConfig reads (the rest is kept in `extra`).
_HF_KEYS = {"depth", "hidden_size", "out_hidden_size", "intermediate_size", "hidden_act", "num_heads", "in_channels",
            "in_chans", "patch_size", "spatial_patch_size", "spatial_merge_size", "temporal_patch_size", "window_size",
            "fullatt_block_indexes", "tokens_per_second", "rope_parameters", "model_type"}


@dataclass
class Qwen2_5VisionConfig(VisionConfig):
    """:class:`VisionConfig` with Qwen2.5-VL's choices; defaults are transformers' ``Qwen2_5_VLVisionConfig``.

    ``window_size`` is in pixels (112: 4 x 4 merged tokens); ``fullatt_block_indexes`` are the blocks that
    attend over whole frames; ``tokens_per_second`` is how many temporal position ids one second of video
    spans in the LLM's M-RoPE (transformers' class default is 4, every released checkpoint says 2).
    """

    depth: int = 32
    embed_dim: int = 3584
    out_hidden_size: int = 3584
    intermediate_size: int | None = 3420
    hidden_act: str = "silu"
    norm: str = "rmsnorm"
    mlp: str = "swiglu"
    window_size: int = 112
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    tokens_per_second: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        self.fullatt_block_indexes = [int(i) for i in self.fullatt_block_indexes]
        self.tokens_per_second = int(self.tokens_per_second)
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"fullatt_block_indexes {bad} are not blocks of a depth-{self.depth} tower")
        unit = self.patch_size * self.spatial_merge_size
        if self.window_size < unit or self.window_size % unit:
            raise ValueError(f"window_size={self.window_size} px must be a positive multiple of {unit} px "
                             "(patch_size x spatial_merge_size: windows hold whole merge units)")

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> Qwen2_5VisionConfig:
        """Read a Qwen2.5-VL ``vision_config`` (``hidden_size`` = ViT width, ``out_hidden_size`` = LLM width)."""
        defaults = cls()
        return cls(
            **read_vision_fields(hf, defaults),
            window_size=hf.get("window_size", defaults.window_size),
            fullatt_block_indexes=list(hf.get("fullatt_block_indexes", defaults.fullatt_block_indexes)),
            tokens_per_second=hf.get("tokens_per_second", defaults.tokens_per_second),
            extra={k: v for k, v in hf.items() if k not in _HF_KEYS},
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The Qwen2.5-VL ``vision_config`` dict."""
        if (self.norm, self.mlp) != ("rmsnorm", "swiglu"):
            raise ValueError("a Qwen2.5-VL vision_config describes RMSNorm + SwiGLU blocks only")
        return write_vision_fields(self, window_size=self.window_size,
                                   fullatt_block_indexes=list(self.fullatt_block_indexes),
                                   tokens_per_second=self.tokens_per_second)


def read_vision_fields(hf: dict[str, Any], defaults: VisionConfig) -> dict[str, Any]:
    """The ``vision_config`` keys Qwen2.5-VL and Qwen3-VL share, as :class:`VisionConfig` fields.

    From Qwen2.5-VL on, ``hidden_size`` is the ViT width and ``out_hidden_size`` the LLM width, and the MLP
    width is given as ``intermediate_size``; missing keys take ``defaults``' values.
    """
    rope = hf.get("rope_parameters") or {}
    return dict(
        depth=hf.get("depth", defaults.depth),
        embed_dim=hf.get("hidden_size", defaults.embed_dim),
        out_hidden_size=hf.get("out_hidden_size", defaults.out_hidden_size),
        intermediate_size=hf.get("intermediate_size", defaults.intermediate_size),
        num_heads=hf.get("num_heads", defaults.num_heads),
        hidden_act=hf.get("hidden_act", defaults.hidden_act),
        in_channels=hf.get("in_channels", hf.get("in_chans", defaults.in_channels)),
        patch_size=hf.get("patch_size", hf.get("spatial_patch_size", defaults.patch_size)),
        temporal_patch_size=hf.get("temporal_patch_size", defaults.temporal_patch_size),
        spatial_merge_size=hf.get("spatial_merge_size", defaults.spatial_merge_size),
        rope_theta=float(rope.get("rope_theta", defaults.rope_theta)),
    )


def write_vision_fields(config: VisionConfig, **own: Any) -> dict[str, Any]:
    """The inverse of :func:`read_vision_fields`, plus the model's ``own`` keys, over ``config.extra``."""
    out = dict(config.extra)
    out.update(depth=config.depth, hidden_size=config.embed_dim, out_hidden_size=config.out_hidden_size,
               intermediate_size=config.mlp_hidden_size, num_heads=config.num_heads, hidden_act=config.hidden_act,
               in_channels=config.in_channels, patch_size=config.patch_size,
               temporal_patch_size=config.temporal_patch_size, spatial_merge_size=config.spatial_merge_size, **own)
    if config.rope_theta != 10000.0:
        out["rope_parameters"] = {"rope_type": "axial", "rope_theta": config.rope_theta}
    return out


class Qwen2_5VisionTransformer(Qwen2VisionTransformer):
    """Chapter 10's tower with window attention: patches and rotary table permuted window by window.

    Module names (checkpoint keys under ``visual.``) are Qwen2-VL's except the MLP's: ``blocks.{i}.mlp.gate_proj``,
    ``up_proj``, ``down_proj``; the norms have weights only.
    """

    config: Qwen2_5VisionConfig

    def windows(self, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(window_index, cu_window_seqlens)`` of these items (cached per grid)."""
        c = self.config
        return window_partition(grid_thw, c.window_size, c.patch_size, c.spatial_merge_size)

    def embed(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        return permute_units(super().embed(pixel_values, grid_thw), self.windows(grid_thw)[0],
                             self.spatial_merge_size**2)

    def rotary(self, x: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index, unit = self.windows(grid_thw)[0], self.spatial_merge_size**2
        cos, sin = super().rotary(x, grid_thw)  # each patch's own (row, col), so permuting them keeps them right
        return permute_units(cos, index, unit), permute_units(sin, index, unit)

    def attention_segments(self, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        frames = super().attention_segments(grid_thw)[0]
        windows = self.windows(grid_thw)[1]
        return [frames if i in self.config.fullatt_block_indexes else windows for i in range(len(self.blocks))]

    def merge(self, x: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        return unpermute_units(super().merge(x, grid_thw), self.windows(grid_thw)[0])
