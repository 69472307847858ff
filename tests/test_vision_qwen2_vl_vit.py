"""The Qwen2-VL vision tower: each part and the whole tower against transformers, packing, and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qwen_edu.vision.dynamic_resolution import preprocess_images, preprocess_video
from qwen_edu.vision.qwen2_vl_vit import (
    PatchEmbed,
    Qwen2VisionTransformer,
    VisionBlock,
    VisionConfig,
    VisionRotaryEmbedding,
    register_vision_mlp,
    vision_cu_seqlens,
    vision_position_ids,
)
from tests._checkpoints import randomize_all_parameters
from tests._qwen2_vl_reference import VISION, random_images

# fp32 tolerance for two computations of the same tower in different operation orders (per-segment vs
# batched attention, matmul vs Conv3d): a 2-block ViT of width 32 accumulates a few ulps of 1e-7 per op.
TOL = dict(rtol=1e-5, atol=1e-5)


def _hf_vision_config(**overrides):
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig

    return Qwen2VLVisionConfig(**{**VISION, **overrides})


def _towers(attn_implementation: str = "eager"):
    """A randomised transformers tower and ours with the same weights."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    hf_config = _hf_vision_config()
    hf_config._attn_implementation = attn_implementation
    reference = randomize_all_parameters(Qwen2VisionTransformerPretrainedModel(hf_config), seed=3).eval()
    config = VisionConfig.from_hf_config(hf_config.to_dict()).replace(attn_implementation=attn_implementation)
    ours = Qwen2VisionTransformer(config).eval()
    ours.load_state_dict(reference.state_dict())
    return reference, ours


@pytest.fixture(scope="module")
def packed():
    """Two images of different sizes and a 4-frame video, as the processor packs them."""
    pixels, grid = preprocess_images(random_images([(56, 84), (112, 56)], seed=5))
    video, video_grid = preprocess_video(random_images([(56, 56)] * 4, seed=6), min_pixels=56 * 56)
    return torch.cat([pixels, video]), torch.cat([grid, video_grid])


def test_patch_embedding_as_a_matmul_equals_the_conv3d():
    embed = PatchEmbed(14, 2, 3, 32)
    nn.init.normal_(embed.proj.weight, std=1176**-0.5)  # outputs O(1), so an absolute 1e-5 means ~1e-5 relative
    pixels = torch.randn(10, 3 * 2 * 14 * 14)
    conv = embed.proj(pixels.view(-1, 3, 2, 14, 14)).view(10, 32)
    torch.testing.assert_close(embed(pixels), conv, **TOL)


def test_vision_positions_and_segments_equal_the_reference(packed):
    from transformers.vision_utils import get_vision_position_ids

    _, grid = packed
    assert torch.equal(vision_position_ids(grid, 2), get_vision_position_ids(grid, 2))
    assert vision_cu_seqlens(grid).tolist() == [0, 24, 56, 72, 88]  # 4x6, 8x4, then two 4x4 frame groups
    assert vision_cu_seqlens(grid).dtype == torch.int32


def test_rotary_table_equals_the_reference(packed):
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLVisionRotaryEmbedding
    from transformers.vision_utils import get_vision_position_ids

    _, grid = packed
    positions = vision_position_ids(grid, 2)
    ours = VisionRotaryEmbedding(8)(torch.zeros(1), positions)
    reference = Qwen2VLVisionRotaryEmbedding(_hf_vision_config())(torch.zeros(1), get_vision_position_ids(grid, 2))
    for got, want in zip(ours, reference):
        assert torch.equal(got, want)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_the_tower_equals_transformers(packed, attn):
    reference, ours = _towers(attn)
    pixels, grid = packed
    with torch.no_grad():
        want = reference(pixels, grid_thw=grid).pooler_output
        got = ours(pixels, grid)
    assert got.shape == (88 // 4, 64)
    torch.testing.assert_close(got, want, **TOL)


def test_no_attention_across_images(packed):
    """Each image's features are the same whether it is encoded alone or packed with the others."""
    _, ours = _towers("sdpa")
    pixels, grid = packed
    with torch.no_grad():
        together = ours(pixels, grid)
        alone = [ours(p, g[None]) for p, g in zip(pixels.split(grid.prod(-1).tolist()), grid)]
    torch.testing.assert_close(together, torch.cat(alone), **TOL)


def test_eager_and_batched_sdpa_attention_agree(packed):
    _, ours = _towers("eager")
    pixels, grid = packed
    with torch.no_grad():
        eager = ours(pixels, grid)
        ours.set_attn_implementation("sdpa")
        batched = ours(pixels, grid)
    torch.testing.assert_close(batched, eager, **TOL)


@pytest.mark.parametrize(
    "rows,grid,message",
    [
        (23, [[1, 4, 6]], r"expected \[24, 1176\]"),
        (24, [[1, 4, 6], [1, 2, 2]], r"expected \[28, 1176\]"),
        (12, [[1, 3, 4]], "multiples of spatial_merge_size=2"),
        (24, [[0, 4, 6]], "non-positive"),
        (24, [4, 6], r"must be \[n_items, 3\]"),
    ],
)
def test_a_grid_that_does_not_match_the_pixels_is_a_clear_error(rows, grid, message):
    tower = Qwen2VisionTransformer(VisionConfig(depth=1, embed_dim=32, out_hidden_size=64, num_heads=4))
    with pytest.raises(ValueError, match=message):
        tower(torch.zeros(rows, 1176), torch.tensor(grid))


def test_qwen25_vl_blocks_are_a_config_choice():
    """RMSNorm + biased SwiGLU (Qwen2.5-VL's block) from options, equal to transformers' block."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionBlock

    hf_config = Qwen2_5_VLVisionConfig(hidden_size=32, num_heads=4, intermediate_size=48, hidden_act="silu")
    hf_config._attn_implementation = "eager"
    reference = randomize_all_parameters(Qwen2_5_VLVisionBlock(hf_config), seed=4).eval()
    config = VisionConfig(embed_dim=32, num_heads=4, intermediate_size=48, hidden_act="silu", norm="rmsnorm",
                          mlp="swiglu", attn_implementation="eager")
    ours = VisionBlock(config).eval()
    ours.load_state_dict(reference.state_dict())  # same keys: norm1.weight, mlp.gate_proj.bias, ...
    x, grid = torch.randn(40, 32), torch.tensor([[1, 4, 6], [1, 4, 4]])
    cos, sin = VisionRotaryEmbedding(8)(x, vision_position_ids(grid))
    with torch.no_grad():
        got = ours(x, vision_cu_seqlens(grid), cos, sin)
        want = reference(x, cu_seqlens=vision_cu_seqlens(grid), position_embeddings=(cos, sin))
    torch.testing.assert_close(got, want, **TOL)


def test_new_mlp_kinds_can_be_registered():
    class LinearFC(nn.Module):
        def __init__(self, config: VisionConfig) -> None:
            super().__init__()
            self.linear_fc1 = nn.Linear(config.embed_dim, config.mlp_hidden_size)
            self.linear_fc2 = nn.Linear(config.mlp_hidden_size, config.embed_dim)

        def forward(self, x):
            return self.linear_fc2(torch.tanh(self.linear_fc1(x)))

    register_vision_mlp("linear_fc", LinearFC)
    block = VisionBlock(VisionConfig(embed_dim=32, num_heads=4, mlp="linear_fc"))
    assert "mlp.linear_fc1.weight" in block.state_dict()
    with pytest.raises(ValueError, match="unknown vision MLP 'conv'"):
        VisionConfig(mlp="conv")
