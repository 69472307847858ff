"""M-RoPE: the cos/sin tables equal transformers', and get_rope_index follows Qwen's own rule (rope2d.py)."""

from __future__ import annotations

import random

import pytest
import torch

from qwen_edu.models.rope import RotaryEmbedding
from qwen_edu.vision.mrope import (
    MRotaryEmbedding,
    get_rope_index,
    mrope_decode_positions,
    mrope_stream_index,
    register_mrope_layout,
)
from tests._qwen2_vl_reference import IMAGE, V_END, V_START, VIDEO, left_pad, rope2d_positions

IDS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=V_START)


def _item(kind: int, grid: list[int]) -> list[int]:
    return [V_START] + [kind] * (grid[0] * grid[1] * grid[2] // 4) + [V_END]


def _random_batch(seed: int, rows: int = 3):
    """Rows of text, images and videos in random order and sizes, left padded."""
    rng = random.Random(seed)
    sequences, images, videos = [], [], []
    for _ in range(rows):
        seq = [rng.randrange(3, 200) for _ in range(rng.randrange(0, 4))]
        for _ in range(rng.randrange(0, 4)):
            video = rng.random() < 0.4
            grid = [rng.randrange(1, 7) if video else 1, 2 * rng.randrange(1, 5), 2 * rng.randrange(1, 5)]
            (videos if video else images).append(grid)
            seq += _item(VIDEO if video else IMAGE, grid)
            seq += [rng.randrange(3, 200) for _ in range(rng.randrange(0, 3))]
        sequences.append(seq or [7])
    ids, mask = left_pad(sequences)
    grid = lambda g: torch.tensor(g) if g else None
    return ids, mask, grid(images), grid(videos)


@pytest.mark.parametrize("seed", range(12))
def test_get_rope_index_follows_qwens_rule(seed):
    ids, mask, images, videos = _random_batch(seed)
    for attention_mask in (mask, None if bool(mask.all()) else mask):
        ours, deltas = get_rope_index(ids, images, videos, attention_mask, **IDS)
        expected, expected_deltas = rope2d_positions(ids, images, videos, attention_mask)
        assert torch.equal(ours, expected)
        assert torch.equal(deltas, expected_deltas)


def test_text_only_rows_reduce_to_1d_positions():
    ids, mask = left_pad([[5, 6, 7, 8], [9, 10]])
    positions, deltas = get_rope_index(ids, attention_mask=mask, **IDS)
    assert positions[:, 1].tolist() == [[1, 1, 0, 1]] * 3  # padded slots hold 1, as in Qwen's code
    assert deltas.tolist() == [[0], [-2]]
    expected, expected_deltas = rope2d_positions(ids, attention_mask=mask)
    assert torch.equal(positions, expected) and torch.equal(deltas, expected_deltas)
    plain, zero = get_rope_index(ids, **IDS)
    assert plain[:, 0].tolist() == [[0, 1, 2, 3]] * 3 and zero.tolist() == [[0], [0]]


def test_an_image_advances_positions_by_its_largest_side_only():
    """A 16x16-patch image: 64 tokens on an 8x8 merged grid; the text after it continues at start + 8."""
    ids = torch.tensor([[5, V_START] + [IMAGE] * 64 + [V_END, 6]])
    positions, deltas = get_rope_index(ids, torch.tensor([[1, 16, 16]]), **IDS)
    t, h, w = positions[:, 0]
    assert t[2:66].unique().tolist() == [2]
    assert h[2:66].tolist() == [2 + r for r in range(8) for _ in range(8)]
    assert w[2:66].tolist() == [2 + c for _ in range(8) for c in range(8)]
    assert positions[:, 0, 66].tolist() == [10, 10, 10]  # <|vision_end|> at max (9) + 1
    assert deltas.item() == 12 - 68  # max + 1 - length: 64 tokens cost 8 positions


def test_a_long_video_continues_after_its_last_frame_group():
    """The worked example where transformers 5.24 differs: video grid (6, 4, 4) between two text pairs."""
    ids = torch.tensor([[5, 6, V_START] + [VIDEO] * 24 + [V_END, 7, 8]])
    positions, deltas = get_rope_index(ids, video_grid_thw=torch.tensor([[6, 4, 4]]), **IDS)
    assert positions[0, 0, 3:27].tolist() == [3 + g for g in range(6) for _ in range(4)]
    assert positions[0, 0, 27:].tolist() == [9, 10, 11]  # Qwen: max + 1 (5.24 would give 5, 6, 7)
    assert deltas.item() == -18
    assert mrope_decode_positions(30, 1, deltas)[:, 0].tolist() == [[12]] * 3


def test_several_items_consume_the_grids_in_batch_order():
    rows = [[5] + _item(IMAGE, [1, 2, 4]) + _item(VIDEO, [2, 2, 2]), [6] + _item(IMAGE, [1, 4, 2]) + [7]]
    ids, mask = left_pad(rows)
    images, videos = torch.tensor([[1, 2, 4], [1, 4, 2]]), torch.tensor([[2, 2, 2]])
    positions, _ = get_rope_index(ids, images, videos, mask, **IDS)
    expected, _ = rope2d_positions(ids, images, videos, mask)
    assert torch.equal(positions, expected)
    # row 1's image is 2 rows x 1 column of merged tokens: h steps, w stays
    first = int((ids[1] == IMAGE).nonzero()[0])
    assert positions[1:, 1, first:first + 2].tolist() == [[2, 3], [2, 2]]


def test_decode_positions_continue_every_row_at_its_delta():
    ids, mask = left_pad([[5, V_START] + [IMAGE] * 4 + [V_END], [6, 7]])
    positions, deltas = get_rope_index(ids, torch.tensor([[1, 4, 4]]), None, mask, **IDS)
    nxt = mrope_decode_positions(ids.shape[1], 1, deltas)
    assert nxt.shape == (3, 2, 1)
    for b in range(2):  # the next token sits right after each row's largest id
        assert nxt[:, b, 0].tolist() == [int(positions[:, b][:, mask[b].bool()].max()) + 1] * 3


@pytest.mark.parametrize(
    "ids,images,videos,message",
    [
        ([5, V_START] + [IMAGE] * 4 + [V_END], None, torch.tensor([[2, 2, 2]]),
         "input_ids hold more images than the 0 rows of image_grid_thw"),
        ([5, V_START] + [IMAGE] * 4 + [V_END], torch.tensor([[1, 4, 4], [1, 2, 2]]), None,
         "image_grid_thw has 2 rows but input_ids announce 1"),
        ([5, V_START] + [IMAGE] * 3 + [V_END], torch.tensor([[1, 4, 4]]), None, "needs 4 consecutive image pad"),
        ([5, V_START, V_END], torch.tensor([[1, 4, 4]]), None, "image_grid_thw has 1 rows but input_ids announce 0"),
    ],
)
def test_tokens_that_do_not_match_the_grids_are_clear_errors(ids, images, videos, message):
    with pytest.raises(ValueError, match=message):
        get_rope_index(torch.tensor([ids]), images, videos, **IDS)


# ---- cos/sin tables ------------------------------------------------------------------------------------
def test_mrope_tables_equal_transformers():
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

    config = Qwen2VLConfig(text_config=dict(hidden_size=256, num_attention_heads=2, rope_parameters={
        "rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}))
    reference = Qwen2VLRotaryEmbedding(config.text_config)
    ours = MRotaryEmbedding(128, 1e6, [16, 24, 24])
    positions = torch.randint(0, 5000, (3, 2, 37))
    x = torch.zeros(1, dtype=torch.float32)
    for got, want in zip(ours(x, positions), reference(x, positions)):
        assert torch.equal(got, want)  # the same fp32 element-wise ops on the same angles


def test_equal_streams_give_plain_rope():
    ours, plain = MRotaryEmbedding(64, 1e4, [8, 12, 12]), RotaryEmbedding(64, 1e4)
    positions = torch.arange(50)[None]
    x = torch.zeros(1)
    for got, want in zip(ours(x, positions[None].expand(3, 1, 50)), plain(x, positions)):
        assert torch.equal(got, want)


def test_sections_drive_the_frequencies_as_documented():
    index = mrope_stream_index([16, 24, 24], 128)
    assert index.tolist() == [0] * 16 + [1] * 24 + [2] * 24
    ours = MRotaryEmbedding(128, 1e6, [16, 24, 24])
    positions = torch.tensor([5, 7, 11]).view(3, 1, 1)
    cos, _ = ours(torch.zeros(1), positions)
    for j, stream in [(0, 0), (15, 0), (16, 1), (39, 1), (40, 2), (63, 2)]:
        expected = torch.cos(positions[stream, 0, 0].float() * ours.inv_freq[j])
        assert cos[0, 0, j] == expected and cos[0, 0, 64 + j] == expected


def test_interleaved_layout_matches_qwen3_vl():
    from transformers import Qwen3VLConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    config = Qwen3VLConfig(text_config=dict(hidden_size=256, num_attention_heads=2, head_dim=128, rope_parameters={
        "rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20], "mrope_interleaved": True}))
    reference = Qwen3VLTextRotaryEmbedding(config.text_config)
    ours = MRotaryEmbedding(128, 5e6, [24, 20, 20], layout="interleaved")
    positions = torch.randint(0, 3000, (3, 2, 9))
    for got, want in zip(ours(torch.zeros(1), positions), reference(torch.zeros(1), positions)):
        assert torch.equal(got, want)


def test_custom_layouts_can_be_registered_and_bad_sections_are_refused():
    register_mrope_layout("all_time", lambda section, half: torch.zeros(half, dtype=torch.long))
    assert mrope_stream_index([4, 2, 2], 16, "all_time").tolist() == [0] * 8
    with pytest.raises(ValueError, match="must be three non-negative sizes summing to head_dim/2 = 8"):
        mrope_stream_index([4, 2, 1], 16)
    with pytest.raises(ValueError, match="unknown M-RoPE layout 'spiral'"):
        mrope_stream_index([4, 2, 2], 16, "spiral")
    with pytest.raises(ValueError, match=r"must be \[3, B, L\]"):
        MRotaryEmbedding(16, 1e4, [4, 2, 2])(torch.zeros(1), torch.zeros(2, 1, 4, dtype=torch.long))
