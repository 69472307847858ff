"""What every Qwen vision model does to a picture first: open it as RGB and normalise like CLIP.

Qwen-VL and Qwen2-VL (and their successors) were initialised from CLIP-style vision towers, so
pixels are scaled to [0, 1] and normalised with OpenAI CLIP's per-channel mean and std. Resizing
differs per model (a 448x448 squash for Qwen-VL, ``smart_resize`` for Qwen2-VL) and lives with
each model's preprocessing.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["CLIP_MEAN", "CLIP_STD", "load_image", "to_float_tensor", "clip_normalize"]

#: OpenAI CLIP's RGB statistics (the ``image_mean`` / ``image_std`` of every Qwen VL processor).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def load_image(image: Any) -> Image.Image:
    """A PIL image in RGB from a path, a PIL image, or an ``[H, W, 3]`` uint8 array or tensor."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, str | os.PathLike):
        if not os.path.isfile(image):
            raise FileNotFoundError(f"image file {os.fspath(image)!r} does not exist")
        with Image.open(image) as opened:
            return opened.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    shape = getattr(image, "shape", None)
    if shape is None or len(shape) != 3 or shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected a path, a PIL image or an [H, W, C] array, got {type(image).__name__} "
                         f"with shape {shape}")
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"image has zero size: {tuple(shape)}")
    return Image.fromarray(image.squeeze(-1) if shape[-1] == 1 else image).convert("RGB")


def to_float_tensor(image: Image.Image) -> torch.Tensor:
    """``[3, H, W]`` float32 in [0, 1] (the processors' ``rescale_factor = 1/255``)."""
    import numpy as np

    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def clip_normalize(pixels: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` per channel for ``[..., 3, H, W]`` pixels in [0, 1]."""
    if pixels.dim() < 3 or pixels.shape[-3] != 3:
        raise ValueError(f"expected [..., 3, H, W] pixels, got shape {tuple(pixels.shape)}")
    mean = torch.tensor(CLIP_MEAN, dtype=pixels.dtype, device=pixels.device)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=pixels.dtype, device=pixels.device)[:, None, None]
    return (pixels - mean) / std
