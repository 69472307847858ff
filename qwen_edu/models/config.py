"""One config dataclass for the dense Qwen decoders (Qwen-1, Qwen1.5, Qwen2, Qwen2.5).

Hugging Face ships two different ``config.json`` dialects for these models:

* ``model_type: "qwen2"`` (Qwen1.5/2/2.5) -- ``Qwen2Config`` field names. transformers 4.x wrote
  ``rope_theta`` + ``rope_scaling``; transformers 5.x writes a ``rope_parameters`` dict. Both are read.
* ``model_type: "qwen"`` (Qwen-1, remote code) -- ``QWenConfig`` names: ``kv_channels`` is the head
  dim, ``rotary_emb_base`` the RoPE base, ``layer_norm_epsilon`` the RMSNorm eps, ``no_bias`` drops
  the bias of ``c_proj`` and the MLP, and ``intermediate_size`` is **twice** the per-branch MLP width.

:class:`QwenConfig` stores the *meaning* (per-branch MLP width, head dim, ...) once, so the model code
never has to know which dialect the checkpoint spoke. :meth:`QwenConfig.from_hf_config` and
:meth:`QwenConfig.to_hf_config` translate in both directions.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["QwenConfig", "DTYPES", "dtype_from_str", "dtype_to_str"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "half": torch.float16,
    "float": torch.float32,
}


def dtype_from_str(value: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` / ``"torch.bfloat16"`` / ``torch.bfloat16`` -> ``torch.bfloat16`` (``None`` stays)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {value!r}; expected one of {sorted(set(DTYPES))}")
    return DTYPES[name]


def dtype_to_str(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# Keys of a Qwen2-style config.json that QwenConfig understands (everything else goes to `extra`).
_QWEN2_KEYS = {
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
    "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "tie_word_embeddings",
    "use_sliding_window", "sliding_window", "max_window_layers", "attention_dropout", "bos_token_id",
    "eos_token_id", "pad_token_id", "torch_dtype", "dtype", "layer_types", "partial_rotary_factor",
}
# Keys of a Qwen-1 (QWenConfig) config.json, including the GPT-2 style names of old revisions.
_QWEN1_KEYS = {
    "model_type", "vocab_size", "hidden_size", "n_embd", "num_hidden_layers", "n_layer",
    "num_attention_heads", "n_head", "kv_channels", "intermediate_size", "ffn_hidden_size",
    "layer_norm_epsilon", "rotary_emb_base", "rotary_pct", "seq_length", "max_position_embeddings",
    "n_positions", "use_dynamic_ntk", "use_logn_attn", "no_bias", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype",
}


@dataclass
class QwenConfig:
    """Hyper-parameters of a dense Qwen decoder, in one dialect-independent form.

    The defaults are Qwen-7B's shape, like the reference classes' defaults.

    ``intermediate_size`` is always the per-branch SwiGLU width (the rows of ``gate_proj``), also for
    Qwen-1 whose own config stores twice that number. ``head_dim=None`` means
    ``hidden_size // num_attention_heads``; ``num_key_value_heads=None`` means multi-head attention.
    The ``qwen1_*`` style flags reproduce the original Qwen-1 remote code (§5.3-5.5 of the reference):
    rotation in fp32, NTK-alpha RoPE fixed at prefill, and logN query scaling beyond ``seq_length``.
    """

    model_type: str = "qwen2"
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    # Which linear layers carry a bias: Qwen2 has q/k/v bias only; Qwen-1 with no_bias=False adds more.
    qkv_bias: bool = True
    o_bias: bool = False
    mlp_bias: bool = False
    # Sliding-window attention is off in every released dense config (reference §3.3); kept for round trips.
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int | None = None
    attention_dropout: float = 0.0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    # Qwen-1 flavour (only meaningful for model_type "qwen").
    seq_length: int | None = None
    use_dynamic_ntk: bool = False
    use_logn_attn: bool = False
    rope_in_fp32: bool = False
    # "sdpa" (fast, default) or "eager" (explicit softmax, matches HF eager to ~1e-7 in fp32).
    attn_implementation: str = "sdpa"
    # config.json entries we do not interpret (architectures, auto_map, ...), kept for round trips.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; give head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {self.attn_implementation!r}")
        if self.hidden_act != "silu":
            raise NotImplementedError(f"hidden_act={self.hidden_act!r}: only 'silu' (SwiGLU) is implemented")

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def num_kv_groups(self) -> int:
        """How many query heads share one key/value head (1 = MHA)."""
        assert self.num_key_value_heads is not None
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def replace(self, **changes: Any) -> QwenConfig:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    # ---- Hugging Face config.json ----------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any] | str | os.PathLike | Any) -> QwenConfig:
        """Read a HF ``config.json`` (a dict, a path to the file or its folder, or a ``PretrainedConfig``)."""
        if isinstance(hf, str | os.PathLike):
            path = os.fspath(hf)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path, encoding="utf-8") as fh:
                hf = json.load(fh)
        elif not isinstance(hf, dict):  # a transformers PretrainedConfig
            hf = hf.to_dict()
        hf = dict(hf)
        model_type = hf.get("model_type", "qwen2")
        if model_type == "qwen":
            return cls._from_qwen1(hf)
        return cls._from_qwen2(hf)

    @classmethod
    def _from_qwen2(cls, hf: dict[str, Any]) -> QwenConfig:
        rope_theta = hf.get("rope_theta")
        scaling = hf.get("rope_scaling")
        params = hf.get("rope_parameters")
        if isinstance(params, dict):  # transformers 5.x dialect
            rope_theta = params.get("rope_theta", rope_theta)
            if scaling is None and params.get("rope_type", params.get("type", "default")) != "default":
                scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        scaling = _normalise_rope_scaling(scaling)
        dtype = hf.get("torch_dtype", hf.get("dtype"))
        return cls(
            model_type=hf.get("model_type", "qwen2"),
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads"),
            head_dim=hf.get("head_dim"),
            hidden_act=hf.get("hidden_act", "silu"),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            use_sliding_window=bool(hf.get("use_sliding_window", False)),
            sliding_window=hf.get("sliding_window"),
            max_window_layers=hf.get("max_window_layers"),
            attention_dropout=float(hf.get("attention_dropout", 0.0)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            torch_dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
            extra={k: v for k, v in hf.items() if k not in _QWEN2_KEYS},
        )

    @classmethod
    def _from_qwen1(cls, hf: dict[str, Any]) -> QwenConfig:
        def pick(*names: str, default: Any = None) -> Any:
            for name in names:
                if hf.get(name) is not None:
                    return hf[name]
            return default

        hidden = pick("hidden_size", "n_embd")
        heads = pick("num_attention_heads", "n_head")
        fused_width = pick("intermediate_size", "ffn_hidden_size")
        if fused_width is None or fused_width % 2:
            raise ValueError(f"Qwen-1 intermediate_size must be even (it is 2x the MLP width), got {fused_width}")
        rotary_pct = float(pick("rotary_pct", default=1.0))
        if rotary_pct != 1.0:
            raise NotImplementedError(f"rotary_pct={rotary_pct}: only full rotation (1.0) is implemented")
        no_bias = bool(pick("no_bias", default=True))
        dtype = pick("torch_dtype", "dtype")
        return cls(
            model_type="qwen",
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=fused_width // 2,
            num_hidden_layers=pick("num_hidden_layers", "n_layer"),
            num_attention_heads=heads,
            num_key_value_heads=heads,
            head_dim=pick("kv_channels", default=hidden // heads),
            max_position_embeddings=pick("max_position_embeddings", "n_positions", default=32768),
            rms_norm_eps=float(pick("layer_norm_epsilon", default=1e-6)),
            rope_theta=float(pick("rotary_emb_base", default=10000.0)),
            tie_word_embeddings=bool(pick("tie_word_embeddings", default=False)),
            qkv_bias=True,  # c_attn always has a bias
            o_bias=not no_bias,
            mlp_bias=not no_bias,
            bos_token_id=pick("bos_token_id"),
            eos_token_id=pick("eos_token_id"),
            pad_token_id=pick("pad_token_id"),
            torch_dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
            seq_length=pick("seq_length", default=2048),
            use_dynamic_ntk=bool(pick("use_dynamic_ntk", default=False)),
            use_logn_attn=bool(pick("use_logn_attn", default=False)),
            rope_in_fp32=True,
            extra={k: v for k, v in hf.items() if k not in _QWEN1_KEYS},
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The ``config.json`` dict in this model's own dialect (Qwen2 or Qwen-1)."""
        if self.model_type == "qwen":
            return self._to_qwen1()
        out: dict[str, Any] = dict(self.extra)
        out.update(
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            hidden_act=self.hidden_act,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=dict(self.rope_scaling) if self.rope_scaling else None,
            tie_word_embeddings=self.tie_word_embeddings,
            use_sliding_window=self.use_sliding_window,
            sliding_window=self.sliding_window,
            max_window_layers=self.max_window_layers,
            attention_dropout=self.attention_dropout,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        if self.head_dim != self.hidden_size // self.num_attention_heads:
            out["head_dim"] = self.head_dim
        if self.max_window_layers is None:  # transformers 5.x rejects an explicit null here
            out.pop("max_window_layers")
        if self.torch_dtype is not None:
            out["torch_dtype"] = self.torch_dtype
        out.setdefault("architectures", ["Qwen2ForCausalLM"])
        return out

    def _to_qwen1(self) -> dict[str, Any]:
        if self.o_bias != self.mlp_bias or not self.qkv_bias:
            raise ValueError("a Qwen-1 config.json can only say no_bias for c_proj and the MLP together")
        out: dict[str, Any] = dict(self.extra)
        out.update(
            model_type="qwen",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            kv_channels=self.head_dim,
            intermediate_size=2 * self.intermediate_size,
            layer_norm_epsilon=self.rms_norm_eps,
            rotary_emb_base=self.rope_theta,
            rotary_pct=1.0,
            seq_length=self.seq_length,
            max_position_embeddings=self.max_position_embeddings,
            use_dynamic_ntk=self.use_dynamic_ntk,
            use_logn_attn=self.use_logn_attn,
            no_bias=not self.o_bias,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        if self.torch_dtype is not None:
            out["torch_dtype"] = self.torch_dtype
        out.setdefault("architectures", ["QWenLMHeadModel"])
        return out

    def save(self, folder: str | os.PathLike) -> None:
        """Write ``config.json`` into ``folder``."""
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as fh:
            json.dump(self.to_hf_config(), fh, indent=2, sort_keys=True)
            fh.write("\n")


def _normalise_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    """Legacy ``type`` -> ``rope_type``; ``default`` / ``mrope`` (default frequencies) -> ``None``."""
    if not scaling:
        return None
    scaling = dict(scaling)
    if "rope_type" not in scaling and "type" in scaling:
        scaling["rope_type"] = scaling.pop("type")
    scaling.pop("type", None)
    scaling.pop("rope_theta", None)
    if scaling.get("rope_type", "default") == "default":
        return None
    return scaling
