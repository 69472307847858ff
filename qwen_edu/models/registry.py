"""``model_type`` -> (config reader, model class, checkpoint layout), for every Qwen architecture.

:func:`qwen_edu.load_model` reads a checkpoint's ``config.json`` and asks :func:`entry_for_config`
which model to build. Each architecture module registers itself when it is imported
(:func:`register_model` at the bottom of ``qwen_edu/models/<arch>.py``); :data:`ARCHITECTURE_MODULES`
says which module that is, so the loader imports only what a checkpoint needs and adding a model
family is one new module plus one line here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from qwen_edu.models.config import QwenConfig
from qwen_edu.models.layouts import Qwen1Layout, Qwen2Layout, WeightLayout
from qwen_edu.models.qwen2 import Qwen2ForCausalLM

__all__ = [
    "ARCHITECTURE_MODULES",
    "ModelEntry",
    "MODEL_REGISTRY",
    "register_model",
    "get_model_entry",
    "entry_for_config",
    "model_type_of",
]


@dataclass(frozen=True)
class ModelEntry:
    """Everything the loader needs to know about one ``model_type``."""

    model_type: str
    model_class: Callable[[Any], nn.Module]
    config_from_hf: Callable[[dict[str, Any]], Any] = QwenConfig.from_hf_config
    layout: WeightLayout = field(default_factory=Qwen2Layout)
    description: str = ""


MODEL_REGISTRY: dict[str, ModelEntry] = {}

#: The module that defines (and registers) each ``model_type``. ``qwen_vl`` is not a real
#: ``config.json`` value: Qwen-VL checkpoints say ``"qwen"`` and carry a ``visual`` sub-config,
#: which :func:`model_type_of` turns into ``"qwen_vl"``.
ARCHITECTURE_MODULES: dict[str, str] = {
    "qwen": "qwen_edu.models.qwen2",
    "qwen2": "qwen_edu.models.qwen2",
    "qwen_vl": "qwen_edu.models.qwen_vl",
    "qwen2_moe": "qwen_edu.models.qwen2_moe",
    "qwen2_vl": "qwen_edu.models.qwen2_vl",
    "qwen2_5_vl": "qwen_edu.models.qwen2_5_vl",
    "qwen3": "qwen_edu.models.qwen3",
    "qwen3_moe": "qwen_edu.models.qwen3_moe",
    "qwen3_vl": "qwen_edu.models.qwen3_vl",
    "qwen3_next": "qwen_edu.models.qwen3_next",
}


def register_model(entry: ModelEntry, *aliases: str) -> None:
    """Make ``entry.model_type`` (and any ``aliases``) loadable."""
    for name in (entry.model_type, *aliases):
        MODEL_REGISTRY[name] = entry


def get_model_entry(model_type: str) -> ModelEntry:
    """The registered entry for ``model_type``, importing its architecture module on first use."""
    if model_type not in MODEL_REGISTRY and model_type in ARCHITECTURE_MODULES:
        try:
            importlib.import_module(ARCHITECTURE_MODULES[model_type])
        except ModuleNotFoundError as exc:
            if exc.name != ARCHITECTURE_MODULES[model_type]:
                raise
    try:
        return MODEL_REGISTRY[model_type]
    except KeyError:
        known = sorted(set(MODEL_REGISTRY) | set(ARCHITECTURE_MODULES))
        raise NotImplementedError(f"model_type {model_type!r} is not supported (yet); known: {known}") from None


def model_type_of(raw_config: dict[str, Any]) -> str:
    """The registry key for a parsed ``config.json`` (Qwen-VL hides behind ``model_type: "qwen"``)."""
    model_type = raw_config.get("model_type", "qwen2")
    if model_type == "qwen" and isinstance(raw_config.get("visual"), dict):
        return "qwen_vl"
    return model_type


def entry_for_config(raw_config: dict[str, Any]) -> ModelEntry:
    """The entry that builds the model a parsed ``config.json`` describes."""
    return get_model_entry(model_type_of(raw_config))


register_model(ModelEntry("qwen2", Qwen2ForCausalLM, description="Qwen1.5 / Qwen2 / Qwen2.5 dense (HF layout)"))
register_model(ModelEntry("qwen", Qwen2ForCausalLM, layout=Qwen1Layout(),
                          description="Qwen-1 (original remote-code layout: transformer.h.N.attn.c_attn ...)"))
