"""Qwen2.5-VL: Qwen2-VL with a windowed RMSNorm/SwiGLU vision tower and video positions on an absolute clock.

The model is chapter 10's :class:`~qwen_edu.models.qwen2_vl.Qwen2VLForConditionalGeneration` with two parts
swapped (reference ``qwen_architectures.md`` §10):

- ``visual`` -- :class:`~qwen_edu.vision.qwen2_5_vl_vit.Qwen2_5VisionTransformer` (window attention in all but
  the ``fullatt_block_indexes`` blocks, RMSNorm, SwiGLU with biases);
- the temporal M-RoPE ids of videos count seconds: frame group ``tau`` of a video sampled with
  ``second_per_grid_ts[k]`` seconds per frame group gets ``floor(tau * second_per_grid * tokens_per_second)``
  (:func:`~qwen_edu.vision.video_time.absolute_time_index`), so a video at 1 and at 4 frames per second puts
  the same moment at the same temporal id. Images are unchanged.

The forward signature is Qwen2-VL's plus ``second_per_grid_ts`` (one number per video, ``temporal_patch_size
/ fps``; 1.0 s when absent, as in Qwen's code). Positions follow Qwen's ``rope2d.py`` (``get_rope_index_25``):
text after a video resumes at the largest id so far + 1, which for a long video lies beyond where transformers
5.24 restarts it. Checkpoint keys are the hub's (``visual.*``, ``model.*``, ``lm_head``), which transformers 5.x
``save_pretrained`` writes too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from qwen_edu.models.layers import KVCache
from qwen_edu.models.qwen2 import CausalLMOutput
from qwen_edu.models.qwen2_vl import (
    Qwen2VLCache,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLLayout,
)
from qwen_edu.models.registry import ModelEntry, register_model
from qwen_edu.vision.qwen2_5_vl_vit import Qwen2_5VisionConfig, Qwen2_5VisionTransformer
from qwen_edu.vision.video_time import qwen2_5_vl_rope_index

__all__ = ["Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "prefill_mrope_positions"]


@dataclass
class Qwen2_5_VLConfig(Qwen2VLConfig):
    """:class:`~qwen_edu.models.qwen2_vl.Qwen2VLConfig` with a :class:`Qwen2_5VisionConfig`.

    Defaults: transformers' ``Qwen2_5_VLConfig`` (a 7B-shaped text model). Both config dialects are read (the
    hub's flat one and transformers 5.x's ``text_config``); the hub's is written.
    """

    model_type: str = "qwen2_5_vl"
    vision_config: Qwen2_5VisionConfig = field(default_factory=Qwen2_5VisionConfig)  # type: ignore[assignment]
    vision_config_class: ClassVar[type[Qwen2_5VisionConfig]] = Qwen2_5VisionConfig
    architecture: ClassVar[str] = "Qwen2_5_VLForConditionalGeneration"


def prefill_mrope_positions(model: Qwen2VLForConditionalGeneration, input_ids: torch.Tensor | None,
                            attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                            cache: KVCache | None, use_cache: bool, **rope_inputs: Any,
                            ) -> tuple[torch.Tensor | None, KVCache | None]:
    """At prefill, ``model.get_rope_index(..., **rope_inputs)`` with its deltas stored on a (new) cache.

    For models whose positions need more than the grids (Qwen2.5-VL's ``second_per_grid_ts``) or whose forward
    passes embeddings on (Qwen3-VL): returns ``(position_ids, cache)`` to hand to the Qwen2-VL forward, which
    then uses them as given; after the prefill ``position_ids`` stays ``None`` (cache position + delta).
    """
    if use_cache and cache is None:
        cache = Qwen2VLCache(len(model.model.layers))
    if position_ids is None and input_ids is not None and (cache is None or cache.get_seq_length() == 0):
        position_ids, deltas = model.get_rope_index(input_ids, attention_mask=attention_mask, **rope_inputs)
        if cache is not None:
            cache.rope_deltas = deltas  # type: ignore[attr-defined]
    return position_ids, cache


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """Qwen2-VL with the Qwen2.5-VL vision tower and absolute-time video positions."""

    vision_class = Qwen2_5VisionTransformer
    config: Qwen2_5_VLConfig

    def get_rope_index(self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                       video_grid_thw: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                       second_per_grid_ts: torch.Tensor | list[float] | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen's rule with each video's temporal ids on the clock (``tokens_per_second`` ids per second)."""
        config = self.config
        return qwen2_5_vl_rope_index(
            input_ids, image_grid_thw, video_grid_thw, attention_mask, second_per_grid_ts=second_per_grid_ts,
            tokens_per_second=config.vision_config.tokens_per_second, image_token_id=config.image_token_id,
            video_token_id=config.video_token_id, vision_start_token_id=config.vision_start_token_id,
            spatial_merge_size=config.vision_config.spatial_merge_size)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                pixel_values_videos: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                second_per_grid_ts: torch.Tensor | list[float] | None = None, *,
                position_ids: torch.Tensor | None = None, past_key_values: KVCache | None = None,
                use_cache: bool = False, cache: KVCache | None = None, inputs_embeds: torch.Tensor | None = None,
                logits_to_keep: int = 0, rope_deltas: torch.Tensor | None = None) -> CausalLMOutput:
        """Qwen2-VL's forward; ``second_per_grid_ts [n_videos]`` sets each video's seconds per frame group."""
        position_ids, cache = prefill_mrope_positions(
            self, input_ids, attention_mask, position_ids, cache if cache is not None else past_key_values,
            use_cache, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
            second_per_grid_ts=second_per_grid_ts)
        return super().forward(input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                               video_grid_thw, position_ids=position_ids, cache=cache, use_cache=use_cache,
                               inputs_embeds=inputs_embeds, logits_to_keep=logits_to_keep, rope_deltas=rope_deltas)


register_model(ModelEntry("qwen2_5_vl", Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig.from_hf_config,
                          Qwen2VLLayout(), description="Qwen2.5-VL (windowed ViT + absolute-time M-RoPE Qwen2)"))
