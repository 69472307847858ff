"""Qwen2-VL end to end against transformers: two images of different sizes and a video in one prompt.

Checkpoints are written by transformers' ``save_pretrained`` and loaded through ``qwen_edu.load_model``.
Where transformers 5.24's video positions differ from Qwen's own rule (a video longer in time than in space),
the model follows Qwen's rule; there the reference is fed those positions explicitly, which checks everything
else, and the positions themselves are checked against a rendering of Qwen's rope2d.py.
"""

from __future__ import annotations

import pytest
import torch

import qwen_edu
from qwen_edu.vision.dynamic_resolution import preprocess_images, preprocess_video
from qwen_edu.vision.mrope import mrope_decode_positions
from tests._qwen2_vl_reference import (
    IMAGE,
    V_END,
    V_START,
    VIDEO,
    left_pad,
    load_reference,
    make_tiny_qwen2_vl_checkpoint,
    mm_token_type_ids,
    n_tokens,
    random_images,
    rope2d_positions,
)

# Logits of two fp32 implementations that run the same ops in different orders (SDPA-free eager attention
# on both sides, matmul vs Conv3d patch embedding): differences are a few 1e-7 relative on O(1) logits.
ATOL = 1e-5


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def models(request, tmp_path_factory):
    folder = make_tiny_qwen2_vl_checkpoint(tmp_path_factory.mktemp("qwen2_vl"), seed=1,
                                           tie_word_embeddings=request.param)
    return qwen_edu.load_model(folder, attn_implementation="eager"), load_reference(folder)


@pytest.fixture(scope="module")
def vision():
    """Two images of different sizes and aspect ratios and a 4-frame video (grid 2 x 4 x 6)."""
    pixels, image_grid = preprocess_images(random_images([(56, 84), (112, 56)], seed=2))
    video, video_grid = preprocess_video(random_images([(56, 84)] * 4, seed=3), min_pixels=56 * 56)
    return dict(pixel_values=pixels, image_grid_thw=image_grid, pixel_values_videos=video, video_grid_thw=video_grid)


def _prompt(vision) -> list[int]:
    images, video = vision["image_grid_thw"], vision["video_grid_thw"][0]
    return ([5, 6, V_START] + [IMAGE] * n_tokens(images[0]) + [V_END, 7, V_START] + [IMAGE] * n_tokens(images[1])
            + [V_END, 8, 9, V_START] + [VIDEO] * n_tokens(video) + [V_END, 10, 11])


def test_logits_match_with_two_images_and_a_video_in_a_left_padded_batch(models, vision):
    ours, reference = models
    ids, mask = left_pad([_prompt(vision), [12, 13, 14, 15, 16]])
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm_token_type_ids(ids),
                         **vision).logits
        got = ours(ids, mask, **vision).logits
    real = mask.bool()  # padded query rows are garbage on both sides
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=ATOL)


def test_text_only_prompts_match(models):
    ours, reference = models
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference(input_ids=ids).logits, rtol=0, atol=ATOL)


def test_greedy_generations_are_identical(models, vision):
    ours, reference = models
    ids, mask = left_pad([_prompt(vision), [12, 13, 14, 15, 16]])
    want = reference.generate(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm_token_type_ids(ids),
                              max_new_tokens=12, do_sample=False, **vision)
    got = qwen_edu.generate(ours, ids, mask, max_new_tokens=12, eos_token_id=[], **vision)
    assert torch.equal(got, want[:, :got.shape[1]])
    assert got.shape[1] == ids.shape[1] + 12


def test_prefill_then_decode_equals_one_forward_pass(models, vision):
    ours, _ = models
    ids = torch.tensor([_prompt(vision) + [20, 21, 22]])
    with torch.no_grad():
        full = ours(ids, **vision).logits
        prefill = ours(ids[:, :-3], use_cache=True, **vision)
        steps = [prefill.logits[:, -1]]
        cache = prefill.past_key_values
        for k in range(3):
            out = ours(ids[:, -3 + k:ids.shape[1] - 2 + k], past_key_values=cache, use_cache=True)
            steps.append(out.logits[:, -1])
    # the same model, cached vs uncached attention: equal up to summation order
    torch.testing.assert_close(torch.stack(steps[:-1], 1), full[:, -4:-1], rtol=0, atol=1e-5)


# ---- where transformers 5.24 differs from Qwen's rule ------------------------------------------------------
@pytest.fixture(scope="module")
def long_video():
    """A video longer in time (6 frame groups) than in space (2 x 2 merged tokens)."""
    video, grid = preprocess_video(random_images([(56, 56)] * 12, seed=4), min_pixels=56 * 56)
    assert grid.tolist() == [[6, 4, 4]]
    ids = torch.tensor([[5, 6, V_START] + [VIDEO] * 24 + [V_END, 7, 8]])
    return ids, dict(pixel_values_videos=video, video_grid_thw=grid)


def test_long_video_positions_follow_qwens_rule_not_524s(models, long_video):
    ours, reference = models
    ids, vision = long_video
    positions, deltas = ours.get_rope_index(ids, video_grid_thw=vision["video_grid_thw"])
    expected, expected_deltas = rope2d_positions(ids, video_grid_thw=vision["video_grid_thw"])
    assert torch.equal(positions, expected) and torch.equal(deltas, expected_deltas)
    hf_positions, _ = reference.model.get_rope_index(ids, mm_token_type_ids(ids),
                                                     video_grid_thw=vision["video_grid_thw"])
    assert positions[0, 0, -3:].tolist() == [9, 10, 11]
    assert hf_positions[0, 0, -3:].tolist() == [5, 6, 7]  # 5.24 restarts text inside the video's time range


def test_long_video_logits_and_generation_under_qwens_rule(models, long_video):
    """With Qwen's positions handed to it, transformers computes the same logits and greedy tokens."""
    ours, reference = models
    ids, vision = long_video
    positions, deltas = ours.get_rope_index(ids, video_grid_thw=vision["video_grid_thw"])
    with torch.no_grad():
        want = reference(input_ids=ids, position_ids=positions, mm_token_type_ids=mm_token_type_ids(ids),
                         **vision).logits
        torch.testing.assert_close(ours(ids, **vision).logits, want, rtol=0, atol=ATOL)
        # greedy decoding by hand on the reference, each new token at cache position + delta (Qwen's rule)
        out = reference(input_ids=ids, position_ids=positions, mm_token_type_ids=mm_token_type_ids(ids),
                        use_cache=True, **vision)
        tokens, cache = [int(out.logits[0, -1].argmax())], out.cache
        for step in range(7):
            pos = mrope_decode_positions(ids.shape[1] + step, 1, deltas)
            out = reference(input_ids=torch.tensor([[tokens[-1]]]), position_ids=pos, cache=cache, use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
    got = qwen_edu.generate(ours, ids, max_new_tokens=8, eos_token_id=[], **vision)
    assert got[0, ids.shape[1]:].tolist() == tokens
