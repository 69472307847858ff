"""Qwen3-Next (qwen_edu.models.qwen3_next) against transformers' Qwen3NextForCausalLM, plus the MTP head.

Checkpoints: ``save_pretrained`` of transformers 5.24 writes the hub layout (per-expert expert keys)
but **no** ``mtp.*`` tensors (5.24 has no MTP module, and drops the hub's on load). The test
checkpoints therefore get their MTP weights written in the hub layout by :func:`add_mtp_weights`
(``mtp.fc``, ``mtp.pre_fc_norm_{embedding,hidden}``, ``mtp.layers.0.*`` as a full-attention MoE
decoder layer with per-expert keys, ``mtp.norm``), and transformers must still load the folder.

Tolerance: logits within 1e-4 of HF in fp32. Both run the same chunked delta rule (bit-identical on
equal inputs), but rounding differences of ~1e-7 elsewhere (summation orders in the MoE and
attention) are amplified by the DeltaNet's gated RMSNorm of small read-outs, ~10x per layer on
these random models (measured: up to ~3e-5 on logits of O(5)). Token ids are compared exactly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qwen_edu
from qwen_edu.checkpoint import StateDictMismatchError, save_model, scan_safetensors
from qwen_edu.models.layers import Attention, ZeroCenteredRMSNorm
from qwen_edu.models.qwen3_next import FULL, LINEAR, HybridCache, Qwen3NextConfig, Qwen3NextForCausalLM
from qwen_edu.models.rope import RotaryEmbedding, apply_rotary_pos_emb
from qwen_edu.speculative import mtp_speculative_generate

transformers = pytest.importorskip("transformers")
hf_next = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")

ATOL = 1e-4

TINY: dict = dict(
    vocab_size=96, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=6,
    linear_conv_kernel_dim=4, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=8,
    shared_expert_intermediate_size=12, intermediate_size=40, max_position_embeddings=512,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    mtp_num_hidden_layers=1,
)
CONFIGS = {
    "hybrid-3to1": {},
    "interval2-tied-mha": dict(num_hidden_layers=4, full_attention_interval=2, tie_word_embeddings=True,
                               num_key_value_heads=4, linear_num_value_heads=2, linear_key_head_dim=12),
    "dense-and-sparse-steps": dict(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[5],
                                   num_experts_per_tok=3, rope_parameters={"rope_theta": 1e6,
                                                                           "partial_rotary_factor": 0.5}),
}


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random, norms included: matrices ``N(0, 1/fan_in)``; the zero-centred norms, A_log,
    dt_bias and the router-free vectors ``N(0, 0.2)`` (a gain of ``1 + N(0, 0.2)``); the DeltaNet's plain
    gated-norm weight ``1 + N(0, 0.2)``."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if param.dim() >= 2:
            values = torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[-1])
        elif name.endswith("linear_attn.norm.weight"):
            values = 1.0 + 0.2 * torch.randn(param.shape, generator=gen)
        else:
            values = 0.2 * torch.randn(param.shape, generator=gen)
        param.copy_(values.to(param.dtype))
    return model


def hf_config(**overrides):
    return transformers.Qwen3NextConfig(**{**TINY, **overrides})


def mtp_reference(hf_config_obj, seed: int):
    """A faithful rendering of the released MTP head (vLLM's ``Qwen3NextMultiTokenPredictor``) from
    transformers' own modules: norms, ``fc``, one full-attention ``Qwen3NextDecoderLayer``, final norm."""
    cfg = transformers.Qwen3NextConfig(**{**hf_config_obj.to_dict(), "num_hidden_layers": 1,
                                          "layer_types": [FULL], "mlp_only_layers": []})
    h = cfg.hidden_size
    mtp = torch.nn.ModuleDict(dict(
        pre_fc_norm_embedding=hf_next.Qwen3NextRMSNorm(h, cfg.rms_norm_eps),
        pre_fc_norm_hidden=hf_next.Qwen3NextRMSNorm(h, cfg.rms_norm_eps),
        fc=torch.nn.Linear(2 * h, h, bias=False),
        layers=torch.nn.ModuleList([hf_next.Qwen3NextDecoderLayer(cfg, 0)]),
        norm=hf_next.Qwen3NextRMSNorm(h, cfg.rms_norm_eps),
    ))
    return randomize(mtp, seed + 100).eval(), cfg


def add_mtp_weights(folder: Path, mtp: torch.nn.Module) -> None:
    """Write the ``mtp.*`` tensors into the folder's safetensors file in the hub layout (per-expert keys)."""
    tensors = load_file(folder / "model.safetensors")
    for name, value in mtp.state_dict().items():
        key = f"mtp.{name}"
        if key.endswith("mlp.experts.gate_up_proj"):
            prefix, width = key.removesuffix("gate_up_proj"), value.shape[1] // 2
            for e in range(value.shape[0]):
                tensors[f"{prefix}{e}.gate_proj.weight"] = value[e, :width].clone()
                tensors[f"{prefix}{e}.up_proj.weight"] = value[e, width:].clone()
        elif key.endswith("mlp.experts.down_proj"):
            prefix = key.removesuffix("down_proj")
            for e in range(value.shape[0]):
                tensors[f"{prefix}{e}.down_proj.weight"] = value[e].clone()
        else:
            tensors[key] = value.clone()
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors", metadata={"format": "pt"})


def make_checkpoint(folder: Path, seed: int = 0, with_mtp: bool = True, **overrides):
    """``save_pretrained`` of a randomised HF model (+ MTP weights); returns (folder, HF model, MTP reference)."""
    cfg = hf_config(**overrides, **({} if with_mtp else {"mtp_num_hidden_layers": 0}))
    model = randomize(transformers.Qwen3NextForCausalLM(cfg), seed).eval()
    model.save_pretrained(folder)
    mtp = None
    if with_mtp:
        mtp, _ = mtp_reference(cfg, seed)
        add_mtp_weights(folder, mtp)
    return folder, model, mtp


def _ids(batch=2, length=20, seed=0, vocab=96):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory):
    folder, ref, mtp = make_checkpoint(tmp_path_factory.mktemp(request.param), seed=len(request.param),
                                       **CONFIGS[request.param])
    return folder, ref, mtp, qwen_edu.load_model(folder)


# --- the new pieces, one by one ----------------------------------------------------------------------
def test_zero_centred_norm_matches_transformers_in_bf16():
    theirs = randomize(hf_next.Qwen3NextRMSNorm(32, 1e-6), 1)
    ours = ZeroCenteredRMSNorm(32, 1e-6)
    ours.load_state_dict(theirs.state_dict())
    assert not ZeroCenteredRMSNorm(8).weight.detach().any()  # starts as a gain of exactly 1
    x = torch.randn(3, 5, 32).to(torch.bfloat16)
    assert torch.equal(ours(x), theirs(x))  # same ops in the same order: (x * (1 + w)) in fp32, then cast


def test_partial_rope_tables_and_rotation_match_transformers():
    cfg = hf_config()
    theirs = hf_next.Qwen3NextRotaryEmbedding(cfg)
    ours = RotaryEmbedding(16, 10000.0, partial_rotary_factor=0.25)
    assert ours.rotary_dim == 4 and torch.equal(ours.inv_freq, theirs.inv_freq)
    x, pos = torch.randn(2, 7, 32), torch.arange(7)[None].expand(2, 7)
    cos, sin = ours(x, pos)
    ref_cos, ref_sin = theirs(x, pos)
    assert cos.shape == (2, 7, 4)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    q, k = torch.randn(2, 4, 7, 16), torch.randn(2, 2, 7, 16)
    ours_q, ours_k = apply_rotary_pos_emb(q, k, cos, sin)
    ref_q, ref_k = hf_next.apply_rotary_pos_emb(q, k, ref_cos, ref_sin)
    assert torch.equal(ours_q, ref_q) and torch.equal(ours_k, ref_k)
    assert torch.equal(ours_q[..., 4:], q[..., 4:])  # the other 12 features carry no position


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_gated_attention_matches_transformers(impl):
    cfg = hf_config()
    cfg._attn_implementation = "eager"
    theirs = randomize(hf_next.Qwen3NextAttention(cfg, 3), 2).eval()
    ours = Attention(32, 4, 2, 16, qkv_bias=False, attn_implementation=impl, qk_norm=ZeroCenteredRMSNorm,
                     output_gate=True).eval()
    ours.load_state_dict(theirs.state_dict())  # q_proj [2*H*hd, hidden], q_norm, k_norm: the checkpoint names
    rope = hf_next.Qwen3NextRotaryEmbedding(cfg)
    x, pos = torch.randn(2, 9, 32), torch.arange(9)[None].expand(2, 9)
    cos, sin = rope(x, pos)
    mask = torch.full((9, 9), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        ref, _ = theirs(x, (cos, sin), mask)
        torch.testing.assert_close(ours(x, cos, sin), ref, atol=1e-6, rtol=0)


def test_config_reads_and_writes_the_transformers_dialect():
    hf = hf_config(full_attention_interval=2, mlp_only_layers=[1])
    config = Qwen3NextConfig.from_hf_config(hf.to_dict())
    assert config.layer_types == [LINEAR, FULL, LINEAR, FULL] and config.rotary_dim == 4
    assert (config.rope_theta, config.partial_rotary_factor, config.mtp_num_hidden_layers) == (10000.0, 0.25, 1)
    assert not config.is_sparse_layer(1) and config.is_sparse_layer(2) and not config.qkv_bias
    again = transformers.Qwen3NextConfig(**config.to_hf_config())
    for name in ("layer_types", "rope_parameters", "linear_num_value_heads", "num_experts", "mlp_only_layers"):
        assert getattr(again, name) == getattr(hf, name), name
    legacy = {**hf.to_dict(), "rope_theta": 5e6, "partial_rotary_factor": 0.5}  # hub (4.57) style
    legacy.pop("rope_parameters")
    legacy.pop("layer_types")
    legacy.pop("mtp_num_hidden_layers")
    old = Qwen3NextConfig.from_hf_config(legacy)
    assert (old.rope_theta, old.partial_rotary_factor, old.layer_types, old.mtp_num_hidden_layers) == \
        (5e6, 0.5, [LINEAR, LINEAR, LINEAR, FULL], 1)
    assert Qwen3NextConfig.from_hf_config({**legacy, "num_nextn_predict_layers": 0}).mtp_num_hidden_layers == 0
    with pytest.raises(ValueError, match="layer_types has 3 entries for num_hidden_layers=4"):
        Qwen3NextConfig(num_hidden_layers=4, layer_types=[LINEAR, LINEAR, FULL])
    with pytest.raises(ValueError, match="unknown layer_types"):
        Qwen3NextConfig(num_hidden_layers=1, layer_types=["sliding_attention"])


def test_real_model_shapes_on_meta():
    """The 80B-A3B shapes (hub config; reference §1.1): 80B parameters; about 3B active per token
    without the embedding and the LM head (10 of 512 experts, the shared expert and everything else)."""
    config = Qwen3NextConfig(intermediate_size=5120, max_position_embeddings=262144, rope_theta=1e7,
                             mtp_num_hidden_layers=0)
    with torch.device("meta"):
        model = Qwen3NextForCausalLM(config)
    total = model.num_parameters()
    expert = 3 * config.hidden_size * config.moe_intermediate_size
    routed_off = 48 * (config.num_experts - config.num_experts_per_tok) * expert
    active = model.num_parameters(exclude_embeddings=True) - routed_off
    assert 79e9 < total < 82e9, total
    assert 2.8e9 < active < 3.3e9, active
    assert config.layer_types.count(FULL) == 12


# --- loading and parity -------------------------------------------------------------------------------
def test_checkpoint_layout_and_loading(case):
    folder, _, mtp, model = case
    infos = scan_safetensors(folder)
    assert isinstance(model, Qwen3NextForCausalLM) and model.mtp is not None
    # The MTP layer is "layer 0" for HF's sparsity rule (vLLM builds it the same way).
    mtp_sparse = model.config.is_sparse_layer(0)
    assert any(k.startswith("mtp.layers.0.mlp.experts.0.") for k in infos) == mtp_sparse  # hub layout
    assert any(k.startswith("model.layers.1.mlp.experts.0.") for k in infos)
    assert not any(k.endswith("experts.gate_up_proj") for k in infos)
    stored = load_file(folder / "model.safetensors")
    width = model.config.moe_intermediate_size
    for name, param in model.named_parameters():
        if name.endswith("experts.gate_up_proj"):
            prefix = name.removesuffix("gate_up_proj")
            assert torch.equal(param[1, :width], stored[f"{prefix}1.gate_proj.weight"])
            assert torch.equal(param[1, width:], stored[f"{prefix}1.up_proj.weight"])
        elif name.endswith("experts.down_proj"):
            assert torch.equal(param[-1], stored[f"{name.removesuffix('down_proj')}{param.shape[0] - 1}.down_proj.weight"])
        else:
            assert torch.equal(param, stored[name if name in stored else "model.embed_tokens.weight"]), name
    # transformers reads the same folder and (silently) ignores the MTP tensors.
    transformers.Qwen3NextForCausalLM.from_pretrained(folder)


def test_fp32_logits_match_transformers(case):
    _, ref, _, model = case
    ids = _ids(length=90)  # > one 64-token chunk
    with torch.no_grad():
        ours, theirs = model(ids).logits, ref(ids).logits
    assert ours.shape == (2, 90, 96)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_greedy_generation_matches_transformers(case):
    _, ref, _, model = case
    ids = _ids(length=7, seed=1)
    ours = qwen_edu.generate(model, ids, max_new_tokens=40)
    theirs = ref.generate(ids, max_new_tokens=40, do_sample=False)
    assert torch.equal(ours, theirs)


def test_cached_decoding_equals_full_recomputation(case):
    *_, model = case
    ids = _ids(length=80, seed=2)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.model.new_cache()
        steps = [model(ids[:, :70], cache=cache).logits]
        steps += [model(ids[:, t:t + 1], cache=cache).logits for t in range(70, 80)]
    assert isinstance(cache, HybridCache) and cache.get_seq_length() == 80
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)


def test_left_padded_batch_decodes_like_single_rows(case):
    *_, model = case
    short, long_ = _ids(1, 5, seed=3), _ids(1, 9, seed=4)
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long_])
    mask = torch.cat([torch.cat([torch.zeros(1, 4), torch.ones(1, 5)], 1), torch.ones(1, 9)]).long()
    out = qwen_edu.generate(model, batch, mask, max_new_tokens=12)
    assert torch.equal(out[0, 4:], qwen_edu.generate(model, short, max_new_tokens=12)[0])
    assert torch.equal(out[1], qwen_edu.generate(model, long_, max_new_tokens=12)[0])


def test_router_aux_loss_matches_transformers(case):
    _, ref, _, model = case
    if not model.sparse_blocks():
        pytest.skip("no MoE layer")
    ids = _ids(length=30, seed=5)
    with torch.no_grad():
        ours = model(ids, labels=ids, output_router_logits=True)
        theirs = ref(ids, labels=ids, output_router_logits=True)
    assert len(ours.router_logits) == len(theirs.router_logits)
    torch.testing.assert_close(ours.aux_loss, theirs.aux_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=0)


def test_bf16_logits_close_to_transformers(case):
    folder, *_ = case
    ours = qwen_edu.load_model(folder, dtype=torch.bfloat16)
    theirs = transformers.Qwen3NextForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ids = _ids(length=40, seed=6)
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert a.dtype == torch.bfloat16
    # Same bf16 ops up to summation orders (MoE, attention), on logits of O(5): a few bf16 ulps.
    torch.testing.assert_close(a.float(), b.float(), atol=0.15, rtol=0)


# --- the MTP head ------------------------------------------------------------------------------------
def test_mtp_head_matches_reference_rendering(case):
    _, ref, mtp, model = case
    ids = _ids(1, 30, seed=7)
    with torch.no_grad():
        main = model(ids)
        hidden, next_ids = main.last_hidden_state[:, :-1], ids[:, 1:]  # (h_t, x_{t+1}) -> x_{t+2}
        ours = model.mtp_logits(hidden, next_ids)
        # Reference: vLLM's order, with transformers' modules and the HF main model's hidden states.
        ref_hidden = ref.model(ids).last_hidden_state[:, :-1]
        x = mtp["fc"](torch.cat([mtp["pre_fc_norm_embedding"](ref.model.embed_tokens(next_ids)),
                                 mtp["pre_fc_norm_hidden"](ref_hidden)], dim=-1))
        positions = torch.arange(29)[None]
        rope = hf_next.Qwen3NextRotaryEmbedding(ref.config)
        mask = torch.full((29, 29), float("-inf")).triu(1)[None, None]
        x = mtp["layers"][0](x, position_embeddings=rope(x, positions), attention_mask=mask, position_ids=positions)
        theirs = ref.lm_head(mtp["norm"](x))
    assert ours.shape == (1, 29, 96)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    with torch.no_grad():  # with its own KV cache, token by token, the head gives the same logits
        cache = qwen_edu.models.layers.KVCache(1)
        steps = [model.mtp_logits(hidden[:, :20], next_ids[:, :20], cache)]
        steps += [model.mtp_logits(hidden[:, t:t + 1], next_ids[:, t:t + 1], cache) for t in range(20, 29)]
    torch.testing.assert_close(torch.cat(steps, dim=1), ours, atol=ATOL, rtol=0)


@pytest.mark.parametrize("num_draft", [1, 3])
def test_speculative_decoding_is_lossless(tmp_path, num_draft):
    # A 4-token vocabulary makes random drafts right about a quarter of the time: both the accept and
    # the reject (rollback) paths run many times.
    folder, *_ = make_checkpoint(tmp_path, seed=11, vocab_size=4)
    model = qwen_edu.load_model(folder)
    prompt = _ids(1, 12, seed=8, vocab=4)
    plain = qwen_edu.generate(model, prompt, max_new_tokens=60)
    result = mtp_speculative_generate(model, prompt, max_new_tokens=60, num_draft=num_draft)
    assert torch.equal(result.tokens, plain)
    assert 0 < result.accepted < result.drafted == num_draft * result.rounds
    assert result.new_tokens == 60 and result.tokens_per_round == 59 / result.rounds
    assert 0 in result.accepted_per_round and max(result.accepted_per_round) >= 1


def test_speculative_decoding_stops_at_eos(case):
    *_, model = case
    prompt = _ids(1, 6, seed=9)
    plain = qwen_edu.generate(model, prompt, max_new_tokens=30)
    eos = int(plain[0, 6 + 10])  # the 11th new token
    stopped = qwen_edu.generate(model, prompt, max_new_tokens=30, eos_token_id=eos)
    spec = mtp_speculative_generate(model, prompt, max_new_tokens=30, num_draft=2, eos_token_id=eos)
    assert torch.equal(spec.tokens, stopped[:, :spec.tokens.shape[1]]) and int(spec.tokens[0, -1]) == eos
    with pytest.raises(ValueError, match=r"one prompt \[1, L\]"):
        mtp_speculative_generate(model, _ids(2, 5), 4)


# --- the cache and the checkpoint round trip ----------------------------------------------------------
def test_hybrid_cache_memory(case):
    *_, model = case
    sizes = {}
    for length in (16, 64, 256):
        cache = model.model.new_cache()
        with torch.no_grad():
            model(_ids(1, length, seed=10), cache=cache)
        linear = sum(s.nbytes() for s in cache.linear_states if s is not None)
        sizes[length] = (linear, cache.nbytes() - linear)
    assert sizes[16][0] == sizes[64][0] == sizes[256][0] > 0           # DeltaNet states: constant
    assert sizes[256][1] == 4 * sizes[64][1] == 16 * sizes[16][1] > 0  # KV rows: linear in length


def test_save_model_round_trip_writes_the_hub_layout(case, tmp_path):
    *_, model = case
    save_model(model, tmp_path)
    keys = set(scan_safetensors(tmp_path))
    assert "mtp.fc.weight" in keys and "model.layers.1.mlp.experts.0.gate_proj.weight" in keys
    assert ("mtp.layers.0.mlp.experts.0.gate_proj.weight" in keys) == model.config.is_sparse_layer(0)
    again = qwen_edu.load_model(tmp_path)
    for (name, a), (_, b) in zip(model.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qwen3_next"


def test_checkpoint_without_mtp_weights(tmp_path):
    folder, ref, _ = make_checkpoint(tmp_path, seed=12, with_mtp=False)
    model = qwen_edu.load_model(folder)  # config says mtp_num_hidden_layers=0
    assert model.mtp is None
    config = json.loads((folder / "config.json").read_text())
    config.pop("mtp_num_hidden_layers")  # like the hub configs, which do not say
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(StateDictMismatchError, match='set "mtp_num_hidden_layers": 0'):
        qwen_edu.load_model(folder)
