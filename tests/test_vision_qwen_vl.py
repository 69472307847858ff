"""Qwen-VL's vision tower, quirk by quirk, against independent formulations of the reference code.

Float tolerances: every comparison below runs the same fp32 maths in a different order (batch-first vs
sequence-first, SDPA vs bmm + softmax, F.linear on row blocks vs nn.MultiheadAttention's fused path), so
results agree to a few fp32 ulps of the O(1)-O(10) activations; 1e-5 absolute (plus 1e-5 relative) leaves
room for that and for CPU kernel differences, and is far below any real bug (a wrong layout or a
missing term changes outputs by O(0.1) or more).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from qwen_edu.vision.qwen_vl_vit import (
    QwenVLVisionConfig,
    QwenVLVisionTransformer,
    VisualAttention,
    VisualAttentionBlock,
    image_transform,
)
from qwen_edu.vision.resampler import (
    PackedMultiheadAttention,
    Resampler,
    resize_position_table,
    sincos_2d_table,
)
from tests import _qwen_vl_reference as ref
from tests._checkpoints import randomize_all_parameters

TOL = {"atol": 1e-5, "rtol": 1e-5}


# --- the 2D sin-cos table ----------------------------------------------------------------------------------
def test_sincos_table_equals_the_reference_numpy_code():
    for dim, grid in [(4096, 16), (64, 4), (192, 8)]:
        ours = sincos_2d_table(dim, grid)
        assert ours.shape == (grid * grid, dim) and ours.dtype == torch.float32
        # fp32 sin/cos of the same fp32 angles in numpy and torch: equal to a few ulps of values in [-1, 1].
        torch.testing.assert_close(ours, torch.from_numpy(ref.sincos_table_numpy(dim, grid)), atol=2e-6, rtol=0)


def test_sincos_table_is_column_first():
    """Point (row r, col c) is row r*G+c; the first half of its channels depends on c only, the second on r."""
    grid, dim = 8, 32
    table = sincos_2d_table(dim, grid).view(grid, grid, dim)  # [row, col, channel]
    first, second = table[..., : dim // 2], table[..., dim // 2:]
    assert torch.equal(first, first[:1].expand_as(first)), "first half must not change along rows"
    assert torch.equal(second, second[:, :1].expand_as(second)), "second half must not change along columns"
    col, omega = 5, 1.0 / 10000 ** (torch.arange(dim // 4) / (dim // 4))
    expected = torch.cat([torch.sin(col * omega), torch.cos(col * omega)])
    torch.testing.assert_close(table[2, col, : dim // 2], expected)  # row 2, column 5: encodes 5 first


def test_sincos_table_needs_a_width_divisible_by_four():
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d_table(30, 4)


# --- resizing position tables --------------------------------------------------------------------------------
def test_resize_is_bicubic_in_fp32_and_cast_back():
    table = torch.randn(256, 24, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    resized = resize_position_table(table, (32, 32))
    assert resized.shape == (1024, 24) and resized.dtype == torch.bfloat16
    # Independent formulation: the reference's get_abs_pos (same fp32 ops, so the same bits).
    assert torch.equal(resized, ref.get_abs_pos(table, 1024))
    by_hand = F.interpolate(table.float().reshape(1, 16, 16, 24).permute(0, 3, 1, 2), size=(32, 32),
                            mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(0, 2)
    assert torch.equal(resized, by_hand.to(torch.bfloat16))


def test_resize_keeps_a_matching_table_untouched_and_reaches_any_grid():
    table = torch.randn(64, 8)
    assert resize_position_table(table, (8, 8)) is table
    assert resize_position_table(table, (4, 6)).shape == (24, 8)
    # A smooth table keeps its layout: upsampled 2x (align_corners=False puts output pixel (0, 0) at input
    # (-0.25, -0.25)), the top-left entry stays close to the original top-left entry.
    smooth = sincos_2d_table(8, 8)
    up = resize_position_table(smooth, (16, 16)).view(16, 16, 8)
    assert (up[0, 0] - smooth.view(8, 8, 8)[0, 0]).abs().max() < 0.2


def test_resize_rejects_a_table_that_is_not_on_a_square_grid():
    with pytest.raises(ValueError, match="not a square grid"):
        resize_position_table(torch.randn(20, 4), (4, 4))


# --- the resampler ---------------------------------------------------------------------------------------
def _packed_attention_pair(dim=64, heads=4, seed=0):
    mha = torch.nn.MultiheadAttention(dim, heads)
    randomize_all_parameters(mha, seed)
    ours = PackedMultiheadAttention(dim, heads)
    ours.load_state_dict(mha.state_dict())  # same parameter names: the checkpoint keys load as they are
    return mha, ours


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_attention_equals_nn_multihead_attention(impl):
    mha, ours = _packed_attention_pair()
    ours.attn_implementation = impl
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, n, 64, generator=gen) for n in (9, 30, 30))
    expected, weights = mha(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))  # sequence-first
    out, our_weights = ours(q, k, v, need_weights=True)
    torch.testing.assert_close(out, expected.transpose(0, 1), **TOL)
    torch.testing.assert_close(our_weights, weights, **TOL)
    torch.testing.assert_close(ours(q, k, v)[0], out, **TOL)


def test_resampler_equals_the_reference_with_nn_multihead_attention():
    """Keys get the table resized to the 32x32 patch grid, queries the 16x16 table, values none."""
    torch.manual_seed(0)
    res = Resampler(grid_size=16, embed_dim=256, num_heads=2, kv_dim=48)
    randomize_all_parameters(res, seed=3)
    with torch.no_grad():
        res.pos_embed.copy_(sincos_2d_table(256, 16))
    x = torch.randn(2, 1024, 48, generator=torch.Generator().manual_seed(4))
    sd = {"attn_pool." + k: v for k, v in res.state_dict().items()}
    expected = ref.resampler(x, sd, "attn_pool.", num_heads=2)
    out, attention = res(x, (32, 32), need_weights=True)
    assert out.shape == (2, 256, 256) and attention.shape == (2, 256, 1024)
    torch.testing.assert_close(out, expected, **TOL)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 256))


def test_resampler_without_kv_proj_when_widths_match():
    res = Resampler(grid_size=4, embed_dim=128, num_heads=1, kv_dim=128)
    assert isinstance(res.kv_proj, torch.nn.Identity)
    assert not any(k.startswith("kv_proj") for k in res.state_dict())
    randomize_all_parameters(res, seed=5)
    with torch.no_grad():
        res.pos_embed.copy_(sincos_2d_table(128, 4))
    x = torch.randn(1, 64, 128)
    sd = {"p." + k: v for k, v in res.state_dict().items()}
    torch.testing.assert_close(res(x, (8, 8))[0], ref.resampler(x, sd, "p.", num_heads=1), **TOL)


def test_resampler_queries_are_position_aware():
    """Shuffling the patches changes the output: keys carry their grid position."""
    res = Resampler(grid_size=4, embed_dim=128, num_heads=1, kv_dim=32)
    randomize_all_parameters(res, seed=6)
    with torch.no_grad():
        res.pos_embed.copy_(sincos_2d_table(128, 4))
    x = torch.randn(1, 64, 32)
    shuffled = x[:, torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    assert (res(x)[0] - res(shuffled)[0]).abs().max() > 1e-2
    assert not res.pos_embed.requires_grad, "the sin-cos table is frozen"


def test_resampler_rejects_bad_shapes():
    res = Resampler(grid_size=2, embed_dim=128, num_heads=1, kv_dim=8)
    with pytest.raises(ValueError, match="patch features"):
        res(torch.randn(10, 8))
    with pytest.raises(ValueError, match="does not hold"):
        res(torch.randn(1, 10, 8), (3, 3))
    with pytest.raises(ValueError, match="not a square grid"):
        res(torch.randn(1, 10, 8))


# --- the ViT block -------------------------------------------------------------------------------------------
def _block(width=48, heads=4, mlp=120, impl="eager", seed=7):
    block = VisualAttentionBlock(width, heads, mlp, attn_implementation=impl)
    return randomize_all_parameters(block, seed)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_vit_block_equals_the_reference_rendering(impl):
    block = _block(impl=impl)
    x = torch.randn(2, 50, 48, generator=torch.Generator().manual_seed(8))
    sd = {"b." + k: v for k, v in block.state_dict().items()}
    expected = ref.vit_block(x.transpose(0, 1), sd, "b.", heads=4).transpose(0, 1)  # reference is [L, B, C]
    torch.testing.assert_close(block(x), expected, **TOL)


def test_in_proj_is_head_interleaved_not_pytorch_blocks():
    """Reordering in_proj's rows from [q_h|k_h|v_h per head] to [q|k|v] blocks makes nn.MultiheadAttention agree."""
    width, heads, d = 48, 4, 12
    attn = randomize_all_parameters(VisualAttention(width, heads, "eager"), seed=9)
    x = torch.randn(1, 20, width)
    order = torch.arange(3 * width).view(heads, 3, d).transpose(0, 1).reshape(-1)  # head-major -> q|k|v-major
    mha = torch.nn.MultiheadAttention(width, heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(attn.in_proj.weight[order])
        mha.in_proj_bias.copy_(attn.in_proj.bias[order])
        mha.out_proj.load_state_dict(attn.out_proj.state_dict())
    torch.testing.assert_close(attn(x), mha(x, x, x)[0], **TOL)
    unshuffled = torch.nn.MultiheadAttention(width, heads, batch_first=True)
    with torch.no_grad():
        unshuffled.in_proj_weight.copy_(attn.in_proj.weight)
        unshuffled.in_proj_bias.copy_(attn.in_proj.bias)
        unshuffled.out_proj.load_state_dict(attn.out_proj.state_dict())
    assert (attn(x) - unshuffled(x, x, x)[0]).abs().max() > 1e-2, "the plain q|k|v reading is wrong"


def test_eager_softmax_runs_in_the_input_dtype():
    """In bf16 the reference's eager path equals ours bit for bit (same ops, no fp32 upcast)."""
    block = _block(impl="eager").to(torch.bfloat16)
    x = torch.randn(1, 30, 48).to(torch.bfloat16)
    sd = {"b." + k: v for k, v in block.state_dict().items()}
    expected = ref.visual_attention(block.ln_1(x).transpose(0, 1), sd, "b.attn.", 4).transpose(0, 1)
    assert torch.equal(block.attn(block.ln_1(x)), expected)


# --- the whole tower -------------------------------------------------------------------------------------------
VISUAL = {**ref.TINY_VISUAL}


def _tower(impl="sdpa", **changes):
    config = QwenVLVisionConfig(**{**VISUAL, **changes}, attn_implementation=impl)
    tower = QwenVLVisionTransformer(config)
    randomize_all_parameters(tower, seed=10)
    with torch.no_grad():
        tower.attn_pool.pos_embed.copy_(sincos_2d_table(config.output_dim, config.query_grid))
    return tower


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_vision_tower_equals_the_reference(impl):
    tower = _tower(impl)
    assert tower.positional_embedding.shape == (256, 48), "the reference's learned table is 16x16"
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(11))
    sd = {"transformer.visual." + k: v for k, v in tower.state_dict().items()}
    with torch.no_grad():
        out = tower(pixels)
        expected = ref.visual_forward(pixels, sd, VISUAL)
    assert out.shape == (2, 256, 256)
    torch.testing.assert_close(out, expected, **TOL)


def test_vision_tower_at_the_pretraining_resolution():
    """Stage 1 of Qwen-VL runs at 224 px: a 16x16 grid, where both tables are used as they are."""
    tower = _tower(image_size=32)
    pixels = torch.randn(1, 3, 32, 32)
    sd = {"transformer.visual." + k: v for k, v in tower.state_dict().items()}
    with torch.no_grad():
        torch.testing.assert_close(tower(pixels), ref.visual_forward(pixels, sd, VISUAL), **TOL)


def test_vision_tower_rejects_bad_pixels():
    tower = _tower()
    for bad, words in [(torch.randn(3, 64, 64), "num_images, 3, height, width"),
                       (torch.randn(1, 1, 64, 64), "num_images, 3, height, width"),
                       (torch.randn(1, 3, 63, 64), "multiples of patch_size=2")]:
        with pytest.raises(ValueError, match=words):
            tower(bad)


def test_mlp_width_is_truncated_like_the_reference():
    assert QwenVLVisionConfig().mlp_width == 8192  # int(1664 * 4.9231) = int(8192.04)
    assert QwenVLVisionConfig().resampler_heads == 32 and QwenVLVisionConfig().grid == 32


@pytest.mark.parametrize("bad, words", [({"n_queries": 200}, "square"), ({"output_dim": 64}, "at least 128"),
                                        ({"image_size": 65}, "multiple of patch_size"), ({"heads": 5}, "divisible")])
def test_vision_config_errors(bad, words):
    with pytest.raises(ValueError, match=words):
        QwenVLVisionConfig(**{**VISUAL, **bad})


def test_vision_config_round_trips_the_reference_dict():
    real = {"heads": 16, "image_size": 448, "layers": 48, "mlp_ratio": 4.9231, "output_dim": 4096,
            "patch_size": 14, "width": 1664, "image_start_id": 151857}
    assert QwenVLVisionConfig.from_dict(real).to_dict() == real
    small = {**real, "n_queries": 64, "positional_grid": 8, "something_new": 1}
    assert QwenVLVisionConfig.from_dict(small).to_dict() == small
    with pytest.raises(KeyError, match="width"):
        QwenVLVisionConfig.from_dict({k: v for k, v in real.items() if k != "width"})


# --- preprocessing ---------------------------------------------------------------------------------------------
def test_image_transform_squashes_to_a_square_like_the_reference(tmp_path):
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (30, 70, 3), dtype=np.uint8))
    path = tmp_path / "wide.png"
    picture.save(path)
    ours = image_transform(path, 28)
    assert ours.shape == (3, 28, 28), "a 70x30 picture becomes 28x28: the aspect ratio is not kept"
    # Same PIL resize, numpy normalisation vs torch: float32 (x - m) / s in another order, ~1 ulp.
    torch.testing.assert_close(ours, ref.image_transform(path, 28), atol=1e-6, rtol=1e-6)
    grey = image_transform(Image.new("L", (10, 10), 128), 14)
    assert grey.shape == (3, 14, 14), "greyscale pictures are converted to RGB"
