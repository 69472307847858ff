"""Qwen-VL: the Qwen-1 decoder with a vision tower whose 256 outputs replace the tokens of each image span.

A Qwen-VL checkpoint is a Qwen-1 checkpoint (``model_type: "qwen"``, ``transformer.h.N.*`` keys, reference
§5) plus ``transformer.visual.*`` and a ``visual`` dict in ``config.json`` (§11). The registry recognises
it by that dict (:func:`qwen_edu.models.registry.model_type_of` -> ``"qwen_vl"``).

The forward pass (reference §11.4) differs from the text model in one step, before the first block:

1. find every ``<img> ... </img>`` span in ``input_ids`` (``image_start_id`` and ``image_start_id + 1``);
2. encode the pictures: the ``pixel_values`` passed in, or -- the reference's way -- the files whose paths
   are stored as byte ids in the spans (up to the first ``<imgpad>``, ``image_start_id + 2``);
3. overwrite the token embeddings of the ``n_queries`` slots between ``<img>`` and ``</img>`` with the
   visual features. ``<img>`` and ``</img>`` keep their own embeddings and frame the picture.

As in the reference this happens only when there is no cache yet (the prefill pass), so
:func:`qwen_edu.generate` passes ``pixel_values=`` to the first step only and decodes as for text.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from qwen_edu.models.config import QwenConfig
from qwen_edu.models.layers import KVCache
from qwen_edu.models.layouts import Qwen1Layout, TensorSource
from qwen_edu.models.qwen2 import CausalLMOutput, Qwen2ForCausalLM
from qwen_edu.models.registry import ModelEntry, register_model
from qwen_edu.vision.qwen_vl_vit import QwenVLVisionConfig, QwenVLVisionTransformer

__all__ = ["QwenVLConfig", "QwenVLLayout", "QwenVLForCausalLM", "ImageSpan"]


@dataclass
class QwenVLConfig(QwenConfig):
    """A Qwen-1 :class:`QwenConfig` plus the ``visual`` sub-config (defaults: Qwen-VL-Chat's shape)."""

    model_type: str = "qwen"
    seq_length: int | None = 2048
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    rope_in_fp32: bool = True
    o_bias: bool = False
    mlp_bias: bool = False
    visual: QwenVLVisionConfig = field(default_factory=QwenVLVisionConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.visual, dict):
            self.visual = QwenVLVisionConfig.from_dict(self.visual)
        if self.model_type != "qwen":
            raise ValueError(f"Qwen-VL's language model is Qwen-1 (model_type 'qwen'), got {self.model_type!r}")
        if self.visual.output_dim != self.hidden_size:
            raise ValueError(f"visual output_dim={self.visual.output_dim} must equal hidden_size={self.hidden_size}: "
                             "the visual features replace token embeddings")
        if self.visual.image_start_id + 2 >= self.vocab_size:
            raise ValueError(f"visual image_start_id={self.visual.image_start_id}: <img>, </img> and <imgpad> "
                             f"(+0, +1, +2) must be ids below vocab_size={self.vocab_size}")
        self.visual.attn_implementation = self.attn_implementation

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any] | str | os.PathLike | Any) -> QwenVLConfig:
        """Read a Qwen-VL ``config.json`` (dict, file or folder): the Qwen-1 fields and the ``visual`` dict."""
        if isinstance(hf, str | os.PathLike):
            path = os.path.join(hf, "config.json") if os.path.isdir(hf) else os.fspath(hf)
            with open(path, encoding="utf-8") as fh:
                hf = json.load(fh)
        hf = dict(hf)
        visual = hf.pop("visual", None)
        if not isinstance(visual, dict):
            raise ValueError("a Qwen-VL config.json needs a 'visual' dict (is this a text-only checkpoint?)")
        if hf.get("model_type", "qwen") != "qwen":
            raise ValueError(f"Qwen-VL configs say model_type 'qwen', got {hf.get('model_type')!r}")
        text = QwenConfig.from_hf_config({**hf, "model_type": "qwen"})
        values = {f.name: getattr(text, f.name) for f in fields(QwenConfig)}
        return cls(**values, visual=QwenVLVisionConfig.from_dict(visual))

    def to_hf_config(self) -> dict[str, Any]:
        """The Qwen-1 ``config.json`` dict with the ``visual`` sub-config."""
        out = super().to_hf_config()
        out["visual"] = self.visual.to_dict()
        return out


class QwenVLLayout(Qwen1Layout):
    """Qwen-1 keys for the language model; ``visual.X`` lives at ``transformer.visual.X``."""

    def source(self, name: str, config: QwenConfig) -> TensorSource:
        if name.startswith("visual."):
            return TensorSource("transformer." + name)
        return super().source(name, config)


@dataclass(frozen=True)
class ImageSpan:
    """One image in a batch: row ``row``, ``<img>`` at ``start`` and ``</img>`` at ``end``."""

    row: int
    start: int
    end: int


class QwenVLForCausalLM(Qwen2ForCausalLM):
    """The Qwen-1 causal LM (:class:`Qwen2ForCausalLM` with Qwen-1 options) plus ``visual``."""

    config: QwenVLConfig

    def __init__(self, config: QwenVLConfig) -> None:
        super().__init__(config)
        self.visual = QwenVLVisionTransformer(config.visual)

    def set_attn_implementation(self, name: str) -> None:
        super().set_attn_implementation(name)
        self.visual.set_attn_implementation(name)

    # --- image spans ---------------------------------------------------------------------------------
    def image_spans(self, input_ids: torch.Tensor) -> list[ImageSpan]:
        """Every ``<img> ... </img>`` span, row by row, checked to hold exactly ``n_queries`` slots."""
        start_id = self.config.visual.image_start_id
        span = self.config.visual.n_queries
        spans: list[ImageSpan] = []
        for row in torch.nonzero((input_ids == start_id).any(dim=1)).flatten().tolist():
            starts = torch.nonzero(input_ids[row] == start_id).flatten().tolist()
            ends = torch.nonzero(input_ids[row] == start_id + 1).flatten().tolist()
            if len(starts) != len(ends):
                raise ValueError(f"row {row} has {len(starts)} <img> (id {start_id}) but {len(ends)} </img> "
                                 f"(id {start_id + 1}): an image span is missing its </img>")
            for a, b in zip(starts, ends):
                if b - a - 1 != span:
                    raise ValueError(f"row {row}: the image span opened at position {a} holds {b - a - 1} tokens "
                                     f"before </img>; the model replaces exactly n_queries={span} slots "
                                     "(encode images with QwenVLTokenizer)")
                spans.append(ImageSpan(row, a, b))
        return spans

    def image_paths(self, input_ids: torch.Tensor, spans: list[ImageSpan]) -> list[str]:
        """The reference's way to find the pictures: the path bytes stored in each span, up to ``<imgpad>``."""
        pad = self.config.visual.image_start_id + 2
        paths = []
        for s in spans:
            inner = input_ids[s.row, s.start + 1:s.end].tolist()
            data = inner[:inner.index(pad)] if pad in inner else inner
            if not data or any(not 0 <= t < 256 for t in data):
                raise ValueError(f"row {s.row}: the image span at position {s.start} holds no path (ids must be "
                                 "bytes 0-255 before <imgpad>); pass pixel_values= instead")
            paths.append(bytes(data).decode("utf-8", errors="strict"))
        return paths

    def embed_with_images(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None
                          ) -> torch.Tensor:
        """Token embeddings ``[B, L, H]`` with each image span's slots replaced by its visual features.

        ``pixel_values [num_images, 3, S, S]`` are taken in span order (row by row, left to right);
        without them the pictures are loaded from the paths in the spans.
        """
        embeds = self.model.embed_tokens(input_ids)
        spans = self.image_spans(input_ids)
        if not spans:
            if pixel_values is not None:
                raise ValueError("pixel_values were given but input_ids contain no <img> ... </img> span")
            return embeds
        if pixel_values is None:
            pixel_values = self.visual.preprocess(self.image_paths(input_ids, spans))
        self.visual.check_pixels(pixel_values)
        if pixel_values.shape[0] != len(spans):
            raise ValueError(f"pixel_values hold {pixel_values.shape[0]} images but input_ids have {len(spans)} "
                             "<img> ... </img> spans")
        features = self.visual(pixel_values).to(embeds.dtype)
        embeds = embeds.clone()
        for k, s in enumerate(spans):
            embeds[s.row, s.start + 1:s.end] = features[k]
        return embeds

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: KVCache | None = None,
                use_cache: bool = False, *, cache: KVCache | None = None,
                inputs_embeds: torch.Tensor | None = None, logits_to_keep: int = 0,
                pixel_values: torch.Tensor | None = None) -> CausalLMOutput:
        """Like :meth:`Qwen2ForCausalLM.forward`; on the first pass (no cache) image spans get pictures."""
        cache = cache if cache is not None else past_key_values
        first_pass = cache is None or cache.get_seq_length() == 0
        if input_ids is not None and inputs_embeds is None and first_pass:
            if pixel_values is not None or bool((input_ids == self.config.visual.image_start_id).any()):
                inputs_embeds, input_ids = self.embed_with_images(input_ids, pixel_values), None
        elif pixel_values is not None:
            raise ValueError("pixel_values are used on the first pass only, together with input_ids")
        return super().forward(input_ids, attention_mask, position_ids, cache, use_cache,
                               inputs_embeds=inputs_embeds, logits_to_keep=logits_to_keep)


register_model(ModelEntry("qwen_vl", QwenVLForCausalLM, config_from_hf=QwenVLConfig.from_hf_config,
                          layout=QwenVLLayout(),
                          description="Qwen-VL (original layout: transformer.visual.* + Qwen-1 keys)"))
