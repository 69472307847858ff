"""``model_type`` -> (config reader, model class, checkpoint layout).

:func:`qwen_edu.load_model` looks the checkpoint's ``model_type`` up here, so later chapters add
MoE and vision-language models by registering one more entry instead of editing the loader.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from qwen_edu.models.config import QwenConfig
from qwen_edu.models.layouts import Qwen1Layout, Qwen2Layout, WeightLayout
from qwen_edu.models.qwen2 import Qwen2ForCausalLM

__all__ = ["ModelEntry", "MODEL_REGISTRY", "register_model", "get_model_entry"]


@dataclass(frozen=True)
class ModelEntry:
    """Everything the loader needs to know about one ``model_type``."""

    model_type: str
    model_class: Callable[[Any], nn.Module]
    config_from_hf: Callable[[dict[str, Any]], Any] = QwenConfig.from_hf_config
    layout: WeightLayout = field(default_factory=Qwen2Layout)
    description: str = ""


MODEL_REGISTRY: dict[str, ModelEntry] = {}


def register_model(entry: ModelEntry, *aliases: str) -> None:
    """Make ``entry.model_type`` (and any ``aliases``) loadable."""
    for name in (entry.model_type, *aliases):
        MODEL_REGISTRY[name] = entry


def get_model_entry(model_type: str) -> ModelEntry:
    try:
        return MODEL_REGISTRY[model_type]
    except KeyError:
        raise NotImplementedError(
            f"model_type {model_type!r} is not supported (yet); known: {sorted(MODEL_REGISTRY)}"
        ) from None


register_model(ModelEntry("qwen2", Qwen2ForCausalLM, description="Qwen1.5 / Qwen2 / Qwen2.5 dense (HF layout)"))
register_model(ModelEntry("qwen", Qwen2ForCausalLM, layout=Qwen1Layout(),
                          description="Qwen-1 (original remote-code layout: transformer.h.N.attn.c_attn ...)"))
