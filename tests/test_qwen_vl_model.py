"""Qwen-VL through ``qwen_edu.load_model``: a tiny random checkpoint in the *original* layout must give the
logits and greedy generations of the naive reference rendering in ``tests/_qwen_vl_reference.py``.

Float tolerance: both sides compute the same fp32 model (a 2-block ViT with a 32x32 patch grid, the
resampler, a 2-layer Qwen-1 decoder over ~270 positions) with differently ordered reductions (SDPA vs
bmm, batch- vs sequence-first, fused vs split projections). The differences stay at fp32 rounding of
the O(1-10) activations: measured logit differences are about 3e-6 on logits up to ~4, so 1e-5 absolute
plus 1e-5 relative leaves a 10x margin for other CPUs, while a layout or splicing bug moves them by O(1).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import qwen_edu
from qwen_edu.checkpoint import CorruptCheckpointError, StateDictMismatchError, save_model
from qwen_edu.models.qwen_vl import QwenVLConfig, QwenVLForCausalLM, QwenVLLayout
from qwen_edu.models.registry import get_model_entry, model_type_of
from qwen_edu.vision.qwen_vl_vit import image_transform
from tests import _qwen_vl_reference as ref

TOL = {"atol": 1e-5, "rtol": 1e-5}
IMG, END, PAD = 300, 301, 302
SPAN = 256


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return ref.make_tiny_qwen_vl_checkpoint(tmp_path_factory.mktemp("qwen_vl"), seed=0)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> list[str]:
    """Three small random pictures of different sizes on disk."""
    where = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(40, 50), (64, 64), (90, 30)]):
        path = where / f"pic{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def span(path: str) -> list[int]:
    """``<img>`` + path bytes + ``<imgpad>`` ... + ``</img>``, written out by hand (reference §11.4)."""
    data = list(path.encode("utf-8"))
    return [IMG, *data, *[PAD] * (SPAN - len(data)), END]


@pytest.fixture(scope="module")
def batch(pictures) -> torch.Tensor:
    """Two rows of two pictures each (the same picture twice in different rows), text ids below 300."""
    rows = [[5, 17, *span(pictures[0]), 40, 41, 42, 43, *span(pictures[2]), 7],
            [9, 10, *span(pictures[1]), 11, 12, 14, *span(pictures[2]), 13, 15]]
    assert len(rows[0]) == len(rows[1])
    return torch.tensor(rows)


@pytest.fixture(scope="module")
def state(folder):
    return load_file(folder / "model.safetensors"), json.loads((folder / "config.json").read_text())


@pytest.fixture(scope="module")
def model(folder):
    return qwen_edu.load_model(folder)


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


# --- config and registry -----------------------------------------------------------------------------------
def test_a_qwen_vl_config_is_recognised_by_its_visual_dict(folder):
    raw = json.loads((folder / "config.json").read_text())
    assert raw["model_type"] == "qwen" and model_type_of(raw) == "qwen_vl"
    entry = get_model_entry("qwen_vl")
    assert entry.model_class is QwenVLForCausalLM and isinstance(entry.layout, QwenVLLayout)
    config = QwenVLConfig.from_hf_config(folder)
    assert config.visual.width == 48 and config.visual.n_queries == 256 and config.intermediate_size == 96
    written = config.to_hf_config()
    assert written["visual"] == raw["visual"]
    assert {k: written[k] for k in ref.TINY_TEXT} == ref.TINY_TEXT


def test_the_real_qwen_vl_chat_config_round_trips():
    real = {"model_type": "qwen", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
            "kv_channels": 128, "intermediate_size": 22016, "vocab_size": 151936, "seq_length": 2048,
            "max_position_embeddings": 8192, "rotary_emb_base": 10000, "use_dynamic_ntk": True,
            "use_logn_attn": True, "no_bias": True, "tie_word_embeddings": False, "layer_norm_epsilon": 1e-6,
            "visual": {"heads": 16, "image_size": 448, "layers": 48, "mlp_ratio": 4.9231, "output_dim": 4096,
                       "patch_size": 14, "width": 1664, "image_start_id": 151857}}
    config = QwenVLConfig.from_hf_config(real)
    assert config.intermediate_size == 11008 and config.visual.mlp_width == 8192
    assert config.to_hf_config()["visual"] == real["visual"]
    with torch.device("meta"):
        model = QwenVLForCausalLM(config)
    visual = sum(p.numel() for n, p in model.named_parameters() if n.startswith("visual."))
    assert 1.9e9 < visual < 2.0e9, "Qwen-VL's vision side is about 1.9B parameters"


def test_config_errors_name_the_problem():
    base = ref.tiny_qwen_vl_config()
    with pytest.raises(ValueError, match="output_dim=128 must equal hidden_size=256"):
        QwenVLConfig.from_hf_config({**base, "visual": {**base["visual"], "output_dim": 128}})
    with pytest.raises(ValueError, match="below vocab_size"):
        QwenVLConfig.from_hf_config({**base, "vocab_size": 302})
    with pytest.raises(ValueError, match="needs a 'visual' dict"):
        QwenVLConfig.from_hf_config({k: v for k, v in base.items() if k != "visual"})


# --- numerics against the naive reference ----------------------------------------------------------------------
def test_logits_equal_the_naive_reference_reading_pictures_from_the_ids(model, batch, state):
    sd, config = state
    expected = ref.qwen_vl_logits(batch, sd, config)
    ours = _logits(model, batch)
    assert ours.shape == (2, batch.shape[1], 320)
    torch.testing.assert_close(ours, expected, **TOL)


def test_explicit_pixel_values_give_the_same_logits(model, batch, pictures):
    pixels = torch.stack([image_transform(p, 64) for p in (pictures[0], pictures[2], pictures[1], pictures[2])])
    assert torch.equal(_logits(model, batch, pixel_values=pixels), _logits(model, batch))


def test_the_image_changes_the_prediction(model, batch, pictures):
    pixels = torch.stack([image_transform(p, 64) for p in (pictures[0], pictures[2], pictures[1], pictures[2])])
    other = pixels.flip(0)
    assert (_logits(model, batch, pixel_values=pixels) - _logits(model, batch, pixel_values=other)).abs().max() > 0.1


def test_only_the_slots_between_the_tags_are_replaced(model, batch):
    with torch.no_grad():
        embeds = model.embed_with_images(batch)
        plain = model.model.embed_tokens(batch)
    changed = (embeds != plain).any(-1)
    for s in model.image_spans(batch):
        assert changed[s.row, s.start + 1:s.end].all()
        assert not changed[s.row, s.start] and not changed[s.row, s.end]
    assert changed.sum() == 4 * SPAN


def test_greedy_generation_equals_the_naive_reference(model, batch, state):
    sd, config = state
    ours = qwen_edu.generate(model, batch, max_new_tokens=5, eos_token_id=[])
    assert torch.equal(ours, ref.greedy(batch, sd, config, 5))


def test_generate_passes_pixel_values_to_the_prefill_only(model, batch, pictures):
    pixels = torch.stack([image_transform(p, 64) for p in (pictures[0], pictures[2], pictures[1], pictures[2])])
    with_pixels = qwen_edu.generate(model, batch, max_new_tokens=4, eos_token_id=[], pixel_values=pixels)
    assert torch.equal(with_pixels, qwen_edu.generate(model, batch, max_new_tokens=4, eos_token_id=[]))


def test_eager_attention_matches_too(folder, batch, state):
    eager = qwen_edu.load_model(folder, attn_implementation="eager")
    assert eager.visual.transformer.resblocks[0].attn.attn_implementation == "eager"
    torch.testing.assert_close(_logits(eager, batch), ref.qwen_vl_logits(batch, *state), **TOL)


def test_loads_in_bfloat16(folder, batch, model):
    half = qwen_edu.load_model(folder, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    # bf16 keeps ~3 significant digits through two ViT blocks and two decoder layers: compare the argmax
    # agreement, not the values.
    agree = (_logits(half, batch).argmax(-1) == _logits(model, batch).argmax(-1)).float().mean()
    assert agree > 0.8


# --- saving ------------------------------------------------------------------------------------------------
def test_save_writes_the_original_layout_back(model, folder, tmp_path, batch):
    out = save_model(model, tmp_path / "saved")
    original, saved = load_file(folder / "model.safetensors"), load_file(out / "model.safetensors")
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[k], original[k]) for k in original)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen" and config["visual"] == ref.TINY_VISUAL
    # the weights are bit-equal (above); the reloaded model's kernels may round differently (fp32)
    torch.testing.assert_close(_logits(qwen_edu.load_model(out), batch), _logits(model, batch),
                               rtol=1e-5, atol=1e-6)


def test_save_of_a_small_model_records_its_extra_visual_keys(tmp_path):
    config = QwenVLConfig.from_hf_config(ref.tiny_qwen_vl_config({"n_queries": 16, "positional_grid": 4}))
    torch.manual_seed(0)
    model = QwenVLForCausalLM(config)
    assert model.visual.positional_embedding.shape == (16, 48)
    reloaded = qwen_edu.load_model(save_model(model, tmp_path / "small"))
    assert reloaded.config.visual.n_queries == 16 and reloaded.config.visual.positional_grid == 4


# --- loading errors ----------------------------------------------------------------------------------------
def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "ckpt"))


def test_a_missing_visual_tensor_is_named(folder, tmp_path):
    broken = _copy(folder, tmp_path)
    sd = load_file(broken / "model.safetensors")
    del sd["transformer.visual.proj"]
    save_file(sd, broken / "model.safetensors")
    with pytest.raises(StateDictMismatchError, match=r"missing keys \(1\): transformer\.visual\.proj"):
        qwen_edu.load_model(broken)


def test_a_wrong_visual_shape_is_named(folder, tmp_path):
    broken = _copy(folder, tmp_path)
    sd = load_file(broken / "model.safetensors")
    sd["transformer.visual.positional_embedding"] = torch.zeros(1024, 48)
    save_file(sd, broken / "model.safetensors")
    with pytest.raises(StateDictMismatchError, match=r"transformer\.visual\.positional_embedding: expected "
                                                     r"\[256, 48\], found \[1024, 48\]"):
        qwen_edu.load_model(broken)


def test_a_broken_visual_config_is_named(folder, tmp_path):
    broken = _copy(folder, tmp_path)
    config = json.loads((broken / "config.json").read_text())
    del config["visual"]["width"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CorruptCheckpointError, match="not a usable qwen_vl config.*width"):
        qwen_edu.load_model(broken)


# --- bad input -----------------------------------------------------------------------------------------------
def test_a_missing_closing_tag_is_an_error(model, pictures):
    ids = torch.tensor([[5, *span(pictures[0])[:-1], 6]])
    with pytest.raises(ValueError, match=r"1 <img> \(id 300\) but 0 </img>.*missing its </img>"):
        _logits(model, ids)


def test_a_span_of_the_wrong_length_is_an_error(model):
    ids = torch.tensor([[5, IMG, 97, PAD, END, 6]])
    with pytest.raises(ValueError, match="holds 2 tokens before </img>.*n_queries=256"):
        _logits(model, ids)


def test_pixel_values_must_fit_the_spans(model, batch):
    with pytest.raises(ValueError, match="hold 3 images but input_ids have 4"):
        _logits(model, batch, pixel_values=torch.zeros(3, 3, 64, 64))
    with pytest.raises(ValueError, match=r"must be a \[num_images, 3, height, width\] tensor, got \(4, 64, 64\)"):
        _logits(model, batch, pixel_values=torch.zeros(4, 64, 64))
    with pytest.raises(ValueError, match="multiples of patch_size=2"):
        _logits(model, batch, pixel_values=torch.zeros(4, 3, 63, 63))
    with pytest.raises(ValueError, match="no <img> ... </img> span"):
        _logits(model, torch.tensor([[1, 2, 3]]), pixel_values=torch.zeros(1, 3, 64, 64))


def test_a_picture_that_does_not_exist_is_named(model, tmp_path):
    missing = str(tmp_path / "nowhere.png")
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        _logits(model, torch.tensor([[5, *span(missing)]]))
