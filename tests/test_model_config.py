"""Config dialects (Qwen2 4.x/5.x and Qwen-1), round trips, presets and parameter counts on meta."""

from __future__ import annotations

import pytest
import torch
import transformers

from qwen_edu.models import Qwen2ForCausalLM, QwenConfig
from qwen_edu.models.presets import PRESETS, preset
from tests._checkpoints import tiny_qwen2_config

QWEN2_05B_V4 = {  # Qwen2-0.5B config.json as transformers 4.x wrote it (reference §3.2)
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
    "intermediate_size": 4864, "max_position_embeddings": 131072, "max_window_layers": 24,
    "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}
QWEN_7B = {  # Qwen-7B (remote code) config.json fields, reference §5.1
    "architectures": ["QWenLMHeadModel"], "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig"},
    "attn_dropout_prob": 0.0, "bf16": False, "emb_dropout_prob": 0.0, "fp16": False, "fp32": False,
    "hidden_size": 4096, "intermediate_size": 22016, "initializer_range": 0.02, "kv_channels": 128,
    "layer_norm_epsilon": 1e-06, "max_position_embeddings": 32768, "model_type": "qwen", "no_bias": True,
    "num_attention_heads": 32, "num_hidden_layers": 32, "rotary_emb_base": 10000, "rotary_pct": 1.0,
    "scale_attn_weights": True, "seq_length": 8192, "tie_word_embeddings": False, "use_cache": True,
    "use_dynamic_ntk": True, "use_flash_attn": "auto", "use_logn_attn": True, "vocab_size": 151936,
}


def test_reads_transformers_4_config():
    c = QwenConfig.from_hf_config(QWEN2_05B_V4)
    assert (c.hidden_size, c.num_key_value_heads, c.head_dim, c.rope_theta) == (896, 2, 64, 1e6)
    assert c.tie_word_embeddings and c.torch_dtype == "bfloat16" and c.eos_token_ids == [151643]
    assert c.extra["transformers_version"] == "4.40.1"


def test_reads_transformers_5_config_with_rope_parameters():
    hf = tiny_qwen2_config(rope_parameters={"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0,
                                            "original_max_position_embeddings": 128})
    c = QwenConfig.from_hf_config(hf)
    assert c.rope_theta == 5e5 and c.rope_scaling["rope_type"] == "yarn" and c.rope_scaling["factor"] == 4.0
    legacy = QwenConfig.from_hf_config({**QWEN2_05B_V4, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert legacy.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_reads_qwen1_config():
    c = QwenConfig.from_hf_config(QWEN_7B)
    assert c.model_type == "qwen" and c.intermediate_size == 11008  # half of the Qwen-1 value
    assert (c.head_dim, c.rms_norm_eps, c.rope_theta, c.seq_length) == (128, 1e-6, 10000.0, 8192)
    assert c.use_dynamic_ntk and c.use_logn_attn and c.rope_in_fp32
    assert (c.qkv_bias, c.o_bias, c.mlp_bias) == (True, False, False)
    old = QwenConfig.from_hf_config({"model_type": "qwen", "n_embd": 64, "n_head": 4, "n_layer": 2,
                                     "ffn_hidden_size": 256, "vocab_size": 100, "no_bias": False})
    assert (old.hidden_size, old.intermediate_size, old.o_bias, old.mlp_bias) == (64, 128, True, True)


@pytest.mark.parametrize("source", [QWEN2_05B_V4, QWEN_7B])
def test_hf_round_trip(source):
    c = QwenConfig.from_hf_config(source)
    again = QwenConfig.from_hf_config(c.to_hf_config())
    assert again == c
    hf = c.to_hf_config()
    for key, value in source.items():
        if key not in ("rotary_emb_base",):
            assert hf[key] == value, key


def test_to_hf_config_is_accepted_by_transformers():
    c = preset("Qwen2-0.5B")
    hf = transformers.Qwen2Config(**c.to_hf_config())
    back = QwenConfig.from_hf_config(hf.to_dict())
    assert back.max_window_layers == 28  # transformers fills in its class default; nothing else changes
    assert back.replace(extra={}, max_window_layers=None) == c.replace(extra={})


def test_invalid_configs_are_rejected():
    with pytest.raises(ValueError, match="multiple of"):
        QwenConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="attn_implementation"):
        QwenConfig(attn_implementation="flash")


DENSE = [n for n, p in PRESETS.items() if p.status != "tiny" and p.values.get("model_type") in ("qwen", "qwen2")]


@pytest.mark.parametrize("name", DENSE)
def test_published_parameter_counts(name):
    """Exact where a published exact total exists (safetensors index); else the printed rounding."""
    p = PRESETS[name]
    assert p.source, f"{name} states no provenance"
    with torch.device("meta"):
        model = Qwen2ForCausalLM(preset(name))
    count = model.num_parameters()
    if p.exact_params is not None:
        assert p.status == "checked"
        assert count == p.exact_params
        if p.published_params is not None:  # cards truncate (7.61B) or misprint (32.5B): within 1 %
            assert abs(count / 1e9 - p.published_params) / p.published_params < 0.01, count
    elif p.published_params is not None:
        decimals = len(repr(p.published_params).split(".")[1])
        assert round(count / 1e9, decimals) == p.published_params, count
    else:
        assert p.status == "unverified"


def test_every_qwen15_qwen2_qwen25_size_is_there():
    from qwen_edu.models.presets import dense_presets

    assert [n.split("-")[1] for n in dense_presets("Qwen1.5")] == ["0.5B", "1.8B", "4B", "7B", "14B", "32B", "72B",
                                                                  "110B"]
    assert [n.split("-")[1] for n in dense_presets("Qwen2")] == ["0.5B", "1.5B", "7B", "72B"]
    assert [n.split("-")[1] for n in dense_presets("Qwen2.5")] == ["0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B"]
    # Qwen1.5 is MHA except 32B and 110B; every Qwen2 and Qwen2.5 size uses GQA; small ones tie embeddings.
    gqa15 = [n for n in dense_presets("Qwen1.5") if preset(n).num_kv_groups > 1]
    assert gqa15 == ["Qwen1.5-32B", "Qwen1.5-110B"]
    assert all(preset(n).num_kv_groups > 1 for n in dense_presets("Qwen2") + dense_presets("Qwen2.5"))
    assert [n for n in dense_presets("Qwen2") if preset(n).tie_word_embeddings] == ["Qwen2-0.5B", "Qwen2-1.5B"]
    assert all(preset(n).rope_theta == 1e6 for n in dense_presets("Qwen2"))
    with pytest.raises(KeyError, match="no dense presets for 'Qwen9'"):
        dense_presets("Qwen9")


def test_reference_counts():
    """The two figures the reference checked by arithmetic (§3.2, §5.1)."""
    with torch.device("meta"):
        q2 = Qwen2ForCausalLM(preset("Qwen2-0.5B"))
        q1 = Qwen2ForCausalLM(preset("Qwen-1.8B"))
    assert q2.num_parameters() == 494_032_768
    assert q2.num_parameters(exclude_embeddings=True) == 357_898_112
    assert round(q1.num_parameters() / 1e9, 3) == 1.837


def test_tiny_presets_run():
    for name in ("tiny", "tiny-mha", "tiny-qwen1", "small"):
        model = Qwen2ForCausalLM(preset(name))
        with torch.no_grad():
            assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, model.config.vocab_size)


def test_kv_cache_of_the_qwen2_family():
    """The calculator's KV bytes per token are 2 x layers x kv_heads x head_dim x 2 bytes (bf16), and GQA
    divides MHA's by the group size; a 128K-token sequence of Qwen2-72B needs ~43 GB of cache."""
    from qwen_edu.models.costs import kv_cache_bytes_per_token, memory_estimate

    q7, q72 = preset("Qwen2-7B"), preset("Qwen2-72B")
    assert kv_cache_bytes_per_token(q7) == 2 * 28 * 4 * 128 * 2 == 57_344
    mha = q72.replace(num_key_value_heads=q72.num_attention_heads)
    assert kv_cache_bytes_per_token(mha) == 8 * kv_cache_bytes_per_token(q72)
    estimate = memory_estimate(q72, 131_072)
    assert estimate.kv_cache == 131_072 * 2 * 80 * 8 * 128 * 2
    assert round(estimate.kv_cache / 1e9) == 43 and estimate.weights == 2 * 72_706_203_648
