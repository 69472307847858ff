"""Qwen2-VL config dialects, checkpoint round trips and the errors a reader can run into."""

from __future__ import annotations

import json

import pytest
import torch

import qwen_edu
from qwen_edu.checkpoint import save_model
from qwen_edu.models.qwen2_vl import Qwen2VLCache, Qwen2VLConfig, Qwen2VLForConditionalGeneration
from qwen_edu.models.registry import get_model_entry
from qwen_edu.vision.dynamic_resolution import preprocess_images
from tests._qwen2_vl_reference import (
    IMAGE,
    V_END,
    V_START,
    load_reference,
    make_tiny_qwen2_vl_checkpoint,
    mm_token_type_ids,
    random_images,
)

# The hub's flat config.json of Qwen2-VL-2B-Instruct (text fields at the top level, legacy vision keys).
HUB_2B = {
    "architectures": ["Qwen2VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 1536, "initializer_range": 0.02, "intermediate_size": 8960, "max_position_embeddings": 32768,
    "max_window_layers": 28, "model_type": "qwen2_vl", "num_attention_heads": 12, "num_hidden_layers": 28,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                      "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_qwen2_vl_checkpoint(tmp_path_factory.mktemp("qwen2_vl"), seed=7)


@pytest.fixture(scope="module")
def model(checkpoint):
    return qwen_edu.load_model(checkpoint, attn_implementation="eager")


def _image_prompt(size=(56, 84)):
    pixels, grid = preprocess_images(random_images([size], seed=9))
    ids = torch.tensor([[5, V_START] + [IMAGE] * (int(grid.prod()) // 4) + [V_END, 6, 7]])
    return ids, pixels, grid


def test_the_hub_dialect_is_read_like_transformers_reads_it():
    from transformers import Qwen2VLConfig as HFConfig

    ours, hf = Qwen2VLConfig.from_hf_config(HUB_2B), HFConfig(**HUB_2B)
    text, vision = hf.text_config, hf.vision_config
    assert (ours.hidden_size, ours.num_hidden_layers, ours.num_attention_heads, ours.num_key_value_heads) == (
        text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads)
    assert (ours.intermediate_size, ours.vocab_size, ours.rms_norm_eps) == (
        text.intermediate_size, text.vocab_size, text.rms_norm_eps)
    assert ours.rope_theta == text.rope_parameters["rope_theta"] == 1e6 and ours.rope_scaling is None
    assert ours.mrope_section == text.rope_parameters["mrope_section"] == [16, 24, 24]
    assert ours.tie_word_embeddings and hf.tie_word_embeddings
    assert (ours.vision_config.embed_dim, ours.vision_config.out_hidden_size, ours.vision_config.depth) == (
        vision.embed_dim, vision.hidden_size, vision.depth)
    assert (ours.image_token_id, ours.vision_start_token_id) == (hf.image_token_id, hf.vision_start_token_id)


def test_the_2b_parameter_count_matches_the_checkpoint_index():
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig.from_hf_config(HUB_2B))
    assert model.num_parameters() == 2_208_985_600  # safetensors index total_size 4,417,971,200 bytes in bf16


def test_the_5x_dialect_is_read_too(checkpoint):
    raw = json.loads((checkpoint / "config.json").read_text())
    assert "text_config" in raw  # what transformers 5.x writes
    config = Qwen2VLConfig.from_hf_config(raw)
    assert config.hidden_size == 64 and config.mrope_section == [2, 3, 3] and config.rope_theta == 10000.0
    assert config.vision_config.embed_dim == 32 and config.image_token_id == IMAGE


def test_registered_for_load_model():
    assert get_model_entry("qwen2_vl").model_class is Qwen2VLForConditionalGeneration


def test_our_checkpoint_round_trips_and_transformers_loads_it(model, tmp_path):
    ids, pixels, grid = _image_prompt()
    save_model(model, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["rope_scaling"]["mrope_section"] == [2, 3, 3]
    again = qwen_edu.load_model(tmp_path / "ours", attn_implementation="eager")
    reference = load_reference(tmp_path / "ours")
    with torch.no_grad():
        mine = model(ids, pixel_values=pixels, image_grid_thw=grid).logits
        # Bit-equal weights, but a reloaded model may take other SIMD paths (alignment, CPU): fp32
        # rounding of the same math, far below the 1e-5 the parity tests allow between libraries.
        torch.testing.assert_close(again(ids, pixel_values=pixels, image_grid_thw=grid).logits, mine,
                                   rtol=1e-5, atol=1e-6)
        theirs = reference(input_ids=ids, pixel_values=pixels, image_grid_thw=grid,
                           mm_token_type_ids=mm_token_type_ids(ids)).logits
    torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)  # two fp32 implementations, see the parity tests


def test_generate_keeps_the_rope_deltas_on_the_cache(model):
    ids, pixels, grid = _image_prompt()
    out = model(ids, pixel_values=pixels, image_grid_thw=grid, use_cache=True)
    assert isinstance(out.past_key_values, Qwen2VLCache)
    _, deltas = model.get_rope_index(ids, grid)
    assert torch.equal(out.past_key_values.rope_deltas, deltas)
    assert deltas.item() < 0  # 6 image tokens on a 2 x 3 merged grid cost 3 positions, not 6


def test_image_tokens_that_do_not_match_the_features_are_a_clear_error(model):
    ids, pixels, grid = _image_prompt()
    short = torch.cat([ids[:, :3], ids[:, 4:]], dim=1)  # one image pad token fewer
    with pytest.raises(ValueError, match="image tokens do not match the features: input_ids hold 5 image pad tokens"):
        model(short, pixel_values=pixels, image_grid_thw=grid)
    with pytest.raises(ValueError, match="without image_grid_thw"):
        model(ids, pixel_values=pixels)


def test_a_grid_that_does_not_match_the_pixels_is_a_clear_error(model):
    ids, pixels, grid = _image_prompt()
    with pytest.raises(ValueError, match=r"pixel_values of shape \(20, 1176\) does not match its grid"):
        model(ids, pixel_values=pixels[:20], image_grid_thw=grid)


def test_configs_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="must equal the text hidden_size"):
        Qwen2VLConfig.from_hf_config({**HUB_2B, "hidden_size": 1024, "num_attention_heads": 8})
    with pytest.raises(ValueError, match="must sum to head_dim/2 = 64"):
        Qwen2VLConfig.from_hf_config({**HUB_2B, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 16]}})
    with pytest.raises(ValueError, match="needs rope_scaling.mrope_section"):
        Qwen2VLConfig.from_hf_config({k: v for k, v in HUB_2B.items() if k != "rope_scaling"})
