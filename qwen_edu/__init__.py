"""qwen_edu: the Qwen model family, built step by step in PyTorch.

This package is the single source of truth for the textbook's notebooks. The top-level names
below are the documented entry points; they import their modules lazily, so that
``import qwen_edu`` stays cheap and works without the optional book/test extras.

- :func:`get_device`, :func:`seed_everything` -- device and reproducibility helpers.
- :func:`load_tokenizer` -- the real Qwen BPE tokenizer, or the one in a checkpoint folder.
- :func:`load_model` -- a Qwen checkpoint (local folder or hub id) as a ``torch.nn.Module``.
- :func:`generate` -- cached autoregressive decoding (greedy and sampling).
"""

from __future__ import annotations

import importlib
from typing import Any

from qwen_edu.utils import describe_device, get_device, seed_everything

__version__ = "0.1.0"

# name -> module that defines it; resolved on first access.
_LAZY = {
    "load_tokenizer": "qwen_edu.tokenizer",
    "load_model": "qwen_edu.checkpoint",
    "generate": "qwen_edu.generation",
}

__all__ = ["__version__", "describe_device", "get_device", "seed_everything", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qwen_edu' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
