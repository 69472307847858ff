"""Shared helpers for tests that need Qwen checkpoints without a network: tiny random HF models.

Hugging Face initialises RMSNorm weights to ones and biases to zeros, which would hide bugs in how
those tensors are loaded or applied (a norm weight read from the wrong key still "works" if every
norm weight is 1). :func:`randomize_all_parameters` therefore draws *every* parameter at random.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "TINY_QWEN2",
    "tiny_qwen2_config",
    "randomize_all_parameters",
    "make_tiny_qwen2_checkpoint",
    "load_reference",
    "convert_to_qwen1_checkpoint",
]

# A 2-layer GQA decoder that runs in milliseconds on a CPU.
TINY_QWEN2: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_qwen2_config(**overrides: Any):
    """A ``transformers.Qwen2Config`` with :data:`TINY_QWEN2` values, updated by ``overrides``."""
    import transformers

    return transformers.Qwen2Config(**{**TINY_QWEN2, **overrides})


@torch.no_grad()
def randomize_all_parameters(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter with seeded random values of a sensible scale, in place.

    Matrices (embeddings included) get ``N(0, 1/fan_in)``: activations keep unit scale, so logits are
    O(1) and well spread (greedy decoding has no near-ties), 1-D norm weights ``1 + N(0, 0.2)`` and biases
    ``N(0, 0.2)``. Tied tensors are drawn once. Works for any ``nn.Module``.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if param.dim() >= 2:
            values = torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[-1])
        elif "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            values = 1.0 + 0.2 * torch.randn(param.shape, generator=gen)
        else:  # biases and any other vectors
            values = 0.2 * torch.randn(param.shape, generator=gen)
        param.copy_(values.to(param.dtype))
    return model


def make_tiny_qwen2_checkpoint(folder: str | Path, *, seed: int = 0, dtype: torch.dtype | None = None,
                               max_shard_size: str | int | None = None, **overrides: Any) -> Path:
    """Save a randomised ``transformers.Qwen2ForCausalLM`` with ``save_pretrained`` and return the folder.

    ``overrides`` change :data:`TINY_QWEN2` (e.g. ``num_key_value_heads=4, tie_word_embeddings=True``).
    """
    import transformers

    folder = Path(folder)
    model = transformers.Qwen2ForCausalLM(tiny_qwen2_config(**overrides))
    randomize_all_parameters(model, seed)
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    model.save_pretrained(folder, **kwargs)
    return folder


def load_reference(folder: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: str = "eager"):
    """The transformers model for a Qwen2-layout folder, in eval mode (eager attention by default)."""
    import transformers

    model = transformers.Qwen2ForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval()


def convert_to_qwen1_checkpoint(src: str | Path, dst: str | Path, *, seq_length: int = 2048,
                                use_dynamic_ntk: bool = False, use_logn_attn: bool = False) -> Path:
    """Rewrite a Qwen2-layout checkpoint (MHA, untied) into the original Qwen-1 key names and config.

    Written independently of ``qwen_edu.models.layouts`` on purpose, so that a test loading the result
    checks the library's mapping against this one: ``c_attn = cat(q, k, v)`` (weights and biases),
    ``w2`` = gate, ``w1`` = up, ``mlp.c_proj`` = down, ``ln_1``/``ln_2``/``ln_f``, ``wte``.
    """
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    hf = json.loads((src / "config.json").read_text())
    sd = {k: v for f in sorted(src.glob("*.safetensors")) for k, v in load_file(f).items()}
    if hf.get("num_key_value_heads", hf["num_attention_heads"]) != hf["num_attention_heads"]:
        raise ValueError("Qwen-1 has no grouped-query attention; build the source with kv heads == heads")
    out = {"transformer.wte.weight": sd["model.embed_tokens.weight"], "transformer.ln_f.weight": sd["model.norm.weight"],
           "lm_head.weight": sd.get("lm_head.weight", sd["model.embed_tokens.weight"])}
    for i in range(hf["num_hidden_layers"]):
        p, q = f"model.layers.{i}.", f"transformer.h.{i}."
        a = p + "self_attn."
        out[q + "ln_1.weight"] = sd[p + "input_layernorm.weight"]
        out[q + "ln_2.weight"] = sd[p + "post_attention_layernorm.weight"]
        for kind in ("weight", "bias"):
            out[q + f"attn.c_attn.{kind}"] = torch.cat([sd[a + f"{x}_proj.{kind}"] for x in "qkv"], dim=0)
        out[q + "attn.c_proj.weight"] = sd[a + "o_proj.weight"]
        out[q + "mlp.w1.weight"] = sd[p + "mlp.up_proj.weight"]
        out[q + "mlp.w2.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[q + "mlp.c_proj.weight"] = sd[p + "mlp.down_proj.weight"]
    save_file({k: v.contiguous() for k, v in out.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    rope = hf.get("rope_parameters") or {}
    config = {
        "architectures": ["QWenLMHeadModel"],
        "model_type": "qwen",
        "vocab_size": hf["vocab_size"],
        "hidden_size": hf["hidden_size"],
        "num_hidden_layers": hf["num_hidden_layers"],
        "num_attention_heads": hf["num_attention_heads"],
        "kv_channels": hf["hidden_size"] // hf["num_attention_heads"],
        "intermediate_size": 2 * hf["intermediate_size"],
        "layer_norm_epsilon": hf["rms_norm_eps"],
        "rotary_emb_base": rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        "rotary_pct": 1.0,
        "seq_length": seq_length,
        "max_position_embeddings": 32768,
        "use_dynamic_ntk": use_dynamic_ntk,
        "use_logn_attn": use_logn_attn,
        "no_bias": True,
        "scale_attn_weights": True,
        "tie_word_embeddings": False,
        "use_flash_attn": "auto",
        "fp32": True,
        "bf16": False,
        "fp16": False,
    }
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst
