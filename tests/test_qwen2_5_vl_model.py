"""Qwen2.5-VL: config dialects (and the vision naming trap), checkpoint round trips, the clock's inputs, errors."""

from __future__ import annotations

import json

import pytest
import torch

import qwen_edu
from qwen_edu.checkpoint import save_model
from qwen_edu.models.qwen2_5_vl import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from qwen_edu.models.registry import get_model_entry
from qwen_edu.vision.dynamic_resolution import preprocess_images, preprocess_video
from qwen_edu.vision.qwen2_5_vl_vit import Qwen2_5VisionConfig
from qwen_edu.vision.video_time import absolute_time_index, second_per_grid
from qwen_edu.vision.window_attention import attention_pairs, window_partition
from tests._qwen2_5_vl_qwen3_vl_reference import load_reference, make_checkpoint, mm_token_type_ids
from tests._qwen2_vl_reference import IMAGE, V_END, V_START, VIDEO, random_images

# The flat hub config.json of Qwen2.5-VL-3B-Instruct (shape values from the reference notes, §10.1).
HUB_3B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 128000,
    "max_window_layers": 70, "model_type": "qwen2_5_vl", "num_attention_heads": 16, "num_hidden_layers": 36,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint("qwen2_5_vl", tmp_path_factory.mktemp("qwen2_5_vl"), seed=3)


@pytest.fixture(scope="module")
def model(checkpoint):
    return qwen_edu.load_model(checkpoint, attn_implementation="eager")


def _video_prompt():
    video, grid = preprocess_video(random_images([(56, 84)] * 4, seed=8), min_pixels=56 * 56)
    ids = torch.tensor([[5, V_START] + [VIDEO] * (int(grid.prod()) // 4) + [V_END, 6, 7]])
    return ids, dict(pixel_values_videos=video, video_grid_thw=grid)


def test_the_hub_dialect_and_its_naming_trap_are_read_like_transformers():
    from transformers import Qwen2_5_VLConfig as HFConfig

    ours, hf = Qwen2_5_VLConfig.from_hf_config(HUB_3B), HFConfig(**HUB_3B)
    text, vision = hf.text_config, hf.vision_config
    assert (ours.hidden_size, ours.num_hidden_layers, ours.num_key_value_heads, ours.intermediate_size) == (
        text.hidden_size, text.num_hidden_layers, text.num_key_value_heads, text.intermediate_size)
    assert ours.mrope_section == text.rope_parameters["mrope_section"] and ours.tie_word_embeddings
    v = ours.vision_config
    # vision_config.hidden_size is the ViT width here (Qwen2-VL called that embed_dim)
    assert (v.embed_dim, v.out_hidden_size, v.mlp_hidden_size) == (vision.hidden_size, vision.out_hidden_size,
                                                                   vision.intermediate_size) == (1280, 2048, 3420)
    assert (v.window_size, v.fullatt_block_indexes, v.tokens_per_second) == (
        vision.window_size, list(vision.fullatt_block_indexes), vision.tokens_per_second)
    assert (v.norm, v.mlp, v.hidden_act) == ("rmsnorm", "swiglu", "silu")


def test_the_3b_model_has_transformers_parameter_count():
    from transformers import Qwen2_5_VLConfig as HFConfig
    from transformers import Qwen2_5_VLForConditionalGeneration as HFModel

    with torch.device("meta"):
        ours = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_hf_config(HUB_3B))
        theirs = HFModel(HFConfig(**HUB_3B))
    count = sum(p.numel() for p in theirs.parameters())  # tied: the head is the embedding, counted once
    assert ours.num_parameters() == count
    assert f"{count:,}" == "3,754,622,976"  # the "3.75B" of the model card


def test_registered_for_load_model_and_the_5x_dialect_is_read(checkpoint):
    assert get_model_entry("qwen2_5_vl").model_class is Qwen2_5_VLForConditionalGeneration
    raw = json.loads((checkpoint / "config.json").read_text())
    assert "text_config" in raw and raw["vision_config"]["hidden_size"] == 32
    config = Qwen2_5_VLConfig.from_hf_config(raw)
    assert (config.hidden_size, config.vision_config.embed_dim, config.vision_config.window_size) == (64, 32, 56)


def test_our_checkpoint_round_trips_and_transformers_loads_it(model, tmp_path):
    ids, video = _video_prompt()
    save_model(model, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["model_type"] == "qwen2_5_vl" and written["vision_config"]["hidden_size"] == 32
    again = qwen_edu.load_model(tmp_path / "ours", attn_implementation="eager")
    reference = load_reference("qwen2_5_vl", tmp_path / "ours")
    seconds = torch.tensor([0.5])
    with torch.no_grad():
        mine = model(ids, **video, second_per_grid_ts=seconds).logits
        # Reloaded weights are bit-equal, but the reloaded model is another computation path
        # (memory layout picks the matmul blocking): fp32 summation-order rounding only.
        torch.testing.assert_close(again(ids, **video, second_per_grid_ts=seconds).logits, mine, rtol=1e-5, atol=1e-5)
        theirs = reference(input_ids=ids, mm_token_type_ids=mm_token_type_ids(ids), second_per_grid_ts=seconds,
                           **video).logits
    torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)  # two fp32 implementations, see the parity tests


def test_the_clock_changes_the_logits_and_generate_passes_it_to_the_prefill(model):
    ids, video = _video_prompt()
    with torch.no_grad():
        one = model(ids, **video, second_per_grid_ts=[1.0]).logits
        four = model(ids, **video, second_per_grid_ts=[4.0]).logits
    assert (one[0, -1] - four[0, -1]).abs().max() > 1e-3  # the text after the video sits 6 positions later
    out = qwen_edu.generate(model, ids, max_new_tokens=3, eos_token_id=[], **video, second_per_grid_ts=[4.0])
    with torch.no_grad():
        first = model(ids, **video, second_per_grid_ts=[4.0]).logits[0, -1].argmax()
    assert out[0, ids.shape[1]] == first


def test_absolute_time_helpers():
    assert second_per_grid(2.0) == 1.0 and second_per_grid(4.0, temporal_patch_size=2) == 0.5
    assert absolute_time_index(5, 2.0).tolist() == [0, 4, 8, 12, 16]
    assert absolute_time_index(4, 2 / 3).tolist() == [0, 1, 2, 4]  # float32 product, truncated
    assert absolute_time_index(3, 0.5, tokens_per_second=4).tolist() == [0, 2, 4]
    with pytest.raises(ValueError, match="fps must be positive"):
        second_per_grid(0)
    with pytest.raises(ValueError, match="one non-negative number"):
        absolute_time_index(3, torch.tensor([1.0, 2.0]))


def test_window_attention_costs_grow_linearly_with_the_area():
    full, windowed = [], []
    for side in (8, 16, 32, 64):  # patches per side: 112 .. 896 px
        grid = torch.tensor([[1, side, side]])
        full.append(attention_pairs(torch.tensor([0, side * side])))
        windowed.append(attention_pairs(window_partition(grid, 112, 14, 2)[1]))
    assert full == [n**4 for n in (8, 16, 32, 64)]
    assert windowed == [64**2 * (n // 8) ** 2 for n in (8, 16, 32, 64)]  # 8 x 8 patch windows


def test_bad_inputs_and_configs_are_clear_errors(model):
    ids, video = _video_prompt()
    with pytest.raises(ValueError, match=r"second_per_grid_ts needs one value per video: got shape \(2,\)"):
        model(ids, **video, second_per_grid_ts=[1.0, 2.0])
    with pytest.raises(ValueError, match="window_size=100 px must be a positive multiple of 28 px"):
        Qwen2_5VisionConfig(window_size=100)
    with pytest.raises(ValueError, match=r"fullatt_block_indexes \[32\] are not blocks of a depth-32 tower"):
        Qwen2_5VisionConfig(fullatt_block_indexes=[7, 32])
    with pytest.raises(ValueError, match="window_size=50 px must be a positive multiple of patch_size"):
        window_partition(torch.tensor([[1, 4, 4]]), 50, 14, 2)
    pixels, grid = preprocess_images(random_images([(56, 56)], seed=1))
    with pytest.raises(ValueError, match="needs 4 consecutive image pad tokens from index 1, found 1"):
        model(torch.tensor([[V_START, IMAGE, V_END]]), pixel_values=pixels, image_grid_thw=grid)
