"""A toy setup for tests and quick demos: a chat-data tokenizer of ~330 tokens and 2-layer models."""

from __future__ import annotations

import functools

import torch

from qwen_edu.alignment.data import make_comparisons, make_conversations
from qwen_edu.models import Qwen2ForCausalLM
from qwen_edu.models.presets import preset
from qwen_edu.tokenizer import train_tokenizer


@functools.lru_cache(maxsize=1)
def toy_tokenizer():
    texts = []
    for c in make_conversations(300, seed=0):
        texts += [m["content"] for m in c["messages"]]
    for p in make_comparisons(100, seed=0):
        texts += [p["chosen"], p["rejected"]]
    return train_tokenizer(texts, 330)


def toy_model(seed: int = 0, vocab_size: int | None = None, **overrides) -> Qwen2ForCausalLM:
    """A 2-layer model with GPT-style small init (std 0.02), so losses start near log(vocab)."""
    torch.manual_seed(seed)
    config = preset("tiny", vocab_size=vocab_size or toy_tokenizer().vocab_size, **overrides)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02)
    return model.eval()
