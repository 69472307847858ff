"""Qwen2.5-VL end to end against transformers 5.24: two images of different sizes and videos, windows and clocks.

Checkpoints are written by transformers' ``save_pretrained`` and loaded through ``qwen_edu.load_model``. Video
positions follow Qwen's ``rope2d.py``; where transformers 5.24 restarts the text after a video lower (a video
whose time extent exceeds its spatial extent), the reference is fed Qwen's positions, which checks everything
else, and the positions themselves are checked against a rendering of Qwen's code.
"""

from __future__ import annotations

import pytest
import torch

import qwen_edu
from qwen_edu.vision.dynamic_resolution import preprocess_images, preprocess_video
from qwen_edu.vision.mrope import mrope_decode_positions
from qwen_edu.vision.window_attention import permute_units, unpermute_units, window_partition
from tests._qwen2_5_vl_qwen3_vl_reference import (
    assert_greedy_identical,
    assert_logits_match,
    load_reference,
    make_checkpoint,
    mm_token_type_ids,
    rope2d_25_positions,
)
from tests._qwen2_vl_reference import IMAGE, V_END, V_START, VIDEO, left_pad, n_tokens, random_images

# Logits of two fp32 implementations running the same ops in different orders (eager attention on both
# sides, batched vs per-window attention calls, matmul vs Conv3d patch embedding): a few 1e-7 relative on
# O(1) logits, so 1e-5 absolute leaves a wide margin and still catches any real mistake (those are O(0.1)).
ATOL = 1e-5


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def models(request, tmp_path_factory):
    folder = make_checkpoint("qwen2_5_vl", tmp_path_factory.mktemp("qwen2_5_vl"), seed=11,
                             tie_word_embeddings=request.param)
    return qwen_edu.load_model(folder, attn_implementation="eager"), load_reference("qwen2_5_vl", folder)


@pytest.fixture(scope="module")
def vision():
    """Two images of different sizes (4 and 6 windows of 56 px) and a 4-frame 112 px video at 2 fps."""
    pixels, image_grid = preprocess_images(random_images([(84, 112), (112, 56)], seed=2))
    video, video_grid = preprocess_video(random_images([(112, 112)] * 4, seed=3), min_pixels=56 * 56)
    return dict(pixel_values=pixels, image_grid_thw=image_grid, pixel_values_videos=video,
                video_grid_thw=video_grid, second_per_grid_ts=torch.tensor([1.0]))


def _prompt(vision) -> list[int]:
    images, video = vision["image_grid_thw"], vision["video_grid_thw"][0]
    return ([5, 6, V_START] + [IMAGE] * n_tokens(images[0]) + [V_END, 7, V_START] + [IMAGE] * n_tokens(images[1])
            + [V_END, 8, 9, V_START] + [VIDEO] * n_tokens(video) + [V_END, 10, 11])


def test_the_vision_tower_matches_with_windows_and_full_attention_blocks(models, vision):
    ours, reference = models
    pixels = torch.cat([vision["pixel_values"], vision["pixel_values_videos"]])
    grid = torch.cat([vision["image_grid_thw"], vision["video_grid_thw"]])
    index, cu_windows = window_partition(grid, 56, 14, 2)
    # merged grids 3x4, 4x2 and 2 frames of 4x4, in windows of 2x2 merged tokens: 4 + 2 + 2 * 4 windows
    assert len(cu_windows) - 1 == 4 + 2 + 8 and len(index) == 12 + 8 + 32
    with torch.no_grad():
        want = reference.model.visual(pixels, grid_thw=grid).pooler_output
        got = ours.visual(pixels, grid)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def test_logits_match_with_two_images_and_a_video_in_a_left_padded_batch(models, vision):
    ours, reference = models
    ids, mask = left_pad([_prompt(vision), [12, 13, 14, 15, 16]])
    assert_logits_match(ours, reference, ids, mask, vision, ATOL)


def test_text_only_prompts_match(models):
    ours, reference = models
    assert_logits_match(ours, reference, torch.tensor([[5, 6, 7, 8, 9, 10]]), None, {}, ATOL)


def test_greedy_generations_are_identical(models, vision):
    ours, reference = models
    ids, mask = left_pad([_prompt(vision), [12, 13, 14, 15, 16]])
    assert_greedy_identical(ours, reference, ids, mask, vision)


def test_prefill_then_decode_equals_one_forward_pass(models, vision):
    ours, _ = models
    ids = torch.tensor([_prompt(vision) + [20, 21, 22]])
    with torch.no_grad():
        full = ours(ids, **vision).logits
        prefill = ours(ids[:, :-3], use_cache=True, **vision)
        steps, cache = [prefill.logits[:, -1]], prefill.past_key_values
        for k in range(2):
            steps.append(ours(ids[:, -3 + k:ids.shape[1] - 2 + k], past_key_values=cache, use_cache=True).logits[:, -1])
    # the same model, cached vs uncached attention: equal up to summation order
    torch.testing.assert_close(torch.stack(steps, 1), full[:, -4:-1], rtol=0, atol=1e-5)


# ---- absolute time -------------------------------------------------------------------------------------
def test_video_time_ids_count_seconds_at_any_frame_rate(models):
    """The same 4 s clip: 8 frames at 2 fps (1 s per grid) or 4 frames at 1 fps (2 s per grid)."""
    ours, _ = models
    ids = torch.tensor([[5, V_START] + [VIDEO] * 4 * 4 + [V_END, 6]])
    fast = ours.get_rope_index(ids, video_grid_thw=torch.tensor([[4, 4, 4]]), second_per_grid_ts=[1.0])[0]
    ids_slow = torch.tensor([[5, V_START] + [VIDEO] * 2 * 4 + [V_END, 6]])
    slow = ours.get_rope_index(ids_slow, video_grid_thw=torch.tensor([[2, 4, 4]]), second_per_grid_ts=[2.0])[0]
    # tokens_per_second = 2: frame groups at 0, 1, 2, 3 s -> t = 2 + 0, 2, 4, 6; at 0, 2 s -> 2 + 0, 4
    assert fast[0, 0, 2::4][:4].tolist() == [2, 4, 6, 8]
    assert slow[0, 0, 2::4][:2].tolist() == [2, 6]


@pytest.mark.parametrize("seconds", [0.5, 2 / 3, 1.0, 1.5, 2.0])
def test_fractional_seconds_per_grid_truncate_like_qwens_code(models, seconds):
    ours, _ = models
    grid = torch.tensor([[8, 4, 4]])
    ids = torch.tensor([[5, V_START] + [VIDEO] * 8 * 4 + [V_END, 6, 7]])
    got = ours.get_rope_index(ids, video_grid_thw=grid, second_per_grid_ts=torch.tensor([seconds]))
    want = rope2d_25_positions(ids, video_grid_thw=grid, second_per_grid_ts=[seconds])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_images_ignore_the_clock_and_missing_seconds_mean_one_per_grid(models, vision):
    ours, _ = models
    ids, mask = left_pad([_prompt(vision), [12, 13, 14, 15, 16]])
    grids = dict(image_grid_thw=vision["image_grid_thw"], video_grid_thw=vision["video_grid_thw"])
    got = ours.get_rope_index(ids, attention_mask=mask, **grids)
    want = rope2d_25_positions(ids, attention_mask=mask, **grids)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.fixture(scope="module")
def long_video():
    """A video longer in time (6 frame groups at 1 s each, t ids 0..10) than in space (2 x 2 merged tokens)."""
    video, grid = preprocess_video(random_images([(56, 56)] * 12, seed=4), min_pixels=56 * 56)
    assert grid.tolist() == [[6, 4, 4]]
    ids = torch.tensor([[5, 6, V_START] + [VIDEO] * 24 + [V_END, 7, 8]])
    return ids, dict(pixel_values_videos=video, video_grid_thw=grid, second_per_grid_ts=torch.tensor([1.0]))


def test_long_video_positions_follow_qwens_rule_not_524s(models, long_video):
    ours, reference = models
    ids, vision = long_video
    positions, deltas = ours.get_rope_index(ids, video_grid_thw=vision["video_grid_thw"], second_per_grid_ts=[1.0])
    expected, expected_deltas = rope2d_25_positions(ids, video_grid_thw=vision["video_grid_thw"],
                                                    second_per_grid_ts=[1.0])
    assert torch.equal(positions, expected) and torch.equal(deltas, expected_deltas)
    hf_positions, _ = reference.model.get_rope_index(ids, mm_token_type_ids(ids), video_grid_thw=vision["video_grid_thw"],
                                                     second_per_grid_ts=torch.tensor([1.0]))
    assert positions[0, 0, -3:].tolist() == [14, 15, 16]  # the video's t ids are 3, 5, ..., 13
    assert hf_positions[0, 0, -3:].tolist() == [5, 6, 7]  # 5.24 restarts text inside the video's time range


def test_long_video_logits_and_generation_under_qwens_rule(models, long_video):
    """With Qwen's positions handed to it, transformers computes the same logits and greedy tokens."""
    ours, reference = models
    ids, vision = long_video
    positions, deltas = ours.get_rope_index(ids, video_grid_thw=vision["video_grid_thw"], second_per_grid_ts=[1.0])
    with torch.no_grad():
        want = reference(input_ids=ids, position_ids=positions, mm_token_type_ids=mm_token_type_ids(ids),
                         **vision).logits
        torch.testing.assert_close(ours(ids, **vision).logits, want, rtol=0, atol=ATOL)
        out = reference(input_ids=ids, position_ids=positions, mm_token_type_ids=mm_token_type_ids(ids),
                        use_cache=True, **vision)
        tokens, cache = [int(out.logits[0, -1].argmax())], out.cache
        for step in range(5):  # greedy by hand, each new token at cache position + delta (Qwen's rule)
            pos = mrope_decode_positions(ids.shape[1] + step, 1, deltas)
            out = reference(input_ids=torch.tensor([[tokens[-1]]]), position_ids=pos, cache=cache, use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
    got = qwen_edu.generate(ours, ids, max_new_tokens=6, eos_token_id=[], **vision)
    assert got[0, ids.shape[1]:].tolist() == tokens


# ---- the window partition ------------------------------------------------------------------------------
GRIDS = [[[1, 4, 4]], [[1, 8, 8]], [[1, 6, 10]], [[2, 12, 4], [1, 4, 20]], [[3, 10, 14], [1, 2, 2], [1, 16, 6]]]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("window_size", [28, 56, 112])
def test_window_partition_equals_transformers(grid, window_size):
    from transformers.vision_utils import get_vision_window_index

    grid = torch.tensor(grid)
    index, cu = window_partition(grid, window_size, 14, 2)
    want_index, want_cu = get_vision_window_index(grid, spatial_merge_size=2, window_size=window_size, patch_size=14)
    assert torch.equal(index, want_index) and torch.equal(cu, want_cu)


def test_windows_are_rectangles_of_whole_merge_units_inside_one_frame():
    grid = torch.tensor([[2, 10, 14]])  # 2 frames of 5 x 7 merged units; windows of 2 x 2 units (56 px)
    index, cu = window_partition(grid, 56, 14, 2)
    assert sorted(index.tolist()) == list(range(2 * 5 * 7))  # a permutation of the units
    sizes = [(b - a) // 4 for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    assert sizes == ([4, 4, 4, 2] * 2 + [2, 2, 2, 1]) * 2  # full windows, then the 5th row's half windows
    start = 0
    for size in sizes:
        units = index[start:start + size]
        frames, rows, cols = units // 35, units % 35 // 7, units % 7
        assert len(set(frames.tolist())) == 1 and rows.max() - rows.min() < 2 and cols.max() - cols.min() < 2
        start += size


def test_unpermuting_restores_the_order():
    grid = torch.tensor([[1, 6, 10], [2, 4, 4]])
    index, _ = window_partition(grid, 56, 14, 2)
    patches = torch.arange(int(grid.prod(-1).sum()) * 3.0).view(-1, 3)
    moved = permute_units(patches, index)
    assert torch.equal(moved.view(-1, 4, 3)[:, 0], patches.view(-1, 4, 3)[index, 0])
    assert torch.equal(unpermute_units(moved.view(-1, 12), index), patches.view(-1, 12))
