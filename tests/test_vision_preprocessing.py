"""Shared vision preprocessing: loading pictures as RGB and CLIP normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qwen_edu.vision.preprocessing import CLIP_MEAN, CLIP_STD, clip_normalize, load_image, to_float_tensor


def test_load_image_accepts_paths_pil_images_and_arrays(tmp_path):
    array = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    Image.fromarray(array).save(tmp_path / "pic.png")
    for source in (tmp_path / "pic.png", str(tmp_path / "pic.png"), Image.fromarray(array), array,
                   torch.from_numpy(array)):
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (6, 4)
        assert np.array_equal(np.asarray(image), array)  # uint8 pixels: exact
    grey = load_image(np.full((2, 3, 1), 7, dtype=np.uint8))
    assert np.asarray(grey).shape == (2, 3, 3) and np.asarray(grey).max() == 7


def test_load_image_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="zero size"):
        load_image(np.zeros((0, 5, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\[H, W, C\]"):
        load_image(np.zeros((5, 5), dtype=np.uint8))


def test_pixels_are_scaled_to_unit_range_channels_first():
    array = np.zeros((2, 3, 3), dtype=np.uint8)
    array[..., 0], array[0, 0, 2] = 255, 51
    pixels = to_float_tensor(Image.fromarray(array))
    assert pixels.shape == (3, 2, 3) and pixels.dtype == torch.float32
    assert pixels[0].eq(1.0).all() and pixels[1].eq(0.0).all()
    assert pixels[2, 0, 0].item() == pytest.approx(0.2)


def test_clip_normalisation_maps_the_clip_mean_to_zero_and_one_std_to_one():
    mean = torch.tensor(CLIP_MEAN)[:, None, None].expand(3, 2, 2)
    torch.testing.assert_close(clip_normalize(mean), torch.zeros(3, 2, 2))
    one_std = mean + torch.tensor(CLIP_STD)[:, None, None]
    # (mean + std - mean) / std rounds in fp32: a couple of ulp around 1.
    torch.testing.assert_close(clip_normalize(one_std), torch.ones(3, 2, 2), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[\.\.\., 3, H, W\]"):
        clip_normalize(torch.zeros(4, 2, 2))
