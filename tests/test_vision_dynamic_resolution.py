"""Dynamic resolution: smart_resize's rounding, and pixel values laid out exactly as transformers' PIL processor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference_smart_resize

from qwen_edu.vision.dynamic_resolution import (
    VIDEO_MIN_PIXELS,
    num_vision_tokens,
    patchify,
    preprocess_image,
    preprocess_images,
    preprocess_video,
    smart_resize,
    unpatchify,
)
from tests._qwen2_vl_reference import random_images


def test_rounding_is_pythons_half_to_even():
    assert smart_resize(70, 70) == (56, 56)  # 70/28 = 2.5 rounds down to 2 (even) ...
    assert smart_resize(98, 98) == (112, 112)  # ... and 3.5 rounds up to 4
    assert smart_resize(224, 224) == (224, 224)
    assert num_vision_tokens(224, 224) == 64  # 16 x 16 patches, merged 2 x 2


def test_smart_resize_equals_the_reference_on_a_grid_of_sizes():
    sizes = [1, 2, 13, 27, 28, 41, 42, 55, 70, 98, 111, 224, 333, 448, 1000, 1337, 2048, 4000]
    budgets = [(56 * 56, 28 * 28 * 1280), (128 * 28 * 28, 28 * 28 * 768), (4 * 28 * 28, 16 * 28 * 28)]
    for h in sizes:
        for w in sizes:
            if max(h, w) / min(h, w) > 200:
                continue
            for lo, hi in budgets:
                assert smart_resize(h, w, 28, lo, hi) == reference_smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)


def test_the_pixel_budget_is_respected():
    for h, w in [(4000, 3000), (10, 1900), (30, 30), (5000, 25)]:
        rh, rw = smart_resize(h, w)
        assert rh % 28 == 0 and rw % 28 == 0
        assert 56 * 56 <= rh * rw <= 28 * 28 * 1280


@pytest.mark.parametrize("h,w", [(1, 201), (300, 1), (10, 2500)])
def test_aspect_ratio_over_200_is_refused(h, w):
    with pytest.raises(ValueError, match="absolute aspect ratio must be at most 200"):
        smart_resize(h, w)
    with pytest.raises(ValueError, match="aspect ratio"):
        preprocess_image(np.zeros((h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("shape", [(0, 10, 3), (10, 0, 3)])
def test_zero_sized_images_are_refused(shape):
    with pytest.raises(ValueError, match="zero size"):
        preprocess_image(np.zeros(shape, dtype=np.uint8))
    with pytest.raises(ValueError, match="zero size"):
        smart_resize(shape[0], shape[1])


def test_pixel_values_equal_the_pil_image_processor_bit_for_bit():
    sizes = [(70, 98), (224, 224), (33, 300), (500, 90), (20, 20), (57, 29)]
    images = random_images(sizes, seed=1)
    reference = Qwen2VLImageProcessorPil()(images=images, return_tensors="pt")
    pixel_values, grid = preprocess_images(images)
    assert torch.equal(grid, reference["image_grid_thw"])
    assert torch.equal(pixel_values, reference["pixel_values"])  # same PIL resize, same IEEE ops in order


def test_other_modes_and_budgets_equal_the_reference():
    rng = np.random.default_rng(2)
    gray = Image.fromarray(rng.integers(0, 256, (90, 130), dtype=np.uint8), mode="L")
    rgba = Image.fromarray(rng.integers(0, 256, (64, 48, 4), dtype=np.uint8), mode="RGBA")
    for image in (gray, rgba):
        processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 9)
        reference = processor(images=[image], return_tensors="pt")
        pixel_values, grid = preprocess_image(image, min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 9)
        assert torch.equal(grid, reference["image_grid_thw"])
        assert torch.equal(pixel_values, reference["pixel_values"])


def _reference_flatten(frames: np.ndarray, patch: int = 14, tp: int = 2, merge: int = 2) -> np.ndarray:
    """The layout spelled out in the reference notes (§9.2, step 4), for [T, C, H, W] frames."""
    t, c, h, w = frames.shape
    gt, gh, gw = t // tp, h // patch, w // patch
    x = frames.reshape(gt, tp, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [gt, gh/2, gw/2, mh, mw, C, tp, ph, pw]
    return x.reshape(gt * gh * gw, c * tp * patch * patch)


def test_patch_rows_come_in_merge_block_order():
    frames = torch.randn(4, 3, 56, 84)
    patches, grid = patchify(frames)
    assert grid == (2, 4, 6)
    assert np.array_equal(patches.numpy(), _reference_flatten(frames.numpy()))
    # Rows 0-3 are the 2x2 block at the top-left: patches (0,0), (0,1), (1,0), (1,1) of frames 0-1.
    for row, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        cube = frames[0:2, :, 14 * r:14 * r + 14, 14 * c:14 * c + 14].permute(1, 0, 2, 3)  # [C, t, y, x]
        assert torch.equal(patches[row], cube.reshape(-1))
    assert torch.equal(unpatchify(patches, grid), frames)


def test_a_still_image_is_two_identical_frames_and_odd_videos_repeat_the_last():
    image = torch.randn(1, 3, 28, 28)
    patches, grid = patchify(image)
    assert grid == (1, 2, 2)
    assert torch.equal(patches, patchify(image.expand(2, 3, 28, 28))[0])
    frames = torch.randn(3, 3, 28, 28)
    assert torch.equal(patchify(frames)[0], patchify(torch.cat([frames, frames[-1:]]))[0])


def test_video_frames_are_processed_like_images_then_stacked_in_time():
    frames = random_images([(60, 90)] * 5, seed=3)
    pixel_values, grid = preprocess_video(frames)
    h, w = smart_resize(60, 90, 28, VIDEO_MIN_PIXELS)
    assert grid.tolist() == [[3, h // 14, w // 14]]  # 5 frames -> 6 (last repeated) -> 3 temporal patches
    # Each frame alone, as a still image with the video's pixel budget, gives the same pixels per frame.
    singles = [preprocess_image(f, min_pixels=VIDEO_MIN_PIXELS, max_pixels=28 * 28 * 768)[0] for f in frames]
    per_frame = [unpatchify(s, (1, h // 14, w // 14))[0] for s in singles]
    video_frames = unpatchify(pixel_values, grid[0].tolist())
    for k in range(6):
        assert torch.equal(video_frames[k], per_frame[min(k, 4)])


def test_mismatched_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="same size"):
        preprocess_video(random_images([(56, 56), (56, 84)]))
    with pytest.raises(ValueError, match="multiples of patch_size"):
        patchify(torch.zeros(1, 3, 30, 28))
    with pytest.raises(ValueError, match="do not fit grid_thw"):
        unpatchify(torch.zeros(5, 1176), (1, 2, 2))
    with pytest.raises(ValueError, match="at least one"):
        preprocess_images([])
