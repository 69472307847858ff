"""Qwen3-VL: the nested config dialect, checkpoint keys and round trips, timestamps, DeepStack plumbing, errors."""

from __future__ import annotations

import json

import pytest
import torch

import qwen_edu
from qwen_edu.checkpoint import StateDictMismatchError, save_model
from qwen_edu.models.qwen3_vl import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLLayout
from qwen_edu.models.registry import get_model_entry
from qwen_edu.vision.deepstack import add_visual_features, inject_deepstack, order_deepstack
from qwen_edu.vision.dynamic_resolution import preprocess_images
from qwen_edu.vision.qwen3_vl_vit import Qwen3VisionConfig
from qwen_edu.vision.video_time import frame_group_timestamps, split_video_grid, timestamp_text
from tests._qwen2_5_vl_qwen3_vl_reference import load_reference, make_checkpoint, mm_token_type_ids
from tests._qwen2_vl_reference import IMAGE, V_END, V_START, random_images

# A hub-style nested config.json with Qwen3-VL-2B's layout of keys (text fields in text_config, M-RoPE in its
# rope_scaling). The test compares our reading with transformers' reading of the same dict.
HUB_2B = {
    "architectures": ["Qwen3VLForConditionalGeneration"], "image_token_id": 151655, "model_type": "qwen3_vl",
    "text_config": {"attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "dtype": "bfloat16",
                    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
                    "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 262144,
                    "model_type": "qwen3_vl_text", "num_attention_heads": 16, "num_hidden_layers": 28,
                    "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
                    "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
                    "rope_theta": 5000000, "tie_word_embeddings": True, "use_cache": True, "vocab_size": 151936},
    "tie_word_embeddings": True, "video_token_id": 151656, "vision_end_token_id": 151653,
    "vision_start_token_id": 151652,
    "vision_config": {"deepstack_visual_indexes": [5, 11, 17], "depth": 24, "hidden_act": "gelu_pytorch_tanh",
                      "hidden_size": 1024, "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 4096,
                      "model_type": "qwen3_vl", "num_heads": 16, "num_position_embeddings": 2304,
                      "out_hidden_size": 2048, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2},
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint("qwen3_vl", tmp_path_factory.mktemp("qwen3_vl"), seed=4)


@pytest.fixture(scope="module")
def model(checkpoint):
    return qwen_edu.load_model(checkpoint, attn_implementation="eager")


def _image_prompt():
    pixels, grid = preprocess_images(random_images([(64, 96)], seed=9), patch_size=16)
    ids = torch.tensor([[5, V_START] + [IMAGE] * (int(grid.prod()) // 4) + [V_END, 6, 7]])
    return ids, dict(pixel_values=pixels, image_grid_thw=grid)


def test_the_nested_hub_dialect_is_read_like_transformers():
    from transformers import Qwen3VLConfig as HFConfig

    ours, hf = Qwen3VLConfig.from_hf_config(HUB_2B), HFConfig(**HUB_2B)
    text, vision = hf.text_config, hf.vision_config
    assert (ours.hidden_size, ours.num_hidden_layers, ours.head_dim, ours.num_key_value_heads) == (
        text.hidden_size, text.num_hidden_layers, text.head_dim, text.num_key_value_heads)
    assert ours.rope_theta == text.rope_parameters["rope_theta"] == 5e6
    assert ours.mrope_section == [24, 20, 20] and ours.mrope_layout == "interleaved"
    assert (ours.qk_norm, ours.qkv_bias, ours.o_bias) == (True, False, False)
    assert ours.tie_word_embeddings == hf.tie_word_embeddings
    v = ours.vision_config
    assert (v.embed_dim, v.out_hidden_size, v.patch_size, v.num_position_embeddings, v.position_grid_side) == (
        vision.hidden_size, vision.out_hidden_size, vision.patch_size, vision.num_position_embeddings, 48)
    assert v.deepstack_visual_indexes == list(vision.deepstack_visual_indexes) == [5, 11, 17]


def test_the_outer_flag_decides_tying_and_the_layout_is_always_interleaved():
    untied = {**HUB_2B, "tie_word_embeddings": False}
    assert not Qwen3VLConfig.from_hf_config(untied).tie_word_embeddings  # text_config says True: ignored
    flat = json.loads(json.dumps(HUB_2B))
    flat["text_config"]["rope_scaling"]["mrope_interleaved"] = False  # transformers 5.24 interleaves anyway
    assert Qwen3VLConfig.from_hf_config(flat).mrope_layout == "interleaved"


def test_the_2b_shaped_model_has_transformers_parameter_count():
    from transformers import Qwen3VLConfig as HFConfig
    from transformers import Qwen3VLForConditionalGeneration as HFModel

    with torch.device("meta"):
        ours = Qwen3VLForConditionalGeneration(Qwen3VLConfig.from_hf_config(HUB_2B))
        theirs = HFModel(HFConfig(**HUB_2B))
    assert ours.num_parameters() == sum(p.numel() for p in theirs.parameters())


def test_checkpoint_keys_are_model_visual_and_model_language_model(checkpoint):
    from qwen_edu.checkpoint import scan_safetensors

    keys = set(scan_safetensors(checkpoint))
    layout = Qwen3VLLayout()
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig.from_hf_config(checkpoint))
    assert {layout.source(name, None).key for name, _ in model.named_parameters()} == keys
    assert layout.source("visual.pos_embed.weight", None).key == "model.visual.pos_embed.weight"
    assert layout.source("model.layers.0.self_attn.q_norm.weight", None).key == (
        "model.language_model.layers.0.self_attn.q_norm.weight")


def test_registered_and_our_checkpoint_round_trips_and_transformers_loads_it(model, tmp_path):
    assert get_model_entry("qwen3_vl").model_class is Qwen3VLForConditionalGeneration
    ids, image = _image_prompt()
    save_model(model, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["text_config"]["rope_scaling"]["mrope_interleaved"] is True
    again = qwen_edu.load_model(tmp_path / "ours", attn_implementation="eager")
    reference = load_reference("qwen3_vl", tmp_path / "ours")
    with torch.no_grad():
        mine = model(ids, **image).logits
        # Reloaded weights are bit-equal, but the reloaded model is another computation path
        # (memory layout picks the matmul blocking): fp32 summation-order rounding only.
        torch.testing.assert_close(again(ids, **image).logits, mine, rtol=1e-5, atol=1e-5)
        theirs = reference(input_ids=ids, mm_token_type_ids=mm_token_type_ids(ids), **image).logits
    torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)  # two fp32 implementations, see the parity tests


def test_a_missing_deepstack_merger_is_named(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(checkpoint / "model.safetensors")
    dropped = "model.visual.deepstack_merger_list.1.linear_fc2.bias"
    del tensors[dropped]
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(StateDictMismatchError, match="deepstack_merger_list.1.linear_fc2.bias"):
        qwen_edu.load_model(tmp_path)


def test_timestamps_are_the_processors():
    from transformers import Qwen3VLProcessor

    indices = [0, 3, 6, 9, 12, 15, 18]  # 7 sampled frames of a 6 fps video: padded to 8 by repeating the last
    ours = frame_group_timestamps(indices, video_fps=6.0)
    assert ours == Qwen3VLProcessor._calculate_timestamps(None, list(indices), 6.0, 2)
    assert ours == [0.25, 1.25, 2.25, 3.0]
    assert [timestamp_text(t) for t in ours] == ["<0.2 seconds>", "<1.2 seconds>", "<2.2 seconds>", "<3.0 seconds>"]
    assert split_video_grid(torch.tensor([[3, 4, 6], [1, 2, 2]])).tolist() == [[1, 4, 6]] * 3 + [[1, 2, 2]]


def test_a_timestamp_is_ordinary_text_for_the_real_tokenizer():
    from qwen_edu.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode(timestamp_text(12.5))]
    assert pieces == ["<", "1", "2", ".", "5", " seconds", ">"]  # digits one by one: digits + 4 tokens


def test_deepstack_plumbing():
    hidden = torch.zeros(2, 4, 3)
    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    out = add_visual_features(hidden, mask, torch.arange(9.0).view(3, 3))
    assert out[0, 1].tolist() == [0, 1, 2] and out[1, 0].tolist() == [6, 7, 8] and hidden.abs().sum() == 0
    images, videos = torch.tensor([[0, 1, 0, 0]], dtype=torch.bool), torch.tensor([[0, 0, 1, 1]], dtype=torch.bool)
    visual, taps = order_deepstack([(images, [torch.full((1, 2), 1.0)]), (videos, [torch.full((2, 2), 2.0)])])
    assert visual.tolist() == [[False, True, True, True]] and taps[0][:, 0].tolist() == [1, 2, 2]
    layers = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])
    with inject_deepstack(layers, visual, [torch.ones(3, 2)]):
        injected = layers[1](layers[0](torch.zeros(1, 4, 2)))
    assert injected[0, :, 0].tolist() == [0, 1, 1, 1]  # added once, after layer 0 only
    assert layers[0](torch.zeros(1, 4, 2)).abs().sum() == 0  # the hooks are gone after the block


def test_bad_configs_and_inputs_are_clear_errors(model):
    with pytest.raises(ValueError, match=r"deepstack_visual_indexes \[27\] are not blocks of a depth-27 tower"):
        Qwen3VisionConfig(deepstack_visual_indexes=[8, 27])
    with pytest.raises(ValueError, match="name a block twice"):
        Qwen3VisionConfig(deepstack_visual_indexes=[8, 8])
    with pytest.raises(ValueError, match="3 DeepStack taps feed the first 3 decoder layers, but the decoder has "
                                         "num_hidden_layers=2"):
        Qwen3VLConfig(num_hidden_layers=2)
    ids, image = _image_prompt()
    with pytest.raises(ValueError, match="pixel values need input_ids"):
        model(inputs_embeds=model.model.embed_tokens(ids), **image)
    with pytest.raises(ValueError, match="image tokens do not match the features"):
        model(torch.cat([ids[:, :2], ids[:, 3:]], dim=1), **image)  # one image pad token fewer
    with pytest.raises(ValueError, match="DeepStack features of shape"):
        add_visual_features(torch.zeros(1, 3, 2), torch.tensor([[True, False, True]]), torch.zeros(3, 2))
