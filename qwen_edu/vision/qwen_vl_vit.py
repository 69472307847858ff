"""Qwen-VL's vision tower: a CLIP-style ViT, the 256-query resampler, ``ln_post`` and ``proj``.

This is ``transformer.visual`` of a Qwen-VL checkpoint (reference §11.3). Attribute names equal the
checkpoint keys below that prefix (``conv1``, ``positional_embedding``, ``transformer.resblocks.N.attn
.in_proj`` ...), so loading is a plain prefix mapping (:mod:`qwen_edu.models.qwen_vl`). The pieces:

1. :func:`image_transform`: squash the picture to ``image_size x image_size`` (bicubic; the aspect ratio
   is *not* kept), scale to [0, 1], CLIP-normalise.
2. ``conv1``: a bias-free ``patch_size`` convolution with stride ``patch_size`` = one linear map per
   patch; 448 / 14 = a 32x32 grid of 1,024 patch features, flattened row-major.
3. ``positional_embedding``: a *learned* ``[256, width]`` table on a 16x16 grid, resized bicubically (in
   fp32) to the patch grid and added; then ``ln_pre``.
4. ``transformer.resblocks``: pre-LayerNorm blocks (eps 1e-6) with exact GELU. Their attention
   (:class:`VisualAttention`) uses one fused ``in_proj`` whose output rows are **head-interleaved**:
   head h owns rows ``h*3d .. h*3d+3d`` as ``[q_h | k_h | v_h]`` (Megatron style), *not* PyTorch's
   q | k | v blocks. Its softmax runs in the input dtype.
5. ``attn_pool`` (:class:`qwen_edu.vision.resampler.Resampler`), ``ln_post`` and ``x @ proj``.

The reference runs the blocks sequence-first (``[L, B, C]``); we keep batch-first tensors, which is the
same arithmetic.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qwen_edu.vision.preprocessing import clip_normalize, load_image, to_float_tensor
from qwen_edu.vision.resampler import Resampler, resize_position_table

__all__ = [
    "QwenVLVisionConfig",
    "image_transform",
    "VisualAttention",
    "VisualAttentionBlock",
    "TransformerBlocks",
    "QwenVLVisionTransformer",
]


@dataclass
class QwenVLVisionConfig:
    """The ``visual`` sub-config of a Qwen-VL ``config.json`` (defaults: Qwen-VL / Qwen-VL-Chat).

    ``n_queries`` (the reference's constructor default, 256) and ``positional_grid`` (the side of the
    learned ViT position table, fixed to 16 in the reference code) are written to ``config.json`` only
    when they differ from those values, so a real checkpoint's config round-trips unchanged; the book's
    small model uses smaller values. The resampler has ``output_dim // 128`` heads, as in the reference.
    """

    width: int = 1664
    layers: int = 48
    heads: int = 16
    mlp_ratio: float = 4.9231
    image_size: int = 448
    patch_size: int = 14
    output_dim: int = 4096
    n_queries: int = 256
    positional_grid: int = 16
    image_start_id: int = 151857
    attn_implementation: str = "sdpa"
    # Keys of the visual dict we do not interpret, kept for round trips.
    extra: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"visual width={self.width} is not divisible by heads={self.heads}")
        side = int(round(self.n_queries**0.5))
        if side * side != self.n_queries:
            raise ValueError(f"visual n_queries={self.n_queries} must be a square (the queries sit on a grid)")
        heads = self.output_dim // 128
        if heads < 1 or self.output_dim % heads:
            raise ValueError(f"visual output_dim={self.output_dim}: the resampler has output_dim // 128 heads, "
                             "so it must be at least 128 and divisible by that head count")
        if self.output_dim % 4:
            raise ValueError(f"visual output_dim={self.output_dim} must be divisible by 4 (2D sin-cos table)")
        if self.image_size % self.patch_size:
            raise ValueError(f"visual image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {self.attn_implementation!r}")

    @property
    def mlp_width(self) -> int:
        """``int(width * mlp_ratio)``: 8192 for Qwen-VL (1664 * 4.9231 = 8192.04)."""
        return int(self.width * self.mlp_ratio)

    @property
    def resampler_heads(self) -> int:
        return self.output_dim // 128

    @property
    def query_grid(self) -> int:
        return int(round(self.n_queries**0.5))

    @property
    def grid(self) -> int:
        """Patches per side at ``image_size`` (32 for Qwen-VL)."""
        return self.image_size // self.patch_size

    @classmethod
    def from_dict(cls, visual: dict[str, Any]) -> QwenVLVisionConfig:
        """Read the ``visual`` dict of ``config.json``."""
        known = {f.name for f in fields(cls)} - {"extra", "attn_implementation"}
        required = {"width", "layers", "heads", "mlp_ratio", "image_size", "patch_size", "output_dim"}
        missing = sorted(required - visual.keys())
        if missing:
            raise KeyError(f"the visual sub-config lacks {missing}")
        values = {k: v for k, v in visual.items() if k in known}
        extra = {k: v for k, v in visual.items() if k not in known}
        return cls(**values, extra=extra or None)

    def to_dict(self) -> dict[str, Any]:
        """The ``visual`` dict for ``config.json`` (reference key names)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("extra", "attn_implementation")}
        if out["n_queries"] == 256:
            del out["n_queries"]
        if out["positional_grid"] == 16:
            del out["positional_grid"]
        return {**(self.extra or {}), **out}


def image_transform(image: Any, image_size: int = 448) -> torch.Tensor:
    """One picture (path, PIL image or ``[H, W, 3]`` array) -> ``[3, image_size, image_size]`` float32.

    Like the reference's ``Resize((S, S), BICUBIC) -> ToTensor -> Normalize(CLIP)``: torchvision resizes
    a PIL image with PIL's own bicubic filter, which is what we call. The image is squashed to a square.
    """
    from PIL import Image

    picture = load_image(image)
    resized = picture.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return clip_normalize(to_float_tensor(resized))


class VisualAttention(nn.Module):
    """ViT self-attention with the reference's fused, **head-interleaved** ``in_proj`` (reference §11.3).

    ``in_proj(x)`` is viewed as ``[B, L, heads, 3 * head_dim]`` and split on the last axis into q, k, v.
    Scores are ``(q / sqrt(head_dim)) @ k^T``; no mask. ``eager`` keeps the softmax in the input dtype
    like the reference; ``sdpa`` calls the fused kernel (equal up to rounding).
    """

    def __init__(self, width: int, heads: int, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.attn_implementation = attn_implementation
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, width = x.shape
        mixed = self.in_proj(x).view(b, length, self.heads, 3 * self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in mixed.split(self.head_dim, dim=-1))  # [B, heads, L, d] each
        if self.attn_implementation == "eager":
            probs = ((q / self.head_dim**0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
            out = probs @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, length, width))


class VisualAttentionBlock(nn.Module):
    """Pre-LN block: ``x + attn(ln_1(x))``, then ``+ mlp(ln_2(x))`` with ``c_fc -> GELU -> c_proj``."""

    def __init__(self, width: int, heads: int, mlp_width: int, eps: float = 1e-6,
                 attn_implementation: str = "sdpa") -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = VisualAttention(width, heads, attn_implementation)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, mlp_width)),
            ("gelu", nn.GELU()),  # exact (erf) GELU, not the tanh approximation
            ("c_proj", nn.Linear(mlp_width, width)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TransformerBlocks(nn.Module):
    """The stack of blocks, named ``transformer.resblocks`` in the checkpoint."""

    def __init__(self, config: QwenVLVisionConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(
            VisualAttentionBlock(config.width, config.heads, config.mlp_width,
                                 attn_implementation=config.attn_implementation)
            for _ in range(config.layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class QwenVLVisionTransformer(nn.Module):
    """Pixels ``[N, 3, H, W]`` -> ``[N, n_queries, output_dim]`` visual tokens for the language model."""

    def __init__(self, config: QwenVLVisionConfig) -> None:
        super().__init__()
        self.config = config
        width = config.width
        self.conv1 = nn.Conv2d(3, width, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        self.positional_embedding = nn.Parameter(width**-0.5 * torch.randn(config.positional_grid**2, width))
        self.ln_pre = nn.LayerNorm(width, eps=1e-6)
        self.transformer = TransformerBlocks(config)
        self.attn_pool = Resampler(config.query_grid, config.output_dim, config.resampler_heads, kv_dim=width,
                                   attn_implementation=config.attn_implementation)
        self.ln_post = nn.LayerNorm(config.output_dim, eps=1e-6)
        self.proj = nn.Parameter(config.output_dim**-0.5 * torch.randn(config.output_dim, config.output_dim))

    def set_attn_implementation(self, name: str) -> None:
        """Switch the ViT blocks and the resampler between ``"eager"`` and ``"sdpa"``."""
        self.config.attn_implementation = name
        for module in self.modules():
            if hasattr(module, "attn_implementation") and module is not self:
                module.attn_implementation = name

    def check_pixels(self, pixel_values: torch.Tensor) -> None:
        """Raise a clear error unless ``pixel_values`` is ``[N, 3, H, W]`` with H, W multiples of the patch."""
        p = self.config.patch_size
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(f"pixel_values must be a [num_images, 3, height, width] tensor, got {shape}")
        if pixel_values.shape[2] % p or pixel_values.shape[3] % p or 0 in pixel_values.shape:
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}: height and width must be "
                             f"positive multiples of patch_size={p} (preprocess with image_transform)")

    def patch_features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Steps 2-4: the ViT's output ``[N, h*w, width]`` and its grid ``(h, w)``."""
        self.check_pixels(pixel_values)
        x = self.conv1(pixel_values.to(device=self.conv1.weight.device, dtype=self.conv1.weight.dtype))
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)  # [N, h*w, width], row-major over the grid
        x = x + resize_position_table(self.positional_embedding, grid)
        return self.transformer(self.ln_pre(x)), grid

    def forward(self, pixel_values: torch.Tensor, need_weights: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """``[N, 3, H, W]`` -> ``[N, n_queries, output_dim]`` (plus resampler attention if asked)."""
        x, grid = self.patch_features(pixel_values)
        x, weights = self.attn_pool(x, grid, need_weights=need_weights)
        x = self.ln_post(x) @ self.proj
        return (x, weights) if need_weights else x

    def preprocess(self, images: Sequence[Any], image_size: int | None = None) -> torch.Tensor:
        """Pictures (paths, PIL images, arrays) -> a ``[N, 3, S, S]`` batch at ``image_size`` (default: config)."""
        size = image_size or self.config.image_size
        return torch.stack([image_transform(image, size) for image in images])

    def encode(self, images: Sequence[str | os.PathLike | Any]) -> torch.Tensor:
        """The reference's ``encode``: load each picture, transform it and run the tower."""
        return self(self.preprocess(images))
