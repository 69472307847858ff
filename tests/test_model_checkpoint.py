"""Loading and saving checkpoints: both layouts, sharding, the hub path, and every failure mode."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qwen_edu
from qwen_edu import checkpoint as ckpt
from qwen_edu.checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigMismatchError,
    CorruptCheckpointError,
    StateDictMismatchError,
    load_model,
    save_model,
)
from tests._checkpoints import convert_to_qwen1_checkpoint, load_reference, make_tiny_qwen2_checkpoint

IDS = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_tiny_qwen2_checkpoint(tmp_path_factory.mktemp("base"), seed=1)


@pytest.fixture(scope="module")
def mha(tmp_path_factory) -> Path:
    return make_tiny_qwen2_checkpoint(tmp_path_factory.mktemp("mha"), seed=2, num_key_value_heads=4)


@pytest.fixture
def broken(base, tmp_path) -> Path:
    """A private copy of the base checkpoint to damage."""
    return Path(shutil.copytree(base, tmp_path / "ckpt"))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _edit_weights(folder: Path, fn) -> None:
    sd = load_file(folder / "model.safetensors")
    fn(sd)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


# --- layouts ------------------------------------------------------------------------------------------
def test_entry_points_are_exported():
    from qwen_edu.generation import generate

    assert qwen_edu.load_model is load_model and qwen_edu.generate is generate


def test_qwen1_layout_gives_reference_logits(mha, tmp_path):
    folder = convert_to_qwen1_checkpoint(mha, tmp_path / "qwen1")
    keys = set(load_file(folder / "model.safetensors"))
    assert "transformer.h.0.attn.c_attn.weight" in keys and "model.embed_tokens.weight" not in keys
    ref = load_reference(mha)
    for impl in ("eager", "sdpa"):
        model = load_model(folder, attn_implementation=impl)
        assert model.config.model_type == "qwen" and model.config.intermediate_size == 112
        torch.testing.assert_close(_logits(model), _logits(ref), atol=1e-5, rtol=1e-5)


def test_qwen1_long_context_flags_only_act_beyond_seq_length(mha, tmp_path):
    """NTK-alpha RoPE and logN scaling are off up to seq_length (then Qwen-1 == Qwen2 math) and on beyond."""
    folder = convert_to_qwen1_checkpoint(mha, tmp_path / "qwen1", seq_length=16, use_dynamic_ntk=True,
                                         use_logn_attn=True)
    model, ref = load_model(folder, attn_implementation="eager"), load_reference(mha)
    short, long = IDS[:, :16], torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(model, short), _logits(ref, short), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_logits(model, long), _logits(ref, long), atol=1e-3)
    assert model.model.rotary_emb.ntk_length == 40


def test_qwen1_bf16_rotates_in_fp32(mha, tmp_path):
    """Qwen-1 rotates q/k in fp32; in bf16 that differs from HF Qwen2's bf16 rotation by a few ulps."""
    folder = convert_to_qwen1_checkpoint(mha, tmp_path / "qwen1")
    qwen1 = load_model(folder, dtype=torch.bfloat16)
    qwen2 = load_model(mha, dtype=torch.bfloat16)
    a, b = _logits(qwen1).float(), _logits(qwen2).float()
    assert not torch.equal(a, b)
    torch.testing.assert_close(a, b, atol=0.125, rtol=0)


def test_sharded_checkpoint_loads(tmp_path):
    folder = make_tiny_qwen2_checkpoint(tmp_path / "sharded", seed=3, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").exists()
    torch.testing.assert_close(_logits(load_model(folder)), _logits(load_reference(folder)), atol=1e-5, rtol=1e-5)


def test_dtype_and_device_choice(tmp_path):
    folder = make_tiny_qwen2_checkpoint(tmp_path / "bf16", seed=4, dtype=torch.bfloat16)
    assert load_model(folder).dtype == torch.bfloat16  # default: the checkpoint's own dtype
    model = load_model(folder, dtype="float32", device="cpu")
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert not model.training


# --- saving -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["qwen2", "qwen2-tied", "qwen1"])
@pytest.mark.parametrize("shard", [None, "30KB"])
def test_save_load_round_trip_is_bit_exact(base, mha, tmp_path, layout, shard):
    if layout == "qwen1":
        source = convert_to_qwen1_checkpoint(mha, tmp_path / "src")
    elif layout == "qwen2-tied":
        source = make_tiny_qwen2_checkpoint(tmp_path / "src", seed=5, tie_word_embeddings=True)
    else:
        source = base
    model = load_model(source)
    out = save_model(model, tmp_path / "saved", max_shard_size=shard)
    again = load_model(out)
    assert again.config.to_hf_config() == model.config.to_hf_config()
    a, b = dict(model.named_parameters()), dict(again.named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if layout != "qwen1":  # the saved Qwen2-layout folder is also a valid transformers checkpoint
        torch.testing.assert_close(_logits(load_reference(out)), _logits(again), atol=1e-5, rtol=1e-5)
    else:
        assert set(load_file(next(out.glob("*.safetensors")))) <= set(load_file(source / "model.safetensors"))


def test_saving_over_the_loaded_folder_is_safe(broken):
    model = load_model(broken)
    before = _logits(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    save_model(model, broken)
    again = load_model(broken)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in weights.items()), "weights survive bit for bit"
    # Logits of a reloaded model: same weights, but another computation path (memory layout can
    # change the matmul blocking), so fp32 summation-order rounding only.
    torch.testing.assert_close(_logits(again), before, atol=1e-5, rtol=1e-5)


# --- hub ids ------------------------------------------------------------------------------------------
def test_hub_id_goes_through_snapshot_download(base, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **_):
        calls.append((repo_id, revision))
        return str(base)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    model = load_model("Qwen/Qwen2-0.5B", revision="main")
    assert calls == [("Qwen/Qwen2-0.5B", "main")] and model.name_or_path == "Qwen/Qwen2-0.5B"
    local = load_model(base)
    assert all(torch.equal(p, local.state_dict()[k]) for k, p in model.state_dict().items())
    torch.testing.assert_close(_logits(model), _logits(local), atol=1e-5, rtol=1e-5)  # reloaded: rounding only


def test_hub_download_failure_is_reported(monkeypatch):
    def offline(**_):
        raise OSError("network is unreachable")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    with pytest.raises(CheckpointNotFoundError, match="network is unreachable"):
        load_model("Qwen/Does-Not-Exist")


@pytest.mark.parametrize("path", ["/no/such/checkpoint/dir", "./missing-folder", "a/b/c", "bad id!"])
def test_nonexistent_path_that_is_no_hub_id(path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda **_: pytest.fail("must not hit the hub"))
    with pytest.raises(CheckpointNotFoundError, match="not a valid Hugging Face hub id"):
        load_model(path)


# --- bad checkpoints ----------------------------------------------------------------------------------
def test_missing_config(broken):
    (broken / "config.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match=r"config\.json is missing"):
        load_model(broken)


def test_invalid_config_json(broken):
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match=r"config\.json is not valid JSON"):
        load_model(broken)


def test_missing_weights_file(broken):
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match="no model.safetensors"):
        load_model(broken)


def test_unknown_model_type(broken):
    _edit_config(broken, model_type="llama")
    with pytest.raises(NotImplementedError, match="'llama'.*known"):
        load_model(broken)


def test_missing_key(broken):
    _edit_weights(broken, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(StateDictMismatchError, match=r"missing keys \(1\): model\.layers\.1\.mlp\.up_proj\.weight") as e:
        load_model(broken)
    assert e.value.missing == ["model.layers.1.mlp.up_proj.weight"] and not e.value.unexpected


def test_unexpected_key(broken):
    _edit_weights(broken, lambda sd: sd.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}))
    with pytest.raises(StateDictMismatchError, match=r"unexpected keys \(1\): model\.layers\.0\.self_attn\.q_norm"):
        load_model(broken)


def test_old_rotary_buffers_are_ignored(broken):
    _edit_weights(broken, lambda sd: sd.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    load_model(broken)


def test_wrong_shape(broken):
    _edit_weights(broken, lambda sd: sd.update({"model.layers.0.self_attn.k_proj.bias": torch.zeros(40)}))
    with pytest.raises(StateDictMismatchError,
                       match=r"model\.layers\.0\.self_attn\.k_proj\.bias: expected \[32\], found \[40\]"):
        load_model(broken)


def test_truncated_safetensors_file(broken):
    path = broken / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors is not a readable safetensors file"):
        load_model(broken)


def test_garbage_safetensors_header(broken):
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        load_model(broken)


def test_corrupt_index(tmp_path):
    folder = make_tiny_qwen2_checkpoint(tmp_path / "sharded", seed=3, max_shard_size="40KB")
    index = folder / "model.safetensors.index.json"
    good = json.loads(index.read_text())
    index.write_text('{"weight_map": ')
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors\.index\.json is not a valid"):
        load_model(folder)
    wrong = dict(good, weight_map={k: "model-00001-of-00099.safetensors" for k in good["weight_map"]})
    index.write_text(json.dumps(wrong))
    with pytest.raises(CheckpointNotFoundError, match="shard file.*do not exist.*00099"):
        load_model(folder)
    shards = sorted(set(good["weight_map"].values()))
    swapped = {k: shards[0] for k in good["weight_map"]}  # every key claimed by the first shard
    index.write_text(json.dumps(dict(good, weight_map=swapped)))
    with pytest.raises(CorruptCheckpointError, match="does not match the shard files"):
        load_model(folder)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_hidden_layers": 3}, "num_hidden_layers=3, the weights have 2 layers"),
        ({"num_hidden_layers": 1}, "num_hidden_layers=1, the weights have 2 layers"),
        ({"hidden_size": 96}, "hidden_size=96, the embedding is 64 wide"),
        ({"vocab_size": 300}, "vocab_size=300, the embedding has 256 rows"),
    ],
)
def test_config_that_does_not_match_the_weights(broken, change, message):
    _edit_config(broken, **change)
    with pytest.raises(ConfigMismatchError, match="config.json does not match the weights: .*" + message):
        load_model(broken)


def test_config_heads_mismatch_lists_shapes(broken):
    _edit_config(broken, num_key_value_heads=4)
    with pytest.raises(StateDictMismatchError, match=r"k_proj\.weight: expected \[64, 64\], found \[32, 64\]"):
        load_model(broken)


def test_untied_config_without_lm_head(tmp_path):
    folder = make_tiny_qwen2_checkpoint(tmp_path / "tied", seed=6, tie_word_embeddings=True)
    _edit_config(folder, tie_word_embeddings=False)
    with pytest.raises(ConfigMismatchError, match="tie_word_embeddings=false but the weights have no lm_head"):
        load_model(folder)


def test_validation_happens_before_any_weight_is_read(broken, monkeypatch):
    reads = []
    monkeypatch.setattr(ckpt, "_copy_into", lambda *a: reads.append(a))
    _edit_weights(broken, lambda sd: sd.pop("model.norm.weight"))
    with pytest.raises(StateDictMismatchError):
        load_model(broken)
    assert reads == []


def test_a_failing_load_returns_nothing_half_loaded(broken, monkeypatch):
    real = ckpt._copy_into
    count = {"n": 0}

    def flaky(*args):
        count["n"] += 1
        if count["n"] == 5:
            raise OSError("disk went away")
        real(*args)

    monkeypatch.setattr(ckpt, "_copy_into", flaky)
    result = None
    with pytest.raises(CorruptCheckpointError, match="disk went away"):
        result = load_model(broken)
    assert result is None
    assert issubclass(CorruptCheckpointError, CheckpointError)
