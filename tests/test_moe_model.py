"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B) against transformers' ``Qwen2MoeForCausalLM``.

Tiny random checkpoints (every parameter drawn at random, norms and router included) with the shared
expert on and off, ``norm_topk_prob`` true and false, dense and sparse layers mixed through
``decoder_sparse_step`` and ``mlp_only_layers``, tied and untied embeddings.

Tolerances: fp32 logits within 1e-5 of transformers' eager attention (our eager path repeats its
ops; our SDPA path and transformers' grouped_mm / eager expert paths only sum in other orders, a
few 1e-7 on O(1) logits). The auxiliary loss is a sum of a few hundred fp32 products of the same
values: 1e-6 relative.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import qwen_edu
from qwen_edu.checkpoint import CorruptCheckpointError, StateDictMismatchError, load_model, save_model
from qwen_edu.models.layouts import MoeLayout
from qwen_edu.models.moe import SparseMoeBlock
from qwen_edu.models.qwen2_moe import Qwen2MoeConfig, Qwen2MoeForCausalLM
from tests._checkpoints import randomize_all_parameters

TINY_MOE: dict[str, Any] = dict(
    vocab_size=256, hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6,
    num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=40,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)
# moe_intermediate_size * 4 bytes is a multiple of 16 in every case, so transformers' default
# grouped_mm expert path runs on CPU (qwen_later_generations.md §5.3).
CONFIGS: dict[str, dict[str, Any]] = {
    "shared-untied-mlp-only": dict(mlp_only_layers=[1]),
    "noshared-normtopk-tied-step2": dict(shared_expert_intermediate_size=0, norm_topk_prob=True,
                                         tie_word_embeddings=True, decoder_sparse_step=2, num_hidden_layers=4),
    "gqa-shared-normtopk-top3": dict(num_key_value_heads=2, norm_topk_prob=True, num_experts_per_tok=3,
                                     num_experts=8, moe_intermediate_size=16),
    "mha-noshared-tied-all-sparse": dict(shared_expert_intermediate_size=0, tie_word_embeddings=True,
                                         num_experts=4, num_experts_per_tok=4),
}


def tiny_moe_config(**overrides: Any) -> transformers.Qwen2MoeConfig:
    return transformers.Qwen2MoeConfig(**{**TINY_MOE, **overrides})


def make_tiny_moe_checkpoint(folder: str | Path, *, seed: int = 0, fused: bool = False,
                             dtype: torch.dtype | None = None, max_shard_size: str | None = None,
                             **overrides: Any) -> Path:
    """A randomised transformers ``Qwen2MoeForCausalLM`` written by ``save_pretrained``: the per-expert
    hub layout by default (transformers' own default), the fused 5.x tensors with ``fused=True``."""
    model = transformers.Qwen2MoeForCausalLM(tiny_moe_config(**overrides))
    randomize_all_parameters(model, seed)
    if dtype is not None:
        model = model.to(dtype)
    kwargs: dict[str, Any] = {"save_original_format": not fused}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(folder, **kwargs)
    return Path(folder)


def load_moe_reference(folder: Path, dtype: torch.dtype = torch.float32, experts: str = "grouped_mm"):
    model = transformers.Qwen2MoeForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager",
                                                             experts_implementation=experts)
    return model.eval()


def _keys(folder: Path) -> set[str]:
    keys: set[str] = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as fh:
            keys |= set(fh.keys())
    return keys


def _ids(batch: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory):
    name = request.param
    folder = make_tiny_moe_checkpoint(tmp_path_factory.mktemp(name), seed=len(name), **CONFIGS[name])
    return name, folder, load_moe_reference(folder)


# ---- the model -----------------------------------------------------------------------------------------
def test_the_loader_builds_the_moe_model_with_the_right_layers(case):
    name, folder, ref = case
    model = load_model(folder)
    assert isinstance(model, Qwen2MoeForCausalLM) and isinstance(model.config, Qwen2MoeConfig)
    expected = [i for i, layer in enumerate(ref.model.layers) if hasattr(layer.mlp, "gate")]
    assert model.config.sparse_layers == expected
    assert [isinstance(layer.mlp, SparseMoeBlock) for layer in model.model.layers] == \
        [i in expected for i in range(len(ref.model.layers))]
    # Without a shared expert transformers still holds a [1, H] shared_expert_gate per sparse layer
    # (it multiplies a zero-width expert); we build no shared expert at all.
    gates = sum(p.numel() for n, p in ref.named_parameters() if "shared_expert_gate" in n)
    assert model.num_parameters() == ref.num_parameters() - (0 if model.config.shared_expert_intermediate_size
                                                             else gates)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("experts", ["grouped_mm", "eager"])
def test_fp32_logits_match_reference(case, impl, experts):
    _, folder, _ = case
    ref = load_moe_reference(folder, experts=experts)
    model = load_model(folder, attn_implementation=impl)
    ids = _ids()
    with torch.no_grad():
        ours, theirs = model(ids).logits, ref(ids).logits
    assert ours.shape == (2, 16, 256) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_router_logits_aux_loss_and_lm_loss_match_reference(case, masked):
    _, folder, ref = case
    model = load_model(folder, attn_implementation="eager")
    ids = _ids(seed=3)
    mask = None
    if masked:
        mask = torch.ones_like(ids)
        mask[0, :4] = 0
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, labels=ids, output_router_logits=True)
        theirs = ref(ids, attention_mask=mask, labels=ids, output_router_logits=True)
    assert len(ours.router_logits) == len(theirs.router_logits) == len(model.config.sparse_layers)
    for a, b in zip(ours.router_logits, theirs.router_logits, strict=True):
        assert a.shape == (ids.numel(), model.config.num_experts)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.aux_loss, theirs.aux_loss, atol=0, rtol=1e-6)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=0, rtol=1e-6)  # CE + 0.001 * aux


def test_without_router_outputs_there_is_no_aux_loss(case):
    _, folder, _ = case
    model = load_model(folder)
    out = model(_ids(), labels=_ids())
    assert out.router_logits is None and out.aux_loss is None and out.loss is not None


def test_greedy_generation_matches_hf_generate(case):
    _, folder, ref = case
    model = load_model(folder)
    ids = _ids(batch=2, length=7, seed=1)
    ours = qwen_edu.generate(model, ids, max_new_tokens=24)
    theirs = ref.generate(ids, max_new_tokens=24, do_sample=False)
    assert torch.equal(ours, theirs)


def test_left_padded_generation_matches_hf_generate(case):
    _, folder, ref = case
    model = load_model(folder)
    ids = _ids(batch=2, length=9, seed=2)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    ours = qwen_edu.generate(model, ids, mask, max_new_tokens=16, pad_token_id=0)
    theirs = ref.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_grouped_mm_and_loop_dispatch_agree(case):
    _, folder, _ = case
    model = load_model(folder)
    ids = _ids(seed=5)
    with torch.no_grad():
        model.set_experts_implementation("loop")
        loop = model(ids).logits
        model.set_experts_implementation("grouped_mm")
        grouped = model(ids).logits
    torch.testing.assert_close(loop, grouped, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="experts_implementation"):
        model.set_experts_implementation("fastest")


def test_bf16_logits_match_reference_with_the_same_kernels(case):
    """In bf16 we follow transformers' grouped_mm expert path op for op (weights cast to bf16, products
    rounded, the k slots summed once), with eager attention on both sides; we assert 1e-2 like the dense
    bf16 test. Across attention kernels (SDPA vs eager) a few bf16 ulps can flip a near-tied expert
    choice in a later layer and move some logits by O(0.3): bf16 MoE outputs are only comparable
    kernel for kernel, which is why this test pins both."""
    _, folder, _ = case
    ref = load_moe_reference(folder, dtype=torch.bfloat16)
    model = load_model(folder, dtype=torch.bfloat16, attn_implementation="eager")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ids = _ids()
    with torch.no_grad():
        ours, theirs = model(ids).logits, ref(ids).logits
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs, atol=1e-2, rtol=0)


# ---- checkpoints -----------------------------------------------------------------------------------------
def test_both_checkpoint_layouts_load_to_the_same_weights(tmp_path):
    per_expert = make_tiny_moe_checkpoint(tmp_path / "hub", seed=11)
    fused = make_tiny_moe_checkpoint(tmp_path / "fused", seed=11, fused=True)
    assert "model.layers.0.mlp.experts.5.up_proj.weight" in _keys(per_expert)
    assert "model.layers.0.mlp.experts.gate_up_proj" in _keys(fused)
    a, b = load_model(per_expert), load_model(fused)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def write_hub_layout(model: Qwen2MoeForCausalLM, folder: Path) -> Path:
    """Our own writer of the per-expert hub keys, independent of ``MoeLayout``: expert e of layer i gets
    ``gate_proj = gate_up_proj[e, :I]``, ``up_proj = gate_up_proj[e, I:]``, ``down_proj = down_proj[e]``."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in model.state_dict().items():
        match = re.fullmatch(r"(.+\.experts)\.(gate_up_proj|down_proj)", name)
        if match is None:
            tensors[name] = tensor.clone()
            continue
        prefix, which = match.groups()
        for e, block in enumerate(tensor):
            if which == "down_proj":
                tensors[f"{prefix}.{e}.down_proj.weight"] = block.clone()
            else:
                gate, up = block.chunk(2)
                tensors[f"{prefix}.{e}.gate_proj.weight"] = gate.clone()
                tensors[f"{prefix}.{e}.up_proj.weight"] = up.clone()
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    model.config.save(folder)
    return folder


def test_a_hand_written_hub_checkpoint_loads(tmp_path):
    source = load_model(make_tiny_moe_checkpoint(tmp_path / "src", seed=12, fused=True))
    folder = write_hub_layout(source, tmp_path / "hub")
    loaded = load_model(folder)
    for (name, p), (_, q) in zip(source.named_parameters(), loaded.named_parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("fused", [False, True])
def test_save_round_trips_and_transformers_reads_it(tmp_path, fused):
    src = make_tiny_moe_checkpoint(tmp_path / "src", seed=13, fused=not fused)
    model = load_model(src)
    out = save_model(model, tmp_path / "out", layout=MoeLayout(fused=True) if fused else None)
    keys = _keys(out)
    assert ("model.layers.0.mlp.experts.gate_up_proj" in keys) == fused
    assert ("model.layers.0.mlp.experts.0.gate_proj.weight" in keys) == (not fused)
    if not fused:  # the default is what save_pretrained writes: the same keys, bit-identical tensors
        hub = make_tiny_moe_checkpoint(tmp_path / "hub", seed=13)  # the same random model, hub layout
        theirs = load_file(hub / "model.safetensors")
        ours = load_file(out / "model.safetensors")
        assert set(ours) == set(theirs)
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    again = load_model(out)
    for (name, p), (_, q) in zip(model.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["model_type"] == "qwen2_moe" and hf_config["architectures"] == ["Qwen2MoeForCausalLM"]
    ref = load_moe_reference(out)
    ids = _ids(seed=4)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)


def test_sharded_hub_checkpoint_loads(tmp_path):
    folder = make_tiny_moe_checkpoint(tmp_path / "sharded", seed=14, max_shard_size="200KB")
    assert len(list(folder.glob("*.safetensors"))) > 2
    ref = load_moe_reference(folder)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(load_model(folder)(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)


def test_config_round_trip_through_transformers():
    hf = tiny_moe_config(mlp_only_layers=[0, 2], decoder_sparse_step=2, norm_topk_prob=True,
                         router_aux_loss_coef=0.02, shared_expert_intermediate_size=0)
    ours = Qwen2MoeConfig.from_hf_config(hf.to_dict())
    assert (ours.mlp_only_layers, ours.decoder_sparse_step, ours.norm_topk_prob) == ([0, 2], 2, True)
    assert ours.router_aux_loss_coef == 0.02 and ours.shared_expert_intermediate_size == 0
    assert ours.sparse_layers == [1]
    back = transformers.Qwen2MoeConfig(**ours.to_hf_config())
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef", "qkv_bias",
                "hidden_size", "num_key_value_heads", "tie_word_embeddings"):
        assert getattr(back, key) == getattr(hf, key), key
    assert Qwen2MoeConfig.from_hf_config(ours.to_hf_config()) == ours


# ---- bad input -----------------------------------------------------------------------------------------
@pytest.fixture()
def hub(tmp_path):
    return make_tiny_moe_checkpoint(tmp_path / "hub", seed=15)


def _edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_weights(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_top_k_larger_than_the_number_of_experts(hub):
    _edit_config(hub, num_experts_per_tok=7)
    with pytest.raises(CorruptCheckpointError, match="num_experts_per_tok=7 must be between 1 and num_experts=6"):
        load_model(hub)


def test_a_checkpoint_missing_an_expert_names_its_keys(hub):
    _edit_weights(hub, lambda sd: [sd.pop(k) for k in list(sd) if ".mlp.experts.3." in k and ".layers.2." in k])
    with pytest.raises(StateDictMismatchError, match=r"missing keys \(3\): model\.layers\.2\.mlp\.experts\.3\."
                                                     r"gate_proj\.weight \(for model\.layers\.2\.mlp\.experts\."
                                                     r"gate_up_proj\)") as info:
        load_model(hub)
    assert "model.layers.2.mlp.experts.3.up_proj.weight (for model.layers.2.mlp.experts.gate_up_proj)" in str(info.value)
    assert "model.layers.2.mlp.experts.3.down_proj.weight (for model.layers.2.mlp.experts.down_proj)" in str(info.value)


def test_a_checkpoint_with_fewer_experts_than_the_config_says(hub):
    _edit_weights(hub, lambda sd: [sd.pop(k) for k in list(sd) if ".mlp.experts.5." in k])
    with pytest.raises(StateDictMismatchError, match=r"config says num_experts=6, the weights number their experts "
                                                     r"0\.\.4"):
        load_model(hub)


def test_a_router_of_the_wrong_shape(hub):
    _edit_weights(hub, lambda sd: sd.update({"model.layers.0.mlp.gate.weight": torch.zeros(5, 64)}))
    with pytest.raises(StateDictMismatchError, match=r"router model\.layers\.0\.mlp\.gate\.weight has 5 rows") as info:
        load_model(hub)
    assert "model.layers.0.mlp.gate.weight: expected [6, 64], found [5, 64]" in str(info.value)


def test_a_fused_expert_tensor_of_the_wrong_shape(tmp_path):
    folder = make_tiny_moe_checkpoint(tmp_path / "fused", seed=16, fused=True)
    _edit_weights(folder, lambda sd: sd.update({"model.layers.1.mlp.experts.down_proj": torch.zeros(5, 64, 24)}))
    with pytest.raises(StateDictMismatchError, match=r"experts\.down_proj holds 5 experts") as info:
        load_model(folder)
    assert "model.layers.1.mlp.experts.down_proj: expected [6, 64, 24], found [5, 64, 24]" in str(info.value)


def test_an_expert_slice_of_the_wrong_width(hub):
    _edit_weights(hub, lambda sd: sd.update({"model.layers.0.mlp.experts.2.up_proj.weight": torch.zeros(20, 64)}))
    with pytest.raises(StateDictMismatchError, match=r"model\.layers\.0\.mlp\.experts\.2\.up_proj\.weight \(for "
                                                     r"model\.layers\.0\.mlp\.experts\.gate_up_proj\): expected "
                                                     r"\[24, 64\], found \[20, 64\]"):
        load_model(hub)


# ---- memory ------------------------------------------------------------------------------------------------
MEASURE = r"""
import json, sys, torch, qwen_edu, qwen_edu.checkpoint, qwen_edu.models.qwen2_moe
def peak():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
before = peak()
model = qwen_edu.load_model(sys.argv[1])
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"delta": peak() - before, "weights": weights}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for peak RSS")
def test_streaming_a_per_expert_checkpoint_peaks_near_the_weights_size(tmp_path):
    """Per-expert keys stream into the fused tensors slice by slice: the peak RSS grows by the weights
    plus the reader's constant overhead -- at most one 64 MiB chunk being copied and one 64 MiB window of
    mapped file pages (the dense loader's figures too) -- never by a second copy of the experts
    (which would add another ~100 MB here)."""
    config = Qwen2MoeConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                            num_attention_heads=4, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=512,
                            shared_expert_intermediate_size=512)
    with torch.device("meta"):
        size = Qwen2MoeForCausalLM(config).num_parameters() * 4
    assert size > 90e6, "big enough that a second copy would show above the noise"
    model = Qwen2MoeForCausalLM(config)
    torch.nn.init.zeros_(model.lm_head.weight)  # content is irrelevant; allocation is what we measure
    save_model(model, tmp_path / "ckpt")
    del model
    assert "model.layers.1.mlp.experts.31.down_proj.weight" in _keys(tmp_path / "ckpt")
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "ckpt")], capture_output=True, text=True,
                         check=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["weights"] == size
    assert result["delta"] < size + 2 * 64 * 2**20 + 24 * 2**20, (result, f"{result['delta'] / size:.2f}x")
    assert math.isfinite(result["delta"])
