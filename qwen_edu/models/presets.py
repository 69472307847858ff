"""Named configs: tiny ones that run on a CPU in milliseconds, and the published Qwen dense sizes.

The published shapes let a reader count parameters on the ``meta`` device (no memory is allocated)::

    with torch.device("meta"):
        model = Qwen2ForCausalLM(preset("Qwen2-0.5B"))
    model.num_parameters()  # 494_032_768

Provenance of each shape (see the reference's §3.2, §5.1 and §14): ``checked`` means its parameter
count was verified against a published figure (safetensors total or the reference's arithmetic);
``unverified`` means the values come from memory of the hub configs and agree with the published
"NB" figure but were not read from a config file here. ``published_params`` is the model card's
rounded figure in billions, used by the tests with a 1% tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qwen_edu.models.config import QwenConfig

__all__ = ["Preset", "PRESETS", "preset", "list_presets"]


@dataclass(frozen=True)
class Preset:
    name: str
    values: dict[str, Any]
    published_params: float | None = None  # billions, as published (model card / report)
    exact_params: int | None = None  # exact count where one is known
    status: str = "unverified"  # "checked" | "unverified" | "tiny"


_V = 151936  # vocabulary rows of the small models
_V_BIG = 152064  # 7B+ Qwen2 / 14B+ Qwen(1.5) models pad the vocabulary further

_QWEN1 = dict(model_type="qwen", rope_theta=10000.0, rms_norm_eps=1e-6, seq_length=8192, use_dynamic_ntk=True,
              use_logn_attn=True, rope_in_fp32=True, max_position_embeddings=32768, tie_word_embeddings=False)
_QWEN15 = dict(model_type="qwen2", rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768)
_QWEN2 = dict(model_type="qwen2", rope_theta=1e6, rms_norm_eps=1e-6)


def _p(name: str, base: dict[str, Any], published: float | None, status: str = "unverified",
       exact: int | None = None, **values: Any) -> Preset:
    return Preset(name, {**base, **values}, published, exact, status)


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
    # Qwen-1.8B: reference §5.1 (checked: untied total 1.837B); rope/NTK/logN flags unverified.
    _p("Qwen-1.8B", _QWEN1, 1.837, "checked", **_shape(2048, 5504, 24, 16)),
    # Qwen-7B: config read in the reference (§5.1); 7.72B on the model card.
    _p("Qwen-7B", _QWEN1, 7.72, "checked", **_shape(4096, 11008, 32, 32)),
    _p("Qwen-14B", _QWEN1, 14.2, **_shape(5120, 13696, 40, 40, vocab=_V_BIG)),
    _p("Qwen-72B", _QWEN1, 72.3, **_shape(8192, 24576, 80, 64, vocab=_V_BIG)),
    # --- Qwen1.5 (model_type "qwen2", MHA except 32B/110B) ------------------------------------------
    # 0.5B: tie_word_embeddings unverified (0.46B tied; 0.62B would count a stored lm_head as well).
    _p("Qwen1.5-0.5B", _QWEN15, None, **_shape(1024, 2816, 24, 16, tied=True)),
    _p("Qwen1.5-1.8B", _QWEN15, 1.84, **_shape(2048, 5504, 24, 16)),
    _p("Qwen1.5-4B", _QWEN15, 3.95, rope_theta=5e6, **_shape(2560, 6912, 40, 20)),
    _p("Qwen1.5-7B", _QWEN15, 7.72, **_shape(4096, 11008, 32, 32)),
    _p("Qwen1.5-14B", _QWEN15, 14.2, **_shape(5120, 13696, 40, 40, vocab=_V_BIG)),
    _p("Qwen1.5-32B", _QWEN15, 32.5, **_shape(5120, 27392, 64, 40, 8, vocab=_V_BIG)),
    _p("Qwen1.5-72B", _QWEN15, 72.3, **_shape(8192, 24576, 80, 64, vocab=_V_BIG)),
    _p("Qwen1.5-110B", _QWEN15, 111.0, **_shape(8192, 49152, 80, 64, 8, vocab=_V_BIG)),
    # --- Qwen2 ---------------------------------------------------------------------------------------
    _p("Qwen2-0.5B", _QWEN2, 0.49, "checked", exact=494_032_768, max_position_embeddings=131072,
       **_shape(896, 4864, 24, 14, 2, tied=True)),
    _p("Qwen2-1.5B", _QWEN2, 1.54, exact=1_543_714_304, max_position_embeddings=131072,
       **_shape(1536, 8960, 28, 12, 2, tied=True)),
    _p("Qwen2-7B", _QWEN2, 7.62, exact=7_615_616_512, max_position_embeddings=131072,
       **_shape(3584, 18944, 28, 28, 4, vocab=_V_BIG)),
    _p("Qwen2-72B", _QWEN2, 72.7, exact=72_706_203_648, max_position_embeddings=131072,
       **_shape(8192, 29568, 80, 64, 8, vocab=_V_BIG)),
    # --- Qwen2.5 (same code; 32k context configs) -----------------------------------------------------
    _p("Qwen2.5-0.5B", _QWEN2, 0.49, "checked", exact=494_032_768, max_position_embeddings=32768,
       **_shape(896, 4864, 24, 14, 2, tied=True)),
    _p("Qwen2.5-1.5B", _QWEN2, 1.54, exact=1_543_714_304, max_position_embeddings=32768,
       **_shape(1536, 8960, 28, 12, 2, tied=True)),
    _p("Qwen2.5-3B", _QWEN2, 3.09, max_position_embeddings=32768, **_shape(2048, 11008, 36, 16, 2, tied=True)),
    _p("Qwen2.5-7B", _QWEN2, 7.62, exact=7_615_616_512, max_position_embeddings=32768,
       **_shape(3584, 18944, 28, 28, 4, vocab=_V_BIG)),
    _p("Qwen2.5-14B", _QWEN2, 14.7, max_position_embeddings=32768, **_shape(5120, 13824, 48, 40, 8, vocab=_V_BIG)),
    _p("Qwen2.5-32B", _QWEN2, 32.8, max_position_embeddings=32768, **_shape(5120, 27648, 64, 40, 8, vocab=_V_BIG)),
    _p("Qwen2.5-72B", _QWEN2, 72.7, max_position_embeddings=32768, **_shape(8192, 29568, 80, 64, 8, vocab=_V_BIG)),
]

PRESETS: dict[str, Preset] = {p.name: p for p in _ALL}


def list_presets() -> list[str]:
    return list(PRESETS)


def preset(name: str, **overrides: Any) -> QwenConfig:
    """A fresh :class:`QwenConfig` for a named preset (case-insensitive), with optional overrides."""
    key = {n.lower(): n for n in PRESETS}.get(name.lower())
    if key is None:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return QwenConfig(**{**PRESETS[key].values, **overrides})
