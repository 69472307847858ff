"""Naive dynamic resolution (Qwen2-VL): an image keeps (about) its own size and becomes as many patches as it needs.

Qwen-VL squashed every picture to 448x448. Qwen2-VL instead

1. rounds each side to a multiple of ``factor = patch_size * merge_size = 28`` pixels, shrinking or growing
   the whole picture only when its area leaves ``[min_pixels, max_pixels]`` (:func:`smart_resize`);
2. resizes with PIL bicubic, rescales by 1/255 and normalises with CLIP's mean and std;
3. treats a still image as a video of two identical frames, because the patch embedding is a 3D
   convolution over ``temporal_patch_size = 2`` frames;
4. cuts the frames into ``[2, 14, 14]`` patches and lists them in **2x2 merge-block order** (block row,
   block column, then the four patches of the block), so that the merger later finds each block's four
   patches in four consecutive rows (:func:`patchify`).

The result is ``pixel_values [sum(t*h*w), C*2*14*14]`` for all images of a batch concatenated, and
``grid_thw [n_images, 3]`` saying how to cut it apart again. Everything here reproduces
``transformers``' PIL image processor (``Qwen2VLImageProcessorPil``) bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from qwen_edu.vision.preprocessing import CLIP_MEAN, CLIP_STD, load_image

__all__ = [
    "IMAGE_MIN_PIXELS",
    "IMAGE_MAX_PIXELS",
    "VIDEO_MIN_PIXELS",
    "VIDEO_MAX_PIXELS",
    "MAX_ASPECT_RATIO",
    "smart_resize",
    "num_vision_tokens",
    "to_rgb",
    "resize_bicubic",
    "rescale_normalize",
    "patchify",
    "unpatchify",
    "preprocess_image",
    "preprocess_images",
    "preprocess_video",
]

#: The image processor's pixel budget (class defaults; the hub's preprocessor_config may raise max_pixels).
IMAGE_MIN_PIXELS = 56 * 56
IMAGE_MAX_PIXELS = 28 * 28 * 1280
#: The video processor's per-frame pixel budget.
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 28 * 28 * 768
#: smart_resize refuses images more elongated than this.
MAX_ASPECT_RATIO = 200


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = IMAGE_MIN_PIXELS,
                 max_pixels: int = IMAGE_MAX_PIXELS) -> tuple[int, int]:
    """The ``(height, width)`` Qwen2-VL resizes an image to: multiples of ``factor``, area within bounds.

    Each side is first rounded to the nearest multiple of ``factor`` with Python's ``round``, which rounds
    halves to even (70 / 28 = 2.5 -> 2, so 70 px becomes 56, while 98 / 28 = 3.5 -> 4 gives 112). Only if the
    rounded area exceeds ``max_pixels`` (or falls below ``min_pixels``) is the image scaled as a whole by
    ``beta = sqrt(area / max_pixels)`` (or ``sqrt(min_pixels / area)``), flooring (or ceiling) each side to
    a multiple of ``factor``, so the aspect ratio is kept as well as the grid allows.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image has zero size: height={height}, width={width}")
    if factor <= 0 or min_pixels <= 0 or max_pixels < min_pixels:
        raise ValueError(f"need factor > 0 and 0 < min_pixels <= max_pixels, got factor={factor}, "
                         f"min_pixels={min_pixels}, max_pixels={max_pixels}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"absolute aspect ratio must be at most {MAX_ASPECT_RATIO}, got {ratio:.1f} "
                         f"(height={height}, width={width})")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def num_vision_tokens(height: int, width: int, *, patch_size: int = 14, merge_size: int = 2,
                      min_pixels: int = IMAGE_MIN_PIXELS, max_pixels: int = IMAGE_MAX_PIXELS) -> int:
    """How many LLM tokens an image of this size becomes: ``(h'/14) * (w'/14) / 4``."""
    h, w = smart_resize(height, width, patch_size * merge_size, min_pixels, max_pixels)
    return (h // patch_size) * (w // patch_size) // (merge_size * merge_size)


def to_rgb(image: Any) -> Any:
    """An RGB PIL image; transparent pixels are composited onto **white** (as Qwen's and HF's processors do).

    A plain ``convert("RGB")`` would drop the alpha channel and show whatever colour hides under it.
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        pil = image
    elif getattr(image, "shape", None) is not None and len(image.shape) == 3 and image.shape[-1] == 4:
        pil = Image.fromarray(np.asarray(image, dtype=np.uint8), mode="RGBA")
    else:
        return load_image(image)
    if "A" in pil.getbands() or pil.info.get("transparency") is not None:
        rgba = pil.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return pil.convert("RGB")


def resize_bicubic(image: Any, height: int, width: int) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB array of ``image`` resized with PIL's bicubic filter (the processor's)."""
    from PIL import Image

    pil = to_rgb(image)
    if pil.size != (width, height):
        pil = pil.resize((width, height), resample=Image.Resampling.BICUBIC)
    return np.asarray(pil, dtype=np.uint8)


def rescale_normalize(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``[..., H, W, 3]`` -> float32 ``[..., 3, H, W]``, scaled by 1/255 and CLIP-normalised.

    The arithmetic follows the reference to the bit: the rescale is done in float64 (``x * (1/255)``) and
    then rounded to float32; mean subtraction and division by std happen in float32. (Dividing a float32 by
    255 directly differs from this in the last bit for some pixel values.)
    """
    scaled = (frames.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)
    std = np.asarray(CLIP_STD, dtype=np.float32)
    normed = (scaled - mean) / std
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(normed, -1, -3)))


def patchify(frames: torch.Tensor, patch_size: int = 14, temporal_patch_size: int = 2,
             merge_size: int = 2) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``frames [T, C, H, W]`` -> ``(patches [gt*gh*gw, C*tp*ps*ps], (gt, gh, gw))`` in merge-block order.

    ``T`` is padded up to a multiple of ``temporal_patch_size`` by repeating the last frame (a still image,
    ``T = 1``, becomes two identical frames). Rows run over frame groups, then merge-block rows, merge-block
    columns, and the ``merge x merge`` patches inside a block (row-major); each row's features run over
    channel, frame within the group, patch row and patch column -- the flattening order of a Conv3d kernel
    ``[C, tp, ps, ps]``, so the patch embedding is one matrix multiply.
    """
    if frames.dim() != 4:
        raise ValueError(f"expected frames [T, C, H, W], got shape {tuple(frames.shape)}")
    t, c, h, w = frames.shape
    block = patch_size * merge_size
    if t == 0 or h % block or w % block:
        raise ValueError(f"frames of shape {tuple(frames.shape)}: need T >= 1 and H, W multiples of "
                         f"patch_size * merge_size = {block} (use smart_resize first)")
    if t % temporal_patch_size:
        repeat = temporal_patch_size - t % temporal_patch_size
        frames = torch.cat([frames, frames[-1:].expand(repeat, c, h, w)], dim=0)
        t = frames.shape[0]
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    x = frames.reshape(gt, temporal_patch_size, c, gh // merge_size, merge_size, patch_size,
                       gw // merge_size, merge_size, patch_size)
    # [gt, tp, C, bh, mh, ph, bw, mw, pw] -> [gt, bh, bw, mh, mw, C, tp, ph, pw]
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size), (gt, gh, gw)


def unpatchify(patches: torch.Tensor, grid_thw: Sequence[int], channels: int = 3, patch_size: int = 14,
               temporal_patch_size: int = 2, merge_size: int = 2) -> torch.Tensor:
    """The inverse of :func:`patchify`: ``[gt*gh*gw, C*tp*ps*ps]`` -> frames ``[gt*tp, C, gh*ps, gw*ps]``."""
    gt, gh, gw = (int(v) for v in grid_thw)
    if patches.shape != (gt * gh * gw, channels * temporal_patch_size * patch_size * patch_size):
        raise ValueError(f"patches of shape {tuple(patches.shape)} do not fit grid_thw {(gt, gh, gw)}")
    x = patches.reshape(gt, gh // merge_size, gw // merge_size, merge_size, merge_size, channels,
                        temporal_patch_size, patch_size, patch_size)
    x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8)
    return x.reshape(gt * temporal_patch_size, channels, gh * patch_size, gw * patch_size)


def _image_size(image: Any) -> tuple[int, int]:
    """``(height, width)`` of a PIL image or an ``[H, W, C]`` array, without converting it."""
    size = getattr(image, "size", None)
    if isinstance(size, tuple) and len(size) == 2:  # PIL: (width, height)
        return int(size[1]), int(size[0])
    shape = getattr(image, "shape", None)
    if shape is not None and len(shape) == 3:
        return int(shape[0]), int(shape[1])
    pil = load_image(image)
    return pil.size[1], pil.size[0]


def preprocess_image(image: Any, min_pixels: int = IMAGE_MIN_PIXELS, max_pixels: int = IMAGE_MAX_PIXELS, *,
                     patch_size: int = 14, temporal_patch_size: int = 2,
                     merge_size: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """One image (path, PIL image or ``[H, W, 3]`` array) -> ``(pixel_values [n, 1176], grid_thw [1, 3])``.

    ``n = gh * gw`` patches; the LLM will see ``n / merge_size**2`` tokens for it.
    """
    height, width = _image_size(image)
    new_h, new_w = smart_resize(height, width, patch_size * merge_size, min_pixels, max_pixels)
    frame = rescale_normalize(resize_bicubic(image, new_h, new_w))[None]
    patches, grid = patchify(frame, patch_size, temporal_patch_size, merge_size)
    return patches, torch.tensor([grid], dtype=torch.long)


def preprocess_images(images: Sequence[Any], min_pixels: int = IMAGE_MIN_PIXELS,
                      max_pixels: int = IMAGE_MAX_PIXELS, **kwargs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Several images, each at its own resolution, concatenated: ``(pixel_values, image_grid_thw [N, 3])``."""
    if len(images) == 0:
        raise ValueError("preprocess_images needs at least one image")
    parts = [preprocess_image(image, min_pixels, max_pixels, **kwargs) for image in images]
    return torch.cat([p for p, _ in parts]), torch.cat([g for _, g in parts])


def preprocess_video(frames: Sequence[Any], min_pixels: int = VIDEO_MIN_PIXELS, max_pixels: int = VIDEO_MAX_PIXELS,
                     *, patch_size: int = 14, temporal_patch_size: int = 2,
                     merge_size: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Video frames (all the same size) -> ``(pixel_values_videos [n, 1176], video_grid_thw [1, 3])``.

    Every frame is resized like an image (with the video processor's per-frame pixel budget); an odd frame
    count is made even by repeating the last frame, and each pair of consecutive frames becomes one
    temporal patch, so ``grid_t = ceil(frames / 2)``.
    """
    if len(frames) == 0:
        raise ValueError("a video needs at least one frame")
    sizes = {_image_size(frame) for frame in frames}
    if len(sizes) != 1:
        raise ValueError(f"all frames of a video must have the same size, got {sorted(sizes)}")
    height, width = sizes.pop()
    new_h, new_w = smart_resize(height, width, patch_size * merge_size, min_pixels, max_pixels)
    stacked = np.stack([resize_bicubic(frame, new_h, new_w) for frame in frames])
    patches, grid = patchify(rescale_normalize(stacked), patch_size, temporal_patch_size, merge_size)
    return patches, torch.tensor([grid], dtype=torch.long)
