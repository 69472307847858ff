"""Named configs: tiny ones that run on a CPU in milliseconds, and the published Qwen dense sizes.

The published shapes let a reader count parameters on the ``meta`` device (no memory is allocated)::

    with torch.device("meta"):
        model = Qwen2ForCausalLM(preset("Qwen2-0.5B"))
    model.num_parameters()  # 494_032_768

Every published preset records where its numbers come from (``Preset.source``) and how far they
were checked (``Preset.status``):

- ``exact_params`` is a *published exact* total: the ``total_size`` of the checkpoint's
  ``model.safetensors.index.json`` divided by 2 (bf16 weights, 2 bytes each; a tied head is stored
  once), or the reference notes' exact arithmetic. The tests require the count to equal it.
- ``published_params`` is the rounded figure a model card or report prints, in billions. Without an
  exact figure the tests require the count to round to it; with one, only to lie within 1 % (the
  Qwen2.5 cards truncate -- 7.61B for 7,615,616,512 -- and the 32B card prints 32.5B for a checkpoint
  of 32,763,876,352 parameters).
- ``status``: ``"checked"`` (an exact figure matches), ``"rounded"`` (a published rounded figure
  matches, no exact one was found), ``"unverified"`` (shapes from copies of hub configs and the
  reports' tables; no published count was found to test against), ``"tiny"`` (the book's own).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qwen_edu.models.config import QwenConfig

__all__ = ["Preset", "PRESETS", "preset", "list_presets", "dense_presets"]


@dataclass(frozen=True)
class Preset:
    name: str
    values: dict[str, Any]
    published_params: float | None = None  # billions, as printed on the model card / in the report
    exact_params: int | None = None  # a published exact total (safetensors index), see the module docstring
    status: str = "unverified"  # "checked" | "rounded" | "unverified" | "tiny"
    source: str = ""  # where the shape and the figures come from
    published_activated: float | None = None  # MoE: activated parameters per token, billions, as published
    published_non_embedding: float | None = None  # billions, where the card prints it (Qwen3)


_V = 151936  # vocabulary rows of the small models
_V_BIG = 152064  # 7B+ Qwen2 / 14B+ Qwen(1.5) models pad the vocabulary further

_QWEN1 = dict(model_type="qwen", rope_theta=10000.0, rms_norm_eps=1e-6, seq_length=8192, use_dynamic_ntk=True,
              use_logn_attn=True, rope_in_fp32=True, max_position_embeddings=32768, tie_word_embeddings=False)
_QWEN15 = dict(model_type="qwen2", rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768)
_QWEN2 = dict(model_type="qwen2", rope_theta=1e6, rms_norm_eps=1e-6)

# Sources, referred to by the presets below.
_REF = "reference notes (qwen_architectures.md §3.2, §5.1; config copies checked by parameter arithmetic)"
_Q15_CFG = "Qwen1.5 hub config.json shapes (third-party copies; the Qwen1.5 blog gives sizes, not counts)"
_Q15_7B_INDEX = ("Qwen1.5-7B model.safetensors.index.json total_size 15,442,649,088 B (the hub file, copied "
                 "into transformers' examples/pytorch/torchacc/qwen/Qwen1.5-7B)")
_Q2_TABLE = "Qwen2 report, Table 1 (hidden size, layers, q/kv heads, intermediate size, tying); no counts printed"
_Q25_CARD = "Qwen2.5 model card ('Number of Parameters')"
_Q25_INDEX = "Qwen2.5 model.safetensors.index.json total_size, as quoted by third-party copies of the hub file"
_QWEN3 = dict(model_type="qwen3", rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=40960, head_dim=128)
_Q3_SRC = ("Qwen3 report, Tables 1-2 (layers, q/kv heads, tying, experts); hidden/intermediate widths and "
           "head_dim 128 from copies of the hub config.json; Qwen3 model card ('Number of Parameters', total "
           "and non-embedding), which the shapes reproduce")


def _p(name: str, base: dict[str, Any], published: float | None, status: str = "unverified",
       exact: int | None = None, source: str = "", **values: Any) -> Preset:
    return Preset(name, {**base, **values}, published, exact, status, source)


def _q3(name: str, published: float, non_embedding: float, status: str = "rounded", exact: int | None = None, *,
        h: int, i: int, n: int, heads: int, tied: bool = False) -> Preset:
    """A Qwen3 dense size: 8 KV heads of 128 features in every size, per the report's table."""
    source = _Q3_SRC + ("; exact total: reference notes §6 (Qwen3-0.6B config checked by arithmetic)" if exact else "")
    return Preset(name, {**_QWEN3, **_shape(h, i, n, heads, 8, tied=tied)}, published, exact, status, source,
                  published_non_embedding=non_embedding)


def _shape(h: int, i: int, n: int, heads: int, kv: int | None = None, vocab: int = _V, tied: bool = False,
           **more: Any) -> dict[str, Any]:
    return dict(hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=heads,
                num_key_value_heads=kv if kv is not None else heads, vocab_size=vocab, tie_word_embeddings=tied, **more)


_ALL = [
    # --- tiny, for tests and CPU notebooks ---------------------------------------------------------
    Preset("tiny", dict(model_type="qwen2", rope_theta=10000.0, max_position_embeddings=2048,
                        **_shape(64, 128, 2, 4, 2, vocab=512, tied=True)), status="tiny"),
    Preset("tiny-mha", dict(model_type="qwen2", rope_theta=10000.0, max_position_embeddings=2048,
                            **_shape(64, 128, 2, 4, 4, vocab=512)), status="tiny"),
    Preset("tiny-qwen1", dict(_QWEN1, seq_length=256, **_shape(64, 128, 2, 4, vocab=512)), status="tiny"),
    Preset("small", dict(model_type="qwen2", rope_theta=1e6, max_position_embeddings=4096,
                         **_shape(256, 704, 4, 8, 2, vocab=4096, tied=True)), status="tiny"),
    # --- Qwen-1 (model_type "qwen"; intermediate_size here is the per-branch width) ------------------
    _p("Qwen-1.8B", _QWEN1, 1.837, "rounded", source=f"{_REF}: untied total 1.837B; rope/NTK/logN flags unverified",
       **_shape(2048, 5504, 24, 16)),
    _p("Qwen-7B", _QWEN1, 7.72, "checked", exact=7_721_324_544,
       source=f"{_REF}: config and model.safetensors.index.json read (total_size 15,442,649,088 B); 7.72B card",
       **_shape(4096, 11008, 32, 32)),
    _p("Qwen-14B", _QWEN1, 14.2, source="shape and 14.2B from memory of the hub config and card",
       **_shape(5120, 13696, 40, 40, vocab=_V_BIG)),
    _p("Qwen-72B", _QWEN1, 72.3, source="shape and 72.3B from memory of the hub config and card",
       **_shape(8192, 24576, 80, 64, vocab=_V_BIG)),
    # --- Qwen1.5 (model_type "qwen2", MHA except 32B/110B, 32K context) ------------------------------
    # 0.5B: tied embeddings as in Qwen2-0.5B (not read from its config here).
    _p("Qwen1.5-0.5B", _QWEN15, None, source=_Q15_CFG, **_shape(1024, 2816, 24, 16, tied=True)),
    _p("Qwen1.5-1.8B", _QWEN15, None, source=_Q15_CFG, **_shape(2048, 5504, 24, 16)),
    _p("Qwen1.5-4B", _QWEN15, None, source=_Q15_CFG, rope_theta=5e6, **_shape(2560, 6912, 40, 20)),
    _p("Qwen1.5-7B", _QWEN15, None, "checked", exact=7_721_324_544, source=_Q15_7B_INDEX,
       **_shape(4096, 11008, 32, 32)),
    _p("Qwen1.5-14B", _QWEN15, None, source=_Q15_CFG, **_shape(5120, 13696, 40, 40, vocab=_V_BIG)),
    _p("Qwen1.5-32B", _QWEN15, None, source=_Q15_CFG, **_shape(5120, 27392, 64, 40, 8, vocab=_V_BIG)),
    _p("Qwen1.5-72B", _QWEN15, None, source=_Q15_CFG, **_shape(8192, 24576, 80, 64, vocab=_V_BIG)),
    _p("Qwen1.5-110B", _QWEN15, None, source=_Q15_CFG, **_shape(8192, 49152, 80, 64, 8, vocab=_V_BIG)),
    # --- Qwen2 (GQA in every size; base configs allow 128K positions) ----------------------------------
    _p("Qwen2-0.5B", _QWEN2, None, "checked", exact=494_032_768, source=f"{_REF}; {_Q2_TABLE}",
       max_position_embeddings=131072, **_shape(896, 4864, 24, 14, 2, tied=True)),
    _p("Qwen2-1.5B", _QWEN2, None, source=_Q2_TABLE, max_position_embeddings=131072,
       **_shape(1536, 8960, 28, 12, 2, tied=True)),
    _p("Qwen2-7B", _QWEN2, None, source=_Q2_TABLE, max_position_embeddings=131072,
       **_shape(3584, 18944, 28, 28, 4, vocab=_V_BIG)),
    _p("Qwen2-72B", _QWEN2, None, source=_Q2_TABLE, max_position_embeddings=131072,
       **_shape(8192, 29568, 80, 64, 8, vocab=_V_BIG)),
    # --- Qwen2.5 (the Qwen2 code and shapes; new 3B, 14B, 32B; 32K configs) ------------------------------
    _p("Qwen2.5-0.5B", _QWEN2, 0.49, "checked", exact=494_032_768, source=f"{_REF}; {_Q25_CARD}",
       max_position_embeddings=32768, **_shape(896, 4864, 24, 14, 2, tied=True)),
    _p("Qwen2.5-1.5B", _QWEN2, 1.54, "rounded", source=_Q25_CARD, max_position_embeddings=32768,
       **_shape(1536, 8960, 28, 12, 2, tied=True)),
    _p("Qwen2.5-3B", _QWEN2, 3.09, "checked", exact=3_085_938_688, source=f"{_Q25_INDEX} (6,171,877,376 B); {_Q25_CARD}",
       max_position_embeddings=32768, **_shape(2048, 11008, 36, 16, 2, tied=True)),
    _p("Qwen2.5-7B", _QWEN2, 7.61, "checked", exact=7_615_616_512,
       source=f"{_Q25_INDEX} (15,231,233,024 B); {_Q25_CARD}", max_position_embeddings=32768,
       **_shape(3584, 18944, 28, 28, 4, vocab=_V_BIG)),
    _p("Qwen2.5-14B", _QWEN2, 14.7, "checked", exact=14_770_033_664,
       source=f"{_Q25_INDEX} (29,540,067,328 B); {_Q25_CARD}", max_position_embeddings=32768,
       **_shape(5120, 13824, 48, 40, 8, vocab=_V_BIG)),
    _p("Qwen2.5-32B", _QWEN2, 32.5, "checked", exact=32_763_876_352,
       source=f"{_Q25_INDEX} (65,527,752,704 B); {_Q25_CARD}, which prints 32.5B", max_position_embeddings=32768,
       **_shape(5120, 27648, 64, 40, 8, vocab=_V_BIG)),
    _p("Qwen2.5-72B", _QWEN2, 72.7, "checked", exact=72_706_203_648,
       source=f"{_Q25_INDEX} (145,412,407,296 B); {_Q25_CARD}", max_position_embeddings=32768,
       **_shape(8192, 29568, 80, 64, 8, vocab=_V_BIG)),
    # --- Qwen3 dense (QK-norm, no bias, head_dim 128; 32K native context, 40,960 positions) ------------
    _q3("Qwen3-0.6B", 0.6, 0.44, "checked", 596_049_920, h=1024, i=3072, n=28, heads=16, tied=True),
    _q3("Qwen3-1.7B", 1.7, 1.4, h=2048, i=6144, n=28, heads=16, tied=True),
    _q3("Qwen3-4B", 4.0, 3.6, h=2560, i=9728, n=36, heads=32, tied=True),
    _q3("Qwen3-8B", 8.2, 6.95, h=4096, i=12288, n=36, heads=32),
    _q3("Qwen3-14B", 14.8, 13.2, h=5120, i=17408, n=40, heads=40),
    _q3("Qwen3-32B", 32.8, 31.2, h=5120, i=25600, n=64, heads=64),
    # --- MoE presets follow (chapter 8) ----------------------------------------------------------------
    # model_type "qwen2_moe": preset() returns a Qwen2MoeConfig. published_activated is the "A" figure.
    Preset("Qwen1.5-MoE-A2.7B", dict(
        _QWEN15, model_type="qwen2_moe", max_position_embeddings=8192, **_shape(2048, 5632, 24, 16),
        num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
        norm_topk_prob=False, decoder_sparse_step=1), published_params=14.3, exact_params=14_315_784_192,
        status="checked", published_activated=2.7,
        source=f"{_REF} §4.2 (Chat-GPTQ config copy; 14,315,784,192 by arithmetic); base config copy for "
               "max_position_embeddings 8192; Qwen1.5-MoE blog: 14.3B total, 2.7B activated"),
    Preset("Qwen2-57B-A14B", dict(
        _QWEN2, model_type="qwen2_moe", max_position_embeddings=131072, **_shape(3584, 18944, 28, 28, 4),
        num_experts=64, num_experts_per_tok=8, moe_intermediate_size=2560, shared_expert_intermediate_size=20480,
        norm_topk_prob=False, decoder_sparse_step=1), published_params=57.0, status="rounded",
        published_activated=14.0,
        source="hub config.json (a third-party copy in TensorRT-LLM's tests); Qwen2 report: 57B total, "
               "14B activated, 64 routed experts (8 activated) plus 8 experts' worth of shared expert"),
    # Qwen3-MoE: 128 routed experts, 8 per token, renormalised, no shared expert (chapter 11).
    Preset("Qwen3-30B-A3B", dict(
        _QWEN3, model_type="qwen3_moe", **_shape(2048, 6144, 48, 32, 4), num_experts=128, num_experts_per_tok=8,
        moe_intermediate_size=768, norm_topk_prob=True, decoder_sparse_step=1), published_params=30.5,
        published_activated=3.3, published_non_embedding=29.9, status="rounded", source=_Q3_SRC),
    Preset("Qwen3-235B-A22B", dict(
        _QWEN3, model_type="qwen3_moe", **_shape(4096, 12288, 94, 64, 4), num_experts=128, num_experts_per_tok=8,
        moe_intermediate_size=1536, norm_topk_prob=True, decoder_sparse_step=1), published_params=235,
        published_activated=22, published_non_embedding=234, status="rounded", source=_Q3_SRC),
]

PRESETS: dict[str, Preset] = {p.name: p for p in _ALL}


def list_presets() -> list[str]:
    return list(PRESETS)


def dense_presets(family: str) -> list[str]:
    """Names of the published dense presets of one generation: ``"Qwen"``, ``"Qwen1.5"``, ``"Qwen2"``,
    ``"Qwen2.5"``, ``"Qwen3"`` (in size order, as listed)."""
    prefix = f"{family}-"
    names = [n for n, p in PRESETS.items() if n.startswith(prefix) and p.status != "tiny"
             and p.values.get("model_type") in ("qwen", "qwen2", "qwen3") and n[len(prefix):][:1].isdigit()]
    if not names:
        raise KeyError(f"no dense presets for {family!r}; families: Qwen, Qwen1.5, Qwen2, Qwen2.5, Qwen3")
    return names


def preset(name: str, **overrides: Any) -> QwenConfig:
    """A fresh :class:`QwenConfig` for a named preset (case-insensitive), with optional overrides."""
    key = {n.lower(): n for n in PRESETS}.get(name.lower())
    if key is None:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    values = {**PRESETS[key].values, **overrides}
    if values.get("model_type") == "qwen2_moe":
        from qwen_edu.models.qwen2_moe import Qwen2MoeConfig

        return Qwen2MoeConfig(**values)
    if values.get("model_type") == "qwen3":
        from qwen_edu.models.qwen3 import Qwen3Config

        return Qwen3Config(**values)
    if values.get("model_type") == "qwen3_moe":
        from qwen_edu.models.qwen3_moe import Qwen3MoeConfig

        return Qwen3MoeConfig(**values)
    return QwenConfig(**values)
