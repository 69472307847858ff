"""The model registry: one loader for every Qwen architecture, dispatching on config.json."""

from __future__ import annotations

import sys

import pytest
import torch

from qwen_edu.generation import generate
from qwen_edu.models import Qwen2ForCausalLM
from qwen_edu.models.presets import preset
from qwen_edu.models.registry import (
    ARCHITECTURE_MODULES,
    MODEL_REGISTRY,
    get_model_entry,
    model_type_of,
)


def test_qwen_vl_is_told_apart_from_qwen1_by_its_visual_sub_config():
    assert model_type_of({"model_type": "qwen"}) == "qwen"
    assert model_type_of({"model_type": "qwen", "visual": {"image_size": 448}}) == "qwen_vl"
    assert model_type_of({"model_type": "qwen2_vl"}) == "qwen2_vl"
    assert model_type_of({}) == "qwen2", "old Qwen2 configs without model_type load as qwen2"


def test_every_planned_architecture_names_a_module_under_qwen_edu_models():
    assert {"qwen", "qwen2", "qwen_vl", "qwen2_moe", "qwen2_vl", "qwen3", "qwen3_next"} <= set(ARCHITECTURE_MODULES)
    assert all(module.startswith("qwen_edu.models.") for module in ARCHITECTURE_MODULES.values())


def test_an_architecture_module_is_imported_on_first_use(monkeypatch, tmp_path):
    (tmp_path / "toy_arch_module.py").write_text(
        "from qwen_edu.models import Qwen2ForCausalLM\n"
        "from qwen_edu.models.registry import ModelEntry, register_model\n"
        "register_model(ModelEntry('toy_arch', Qwen2ForCausalLM, description='registered by its module'))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(ARCHITECTURE_MODULES, "toy_arch", "toy_arch_module")
    monkeypatch.delitem(sys.modules, "toy_arch_module", raising=False)
    assert "toy_arch" not in MODEL_REGISTRY
    try:
        assert get_model_entry("toy_arch").description == "registered by its module"
    finally:
        MODEL_REGISTRY.pop("toy_arch", None)


def test_a_planned_architecture_without_its_module_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(ARCHITECTURE_MODULES, "qwen99", "qwen_edu.models.qwen99_does_not_exist")
    with pytest.raises(NotImplementedError, match="'qwen99' is not supported"):
        get_model_entry("qwen99")


def test_a_broken_architecture_module_is_not_mistaken_for_a_missing_one(monkeypatch, tmp_path):
    (tmp_path / "broken_arch_module.py").write_text("import a_package_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(ARCHITECTURE_MODULES, "broken_arch", "broken_arch_module")
    with pytest.raises(ModuleNotFoundError, match="a_package_that_is_not_installed"):
        get_model_entry("broken_arch")


class _RecordingModel(Qwen2ForCausalLM):
    """A tiny decoder that records which keyword arguments each forward pass received."""

    def __init__(self) -> None:
        super().__init__(preset("tiny"))
        self.calls: list[set[str]] = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, *, logits_to_keep=0, pixel_values=None):
        self.calls.append({"pixel_values"} if pixel_values is not None else set())
        return super().forward(input_ids, attention_mask, position_ids, past_key_values, use_cache,
                               logits_to_keep=logits_to_keep)


def test_generate_passes_extra_model_inputs_to_the_prefill_pass_only():
    torch.manual_seed(0)
    model = _RecordingModel().eval()
    ids = torch.randint(0, 512, (1, 5))
    with_image = generate(model, ids, max_new_tokens=3, eos_token_id=[], pixel_values=torch.zeros(1, 3, 4, 4))
    assert with_image.shape == (1, 8)
    assert model.calls == [{"pixel_values"}, set(), set()], "only the first (prefill) pass sees the image"
    model.calls.clear()
    text_only = generate(model, ids, max_new_tokens=3, eos_token_id=[])
    assert model.calls == [set(), set(), set()]
    assert torch.equal(with_image, text_only), "this model ignores the image, so the tokens are the same"
