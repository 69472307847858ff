"""Qwen3-VL end to end against transformers 5.24: images of two sizes and a timestamped video, DeepStack.

Checkpoints are written by transformers' ``save_pretrained`` (keys ``model.visual.*``/``model.language_model.*``)
and loaded through ``qwen_edu.load_model``. For Qwen3-VL prompts, where every frame group is its own vision item
after its timestamp text, transformers 5.24 and Qwen's ``rope2d.py`` give the same ids; both are checked.
"""

from __future__ import annotations

import pytest
import torch

import qwen_edu
from qwen_edu.vision.dynamic_resolution import preprocess_images, preprocess_video
from qwen_edu.vision.mrope import MRotaryEmbedding
from qwen_edu.vision.qwen3_vl_vit import interpolate_position_table
from tests._qwen2_5_vl_qwen3_vl_reference import (
    assert_greedy_identical,
    assert_logits_match,
    load_reference,
    make_checkpoint,
    mm_token_type_ids,
    qwen3_video_prompt,
    qwen_linspace_position_table,
    rope2d_3_positions,
)
from tests._qwen2_vl_reference import IMAGE, V_END, V_START, VIDEO, left_pad, n_tokens, random_images

# Same justification as for Qwen2-VL: fp32, the same ops in different orders on both sides (eager attention,
# grouped vs per-segment attention calls, matmul vs Conv3d), differences of a few 1e-7 on O(1) logits.
ATOL = 1e-5
# Stand-ins for the timestamp texts "<0.2 seconds>" and "<1.2 seconds>" (6 tokens each with the real tokenizer).
TIMESTAMPS = [[40, 41, 42, 43, 44, 45], [40, 46, 42, 43, 44, 45]]


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def models(request, tmp_path_factory):
    folder = make_checkpoint("qwen3_vl", tmp_path_factory.mktemp("qwen3_vl"), seed=5,
                             tie_word_embeddings=request.param)
    return qwen_edu.load_model(folder, attn_implementation="eager"), load_reference("qwen3_vl", folder)


@pytest.fixture(scope="module")
def vision():
    """Two images (64 x 96 and 128 x 64 px: 6 and 8 tokens) and a 4-frame 64 px video (2 frame groups)."""
    pixels, image_grid = preprocess_images(random_images([(64, 96), (128, 64)], seed=2), patch_size=16)
    video, video_grid = preprocess_video(random_images([(64, 64)] * 4, seed=3), min_pixels=32 * 32,
                                         patch_size=16)
    assert video_grid.tolist() == [[2, 4, 4]]
    return dict(pixel_values=pixels, image_grid_thw=image_grid, pixel_values_videos=video, video_grid_thw=video_grid)


def _prompt(vision) -> list[int]:
    images = vision["image_grid_thw"]
    return ([5, 6, V_START] + [IMAGE] * n_tokens(images[0]) + [V_END, 7, V_START] + [IMAGE] * n_tokens(images[1])
            + [V_END, 8, 9] + qwen3_video_prompt(vision["video_grid_thw"][0], TIMESTAMPS) + [10, 11])


def test_position_table_is_transformers_bilinear_resampling_bit_for_bit(models, vision):
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    ours, _ = models
    grid = torch.tensor([[1, 4, 6], [2, 8, 4], [1, 2, 2], [1, 14, 10]])
    table = ours.visual.pos_embed.weight.detach()
    index, weight = get_vision_interpolation_indices_and_weights(grid, 6, mode="bilinear", align_corners=True,
                                                                 spatial_merge_size=2)
    want = (torch.nn.functional.embedding(index, table) * weight[:, :, None]).sum(1)
    assert torch.equal(interpolate_position_table(table, grid), want)  # the same float32 ops in the same order


def test_position_table_equals_qwens_linspace_form_up_to_rounding(models):
    """Qwen's released code computes the same interpolation from linspace coordinates. The coordinates differ
    in their last float32 bits, so the weights differ by ~1e-7 and a sum of four entries of size <= 1 by well
    under 1e-5 (the reference notes measured 1.9e-5 at most for a unit-variance table; this one has std 0.18)."""
    ours, _ = models
    grid = torch.tensor([[1, 4, 6], [2, 8, 4], [1, 14, 10], [1, 2, 30]])
    table = ours.visual.pos_embed.weight.detach()
    torch.testing.assert_close(interpolate_position_table(table, grid), qwen_linspace_position_table(table, grid),
                               rtol=0, atol=1e-5)


def test_the_vision_tower_and_its_deepstack_taps_match(models, vision):
    ours, reference = models
    with torch.no_grad():
        want = reference.model.visual(vision["pixel_values"], grid_thw=vision["image_grid_thw"])
        got = ours.visual.encode(vision["pixel_values"], vision["image_grid_thw"])
    torch.testing.assert_close(got.features, want.pooler_output, rtol=0, atol=ATOL)
    assert len(got.deepstack) == len(want.deepstack_features) == 2
    for mine, theirs in zip(got.deepstack, want.deepstack_features):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=ATOL)


def test_interleaved_rotary_tables_match_and_ignore_the_flag(models):
    """5.24's Qwen3-VL rotary interleaves t/h/w whatever ``mrope_interleaved`` says; ours too."""
    ours, reference = models
    positions = torch.stack([torch.arange(7), torch.arange(7) * 3 % 5, torch.arange(7) % 2])[:, None]
    x = torch.zeros(1, 7, 64)
    cos, sin = ours.model.rotary_emb(x, positions)
    want_cos, want_sin = reference.model.language_model.rotary_emb(x, positions)
    assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
    assert isinstance(ours.model.rotary_emb, MRotaryEmbedding) and ours.model.rotary_emb.layout == "interleaved"
    assert ours.model.rotary_emb.stream_index.tolist() == [0, 1, 2] * 2 + [0, 0]  # section [4, 2, 2]


def test_logits_match_with_two_images_and_a_timestamped_video_in_a_left_padded_batch(models, vision):
    ours, reference = models
    ids, mask = left_pad([_prompt(vision), [12, 13, 14, 15, 16]])
    assert_logits_match(ours, reference, ids, mask, vision, ATOL)


def test_video_positions_equal_qwens_rope2d_and_524(models, vision):
    ours, reference = models
    ids, mask = left_pad([_prompt(vision), [12, 13, 14]])
    grids = dict(image_grid_thw=vision["image_grid_thw"], video_grid_thw=vision["video_grid_thw"])
    positions, deltas = ours.get_rope_index(ids, attention_mask=mask, **grids)
    want, want_deltas = rope2d_3_positions(ids, attention_mask=mask, **grids)
    assert torch.equal(positions, want) and torch.equal(deltas, want_deltas)
    hf, _ = reference.model.get_rope_index(ids, mm_token_type_ids(ids), attention_mask=mask, **grids)
    real = mask.bool()
    assert torch.equal(positions[:, real], hf[:, real])  # they differ only in padded slots (1 vs 0)
    # each frame group: its timestamp as text, then the frame's tokens at one t id (no clock in t)
    start = ids[0].tolist().index(40)
    frame_t = positions[0, 0, start + 7:start + 11].tolist()
    assert len(set(frame_t)) == 1 and frame_t[0] == positions[0, 0, start + 6] + 1


def test_text_only_prompts_match(models):
    ours, reference = models
    assert_logits_match(ours, reference, torch.tensor([[5, 6, 7, 8, 9, 10]]), None, {}, ATOL)


def test_greedy_generations_are_identical(models, vision):
    ours, reference = models
    ids, mask = left_pad([_prompt(vision), [12, 13, 14, 15, 16]])
    assert_greedy_identical(ours, reference, ids, mask, vision)


def test_deepstack_features_reach_the_first_layers(models, vision):
    """Silencing the DeepStack mergers changes the logits, and transformers agrees on the silenced model too."""
    ours, reference = models
    ids = torch.tensor([[5, V_START] + [IMAGE] * n_tokens(vision["image_grid_thw"][0]) + [V_END, 6, 7]])
    image = dict(pixel_values=vision["pixel_values"][:24], image_grid_thw=vision["image_grid_thw"][:1])
    with torch.no_grad():
        before = ours(ids, **image).logits
        saved = [(m.linear_fc2.weight.clone(), m.linear_fc2.bias.clone()) for m in ours.visual.deepstack_merger_list]
        for model in (ours.visual, reference.model.visual):
            for merger in model.deepstack_merger_list:
                merger.linear_fc2.weight.zero_()
                merger.linear_fc2.bias.zero_()
        try:
            silenced = ours(ids, **image).logits
            want = reference(input_ids=ids, mm_token_type_ids=mm_token_type_ids(ids), **image).logits
        finally:
            for model in (ours.visual, reference.model.visual):
                for merger, (weight, bias) in zip(model.deepstack_merger_list, saved):
                    merger.linear_fc2.weight.copy_(weight)
                    merger.linear_fc2.bias.copy_(bias)
    torch.testing.assert_close(silenced, want, rtol=0, atol=ATOL)
    assert (silenced - before).abs().max() > 1e-2
    assert torch.equal(ours(ids, **image).logits, before)  # restored, and the hooks are gone


def test_frames_without_their_own_vision_start_are_a_clear_error(models, vision):
    ours, _ = models
    ids = torch.tensor([[5, V_START] + [VIDEO] * 8 + [V_END]])
    with pytest.raises(ValueError, match="video_grid_thw has 2 rows but input_ids announce 1 video"):
        ours.get_rope_index(ids, video_grid_thw=vision["video_grid_thw"])

