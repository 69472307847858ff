"""Tiny random Qwen3 / Qwen3-MoE checkpoints written by transformers' ``save_pretrained``, for the qwen3 tests.

Every parameter is drawn at random (:func:`tests._checkpoints.randomize_all_parameters`), the q/k norm
weights included, so a norm read from the wrong key or applied in the wrong place cannot hide.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

from tests._checkpoints import randomize_all_parameters

__all__ = ["TINY_QWEN3", "TINY_QWEN3_MOE", "make_checkpoint", "load_reference", "random_ids", "assert_same_logits"]

# head_dim 24 != hidden / heads = 16: Qwen3 decouples the two, and a loader that derives it would fail.
TINY_QWEN3: dict[str, Any] = dict(
    vocab_size=256, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=24, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)
# moe_intermediate_size * 4 bytes is a multiple of 16, so transformers' default grouped_mm expert path
# runs on CPU (qwen_later_generations.md §5.3); the test of the stride trap overrides it.
TINY_QWEN3_MOE: dict[str, Any] = dict(
    TINY_QWEN3, num_hidden_layers=3, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
    norm_topk_prob=True,
)
_CLASSES = {"qwen3": ("Qwen3Config", "Qwen3ForCausalLM", TINY_QWEN3),
            "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", TINY_QWEN3_MOE)}


def make_checkpoint(kind: str, folder: str | Path, *, seed: int = 0, fused: bool = False,
                    dtype: torch.dtype | None = None, **overrides: Any) -> Path:
    """A randomised transformers ``Qwen3ForCausalLM`` (``kind="qwen3"``) or ``Qwen3MoeForCausalLM``
    (``"qwen3_moe"``) saved with ``save_pretrained``; MoE experts in the per-expert hub layout
    (transformers' default) or, with ``fused=True``, as the fused 5.x tensors."""
    config_name, model_name, defaults = _CLASSES[kind]
    config = getattr(transformers, config_name)(**{**defaults, **overrides})
    model = getattr(transformers, model_name)(config)
    randomize_all_parameters(model, seed)
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {"save_original_format": not fused} if kind == "qwen3_moe" else {}
    model.save_pretrained(folder, **kwargs)
    return Path(folder)


def load_reference(kind: str, folder: str | Path, dtype: torch.dtype = torch.float32,
                   attn_implementation: str = "eager", experts: str = "grouped_mm"):
    """The transformers model of a folder, in eval mode (eager attention by default)."""
    model_class = getattr(transformers, _CLASSES[kind][1])
    kwargs = {"experts_implementation": experts} if kind == "qwen3_moe" else {}
    model = model_class.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation, **kwargs)
    return model.eval()


def random_ids(batch: int = 2, length: int = 16, seed: int = 0, vocab: int = 256) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def assert_same_logits(model, reference, ids: torch.Tensor, atol: float = 1e-5, **kwargs: Any) -> torch.Tensor:
    """Run both models on ``ids`` (plus ``kwargs``) and assert fp32 logits within ``atol``; return ours."""
    ours, theirs = model(ids, **kwargs).logits, reference(ids, **kwargs).logits
    assert ours.shape == theirs.shape == (*ids.shape, reference.config.vocab_size)
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=atol)
    return ours
