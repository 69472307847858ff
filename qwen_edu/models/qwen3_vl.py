"""Qwen3-VL: the Qwen3 decoder with interleaved M-RoPE, timestamped video frames and DeepStack vision features.

Built from chapter 10's Qwen2-VL model with four changes (reference ``qwen_later_generations.md`` §2):

- the decoder layers are Qwen3's (QK-norm, no bias, explicit ``head_dim``): options of the shared
  :class:`~qwen_edu.models.layers.DecoderLayer` that :class:`Qwen3VLConfig` switches on;
- M-RoPE **interleaves** the three streams over the rotary frequencies (``t h w t h w ...``, layout
  ``"interleaved"`` of :mod:`qwen_edu.vision.mrope`) instead of giving each a contiguous band, so time, height
  and width all get fast and slow frequencies;
- a video is a sequence of frame groups, each its own vision item preceded by its time as text
  (``<1.2 seconds>``, :mod:`qwen_edu.vision.video_time`); ``video_grid_thw`` rows are split per frame group
  for the position ids, and the temporal id carries no clock;
- the vision tower (:class:`~qwen_edu.vision.qwen3_vl_vit.Qwen3VisionTransformer`: 16-pixel patches, learned
  interpolated positions) also returns DeepStack features, which the forward pass adds to the vision tokens
  after the first decoder layers (:mod:`qwen_edu.vision.deepstack`).

Checkpoint keys are ``model.visual.*``, ``model.language_model.*`` and ``lm_head.weight`` (the hub files and
transformers 5.x both use them); :class:`Qwen3VLLayout` maps them to this model's ``visual.*`` / ``model.*``.
The forward signature is Qwen2-VL's. Positions follow Qwen's ``rope2d.py`` (``get_rope_index_3``), with which
transformers 5.24 agrees for Qwen3-VL prompts; padded slots hold 1 and the deltas use the padded length.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from qwen_edu.models.config import QwenConfig
from qwen_edu.models.layers import KVCache
from qwen_edu.models.layouts import TensorSource, WeightLayout
from qwen_edu.models.qwen2 import CausalLMOutput
from qwen_edu.models.qwen2_5_vl import prefill_mrope_positions
from qwen_edu.models.qwen2_vl import Qwen2VLConfig, Qwen2VLForConditionalGeneration
from qwen_edu.models.qwen3 import read_qwen3_attention, write_qwen3_attention
from qwen_edu.models.registry import ModelEntry, register_model
from qwen_edu.vision.deepstack import inject_deepstack, order_deepstack
from qwen_edu.vision.qwen3_vl_vit import Qwen3VisionConfig, Qwen3VisionTransformer
from qwen_edu.vision.video_time import qwen3_vl_rope_index

__all__ = ["Qwen3VLConfig", "Qwen3VLForConditionalGeneration", "Qwen3VLLayout"]

# Text-config keys of QwenConfig.to_hf_config that a Qwen3-VL text_config does not have.
_NOT_QWEN3_VL_TEXT = ("use_sliding_window", "sliding_window", "max_window_layers", "rope_scaling",
                      "tie_word_embeddings", "architectures", "bos_token_id", "eos_token_id")


@dataclass
class Qwen3VLConfig(Qwen2VLConfig):
    """A Qwen3 text config (QK-norm, no bias, ``head_dim``) with interleaved M-RoPE and a Qwen3-VL vision tower.

    Defaults: transformers' ``Qwen3VLTextConfig`` / ``Qwen3VLConfig``. The checkpoint dialect nests the text
    fields in ``text_config`` (M-RoPE in its ``rope_scaling`` or ``rope_parameters``); transformers 5.24 always
    interleaves whatever ``mrope_interleaved`` says, and so does :meth:`from_hf_config`. The outer
    ``tie_word_embeddings`` decides tying (the text config's own flag is ignored, as in transformers 5.x).
    ``mrope_layout="contiguous"`` remains available for experiments.
    """

    model_type: str = "qwen3_vl"
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    head_dim: int | None = 128
    max_position_embeddings: int = 128000
    rope_theta: float = 500_000.0
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = True
    # transformers' two class defaults disagree (merger output 3584, text width 4096); ours meet at 4096
    vision_config: Qwen3VisionConfig = field(  # type: ignore[assignment]
        default_factory=lambda: Qwen3VisionConfig(out_hidden_size=4096))
    mrope_section: list[int] = field(default_factory=lambda: [24, 20, 20])
    mrope_layout: str = "interleaved"
    vision_config_class: ClassVar[type[Qwen3VisionConfig]] = Qwen3VisionConfig
    architecture: ClassVar[str] = "Qwen3VLForConditionalGeneration"

    def __post_init__(self) -> None:
        super().__post_init__()
        taps = len(self.vision_config.deepstack_visual_indexes)
        if taps > self.num_hidden_layers:
            raise ValueError(f"{taps} DeepStack taps feed the first {taps} decoder layers, but the decoder has "
                             f"num_hidden_layers={self.num_hidden_layers}")

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any] | Any) -> Qwen3VLConfig:
        base = super().from_hf_config(hf)
        raw = hf if isinstance(hf, dict) else _raw_config(hf)
        return dataclasses.replace(base, **read_qwen3_attention(base, {}), mrope_layout="interleaved",
                                   tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)))

    def to_hf_config(self) -> dict[str, Any]:
        """The nested ``config.json`` of Qwen3-VL checkpoints (``text_config`` + ``vision_config``)."""
        if self.mrope_layout != "interleaved":
            raise ValueError(f"a qwen3_vl config.json has no way to say mrope layout {self.mrope_layout!r}")
        plain = QwenConfig.to_hf_config(dataclasses.replace(self, model_type="qwen3_vl_text"))  # type: ignore[arg-type]
        text = write_qwen3_attention(dataclasses.replace(self, model_type="qwen3_vl_text"), plain, "")
        for key in _NOT_QWEN3_VL_TEXT:
            text.pop(key, None)
        text["rope_scaling"] = {**(self.rope_scaling or {"rope_type": "default"}), "mrope_interleaved": True,
                                "mrope_section": list(self.mrope_section)}
        return {
            "model_type": self.model_type, "architectures": [self.architecture], "text_config": text,
            "vision_config": self.vision_config.to_hf_config(), "tie_word_embeddings": self.tie_word_embeddings,
            "image_token_id": self.image_token_id, "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id, "vision_end_token_id": self.vision_end_token_id,
            **({"torch_dtype": self.torch_dtype} if self.torch_dtype is not None else {}),
        }


def _raw_config(hf: Any) -> dict[str, Any]:
    """The top-level dict of a config given as a path or a transformers config object."""
    import json
    import os

    if isinstance(hf, str | os.PathLike):
        path = os.path.join(hf, "config.json") if os.path.isdir(hf) else os.fspath(hf)
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    return hf.to_dict()


class Qwen3VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """Qwen3 decoder + interleaved M-RoPE + the Qwen3-VL vision tower, with DeepStack at prefill."""

    vision_class = Qwen3VisionTransformer
    config: Qwen3VLConfig

    def get_rope_index(self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                       video_grid_thw: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen's rule with every frame group of a video as its own item (each announced by a vision start)."""
        config = self.config
        return qwen3_vl_rope_index(input_ids, image_grid_thw, video_grid_thw, attention_mask,
                                   image_token_id=config.image_token_id, video_token_id=config.video_token_id,
                                   vision_start_token_id=config.vision_start_token_id,
                                   spatial_merge_size=config.vision_config.spatial_merge_size)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                pixel_values_videos: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None, *,
                position_ids: torch.Tensor | None = None, past_key_values: KVCache | None = None,
                use_cache: bool = False, cache: KVCache | None = None, inputs_embeds: torch.Tensor | None = None,
                logits_to_keep: int = 0, rope_deltas: torch.Tensor | None = None) -> CausalLMOutput:
        """Qwen2-VL's forward; with pixels, the DeepStack taps are added after the first decoder layers."""
        cache = cache if cache is not None else past_key_values
        if pixel_values is None and pixel_values_videos is None:
            return super().forward(input_ids, attention_mask, None, image_grid_thw, None, video_grid_thw,
                                   position_ids=position_ids, cache=cache, use_cache=use_cache,
                                   inputs_embeds=inputs_embeds, logits_to_keep=logits_to_keep, rope_deltas=rope_deltas)
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("pixel values need input_ids (to find the pad tokens), not inputs_embeds")
        config = self.config
        embeds = self.model.embed_tokens(input_ids)
        parts = []
        for pixels, grid, token_id, what, name in (
                (pixel_values, image_grid_thw, config.image_token_id, "image", "pixel_values"),
                (pixel_values_videos, video_grid_thw, config.video_token_id, "video", "pixel_values_videos")):
            if pixels is None:
                continue
            mask = self._vision_token_mask(input_ids, grid, token_id, what)
            out = self.visual.encode(pixels, grid, what=name)
            embeds = embeds.masked_scatter(mask[..., None], out.features.to(embeds.dtype))
            parts.append((mask, out.deepstack))
        visual_mask, taps = order_deepstack(parts)
        position_ids, cache = prefill_mrope_positions(self, input_ids, attention_mask, position_ids, cache, use_cache,
                                                      image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw)
        with inject_deepstack(self.model.layers, visual_mask, taps):
            return super().forward(None, attention_mask, position_ids=position_ids, cache=cache, use_cache=use_cache,
                                   inputs_embeds=embeds, logits_to_keep=logits_to_keep, rope_deltas=rope_deltas)


class Qwen3VLLayout(WeightLayout):
    """``visual.X`` <-> ``model.visual.X``, ``model.X`` <-> ``model.language_model.X``, ``lm_head`` as is."""

    def source(self, name: str, config: Any) -> TensorSource:
        if name.startswith("visual."):
            return TensorSource("model." + name)
        if name.startswith("model."):
            return TensorSource("model.language_model." + name.removeprefix("model."))
        return TensorSource(name)


register_model(ModelEntry("qwen3_vl", Qwen3VLForConditionalGeneration, Qwen3VLConfig.from_hf_config,
                          Qwen3VLLayout(), description="Qwen3-VL (Qwen3 decoder, interleaved M-RoPE, DeepStack)"))
