"""Qwen2-VL: the Qwen2 decoder reading images and videos of any size, with M-RoPE positions.

The model is three parts with checkpoint-named attributes (``visual.*``, ``model.*``, ``lm_head``, the hub
layout, which is also what transformers 5.x ``save_pretrained`` writes):

- ``visual`` -- :class:`~qwen_edu.vision.qwen2_vl_vit.Qwen2VisionTransformer`: packed patches of all images
  (or videos) -> one LLM-width vector per 2x2 block of patches.
- ``model`` -- the dense Qwen2 decoder of :mod:`qwen_edu.models.qwen2`, with one change: its rotary
  embedding is :class:`~qwen_edu.vision.mrope.MRotaryEmbedding`, which takes ``[3, B, L]`` position ids.
- ``lm_head`` -- as in Qwen2 (tied to the embedding in the 2B model).

A forward pass embeds the tokens, overwrites the ``<|image_pad|>`` (``<|video_pad|>``) embeddings in order
with the vision features, computes M-RoPE ids with :meth:`Qwen2VLForConditionalGeneration.get_rope_index`
(Qwen's rule, see :mod:`qwen_edu.vision.mrope`) at prefill and ``cache position + rope_delta`` afterwards
(the deltas live on the cache, :class:`Qwen2VLCache`), and runs the decoder. :func:`qwen_edu.generate` works
unchanged: the images go to the prefill pass only.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from qwen_edu.models.config import QwenConfig, _normalise_rope_scaling
from qwen_edu.models.layers import KVCache
from qwen_edu.models.layouts import Qwen2Layout
from qwen_edu.models.qwen2 import CausalLMOutput, Qwen2ForCausalLM, Qwen2Model
from qwen_edu.models.registry import ModelEntry, register_model
from qwen_edu.vision.mrope import MRotaryEmbedding, get_rope_index, mrope_decode_positions
from qwen_edu.vision.qwen2_vl_vit import Qwen2VisionTransformer, VisionConfig

__all__ = ["Qwen2VLConfig", "Qwen2VLCache", "Qwen2VLTextModel", "Qwen2VLForConditionalGeneration", "Qwen2VLLayout"]

# Top-level config.json keys that belong to the VL wrapper, not to the text model.
_VL_KEYS = {"vision_config", "text_config", "image_token_id", "video_token_id", "vision_start_token_id",
            "vision_end_token_id", "vision_token_id", "architectures", "transformers_version", "model_type"}


@dataclass
class Qwen2VLConfig(QwenConfig):
    """A :class:`QwenConfig` for the text decoder plus the vision tower and the M-RoPE split.

    ``from_hf_config`` reads both dialects: the hub's flat one (text fields at the top level,
    ``rope_scaling = {"type": "mrope", "mrope_section": [...]}``) and transformers 5.x's
    (``text_config`` with ``rope_parameters``). ``to_hf_config`` writes the hub dialect, which both read.
    """

    # Defaults: Qwen2-VL-7B's text model (its vision tower is VisionConfig's default).
    model_type: str = "qwen2_vl"
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int | None = 4
    rope_theta: float = 1_000_000.0
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    mrope_layout: str = "contiguous"
    #: Extension points for the later VL models (chapter 12): the vision config's class (its
    #: ``from_hf_config`` reads that model's ``vision_config`` dialect) and the checkpoint's architecture name.
    vision_config_class: ClassVar[type[VisionConfig]] = VisionConfig
    architecture: ClassVar[str] = "Qwen2VLForConditionalGeneration"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.vision_config, dict):
            self.vision_config = self.vision_config_class.from_hf_config(self.vision_config)
        # One switch for the whole model: the tower follows the decoder's attention implementation.
        self.vision_config.attn_implementation = self.attn_implementation
        if self.vision_config.out_hidden_size != self.hidden_size:
            raise ValueError(f"vision_config.hidden_size={self.vision_config.out_hidden_size} (the merger's output) "
                             f"must equal the text hidden_size={self.hidden_size}")
        assert self.head_dim is not None
        if sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim/2 = {self.head_dim // 2}")

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any] | str | os.PathLike | Any) -> Qwen2VLConfig:
        if isinstance(hf, str | os.PathLike):
            path = os.path.join(hf, "config.json") if os.path.isdir(hf) else os.fspath(hf)
            with open(path, encoding="utf-8") as fh:
                hf = json.load(fh)
        elif not isinstance(hf, dict):
            hf = hf.to_dict()
        hf = dict(hf)
        text = dict(hf.get("text_config") or {k: v for k, v in hf.items() if k not in _VL_KEYS})
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or hf.get("rope_scaling") or {})
        mrope_section = rope.pop("mrope_section", None)
        if mrope_section is None:
            raise ValueError("a qwen2_vl config needs rope_scaling.mrope_section (or rope_parameters.mrope_section)")
        layout = "interleaved" if rope.pop("mrope_interleaved", False) else "contiguous"
        for key in ("type", "rope_type"):
            if rope.get(key) == "mrope":
                rope[key] = "default"
        text_key = "rope_parameters" if "rope_parameters" in text else "rope_scaling"
        text[text_key] = rope
        text["model_type"] = "qwen2"
        text.setdefault("rope_theta", rope.get("rope_theta", cls.rope_theta))
        text["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", False) or text.get("tie_word_embeddings"))
        for key in ("torch_dtype", "dtype"):
            if key in hf and key not in text:
                text[key] = hf[key]
        base = QwenConfig._from_qwen2(text)
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(QwenConfig)}
        fields["rope_scaling"] = _normalise_rope_scaling(base.rope_scaling)
        fields["model_type"] = cls.model_type
        fields["extra"] = {k: v for k, v in base.extra.items() if k not in ("layer_types", "model_type")}
        return cls(
            **fields,
            vision_config=cls.vision_config_class.from_hf_config(hf.get("vision_config") or {}),
            image_token_id=hf.get("image_token_id", 151655),
            video_token_id=hf.get("video_token_id", 151656),
            vision_start_token_id=hf.get("vision_start_token_id", 151652),
            vision_end_token_id=hf.get("vision_end_token_id", 151653),
            mrope_section=[int(s) for s in mrope_section],
            mrope_layout=layout,
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The hub's flat ``config.json`` (text fields at the top level)."""
        text = QwenConfig.to_hf_config(dataclasses.replace(self, model_type="qwen2"))  # type: ignore[arg-type]
        scaling = dict(self.rope_scaling or {"type": "mrope"})
        scaling["mrope_section"] = list(self.mrope_section)
        if self.mrope_layout != "contiguous":
            raise ValueError(f"a qwen2_vl config.json has no way to say mrope layout {self.mrope_layout!r}")
        text.update(
            model_type=self.model_type,
            architectures=[self.architecture],
            rope_scaling=scaling,
            vision_config=self.vision_config.to_hf_config(),
            image_token_id=self.image_token_id,
            video_token_id=self.video_token_id,
            vision_start_token_id=self.vision_start_token_id,
            vision_end_token_id=self.vision_end_token_id,
        )
        return text


class Qwen2VLCache(KVCache):
    """The decoder's KV cache, plus the per-row ``rope_deltas [B, 1]`` the prefill computed.

    Tokens after the prefill sit at ``cache position + rope_delta`` on all three M-RoPE streams; keeping the
    deltas with the cache (not on the model) lets several generations run side by side.
    """

    def __init__(self, num_layers: int, chunk: int = 256) -> None:
        super().__init__(num_layers, chunk)
        self.rope_deltas: torch.Tensor | None = None


class Qwen2VLTextModel(Qwen2Model):
    """The Qwen2 decoder with M-RoPE: ``position_ids`` may be ``[3, B, L]``."""

    def build_rotary_embedding(self, config: QwenConfig) -> nn.Module:
        assert isinstance(config, Qwen2VLConfig) and config.head_dim is not None
        return MRotaryEmbedding(config.head_dim, config.rope_theta, config.mrope_section, config.mrope_layout,
                                config.rope_scaling, config.max_position_embeddings)


class Qwen2VLForConditionalGeneration(Qwen2ForCausalLM):
    """Vision tower + M-RoPE Qwen2 decoder + LM head."""

    decoder_class = Qwen2VLTextModel
    #: The vision tower class (Qwen2.5-VL and Qwen3-VL swap in their own).
    vision_class: type[nn.Module] = Qwen2VisionTransformer
    #: Tells :func:`qwen_edu.generate` not to pass 1D text positions: this model derives its own M-RoPE ids.
    computes_position_ids = True

    def __init__(self, config: Qwen2VLConfig) -> None:
        super().__init__(config)
        self.visual = self.vision_class(config.vision_config)

    def set_attn_implementation(self, name: str) -> None:
        """Switch the decoder and the vision tower between ``"eager"`` and ``"sdpa"``."""
        super().set_attn_implementation(name)
        self.visual.set_attn_implementation(name)

    def get_rope_index(self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                       video_grid_thw: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(position_ids [3, B, L], rope_deltas [B, 1])`` for a prompt, with this model's token ids."""
        config = self.config
        return get_rope_index(input_ids, image_grid_thw, video_grid_thw, attention_mask,
                              image_token_id=config.image_token_id, video_token_id=config.video_token_id,
                              vision_start_token_id=config.vision_start_token_id,
                              spatial_merge_size=config.vision_config.spatial_merge_size)

    def _insert_features(self, input_ids: torch.Tensor | None, embeds: torch.Tensor, pixels: torch.Tensor,
                         grid: torch.Tensor | None, token_id: int, what: str) -> torch.Tensor:
        """Overwrite the pad tokens' embeddings with the vision features, in order (after checking counts)."""
        mask = self._vision_token_mask(input_ids, grid, token_id, what)
        pixel_name = "pixel_values" if what == "image" else "pixel_values_videos"
        features = self.visual(pixels, grid, what=pixel_name).to(embeds.dtype)
        return embeds.masked_scatter(mask[..., None], features)

    def _vision_token_mask(self, input_ids: torch.Tensor | None, grid: torch.Tensor | None, token_id: int,
                           what: str) -> torch.Tensor:
        """``input_ids == token_id``, after checking that the pad tokens are as many as the grid's features."""
        grid_name = "image_grid_thw" if what == "image" else "video_grid_thw"
        if grid is None:
            raise ValueError(f"{what} pixels were given without {grid_name}")
        if input_ids is None:
            raise ValueError(f"{what} pixels need input_ids (to find the {what} pad tokens)")
        mask = input_ids == token_id
        n_tokens = int(mask.sum())
        n_features = int(grid.prod(-1).sum()) // self.config.vision_config.spatial_merge_size**2
        if n_tokens != n_features:
            raise ValueError(f"{what} tokens do not match the features: input_ids hold {n_tokens} {what} pad tokens "
                             f"(id {token_id}), but {grid_name} {grid.tolist()} gives {n_features} features")
        return mask

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                pixel_values_videos: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None, *,
                position_ids: torch.Tensor | None = None, past_key_values: KVCache | None = None,
                use_cache: bool = False, cache: KVCache | None = None, inputs_embeds: torch.Tensor | None = None,
                logits_to_keep: int = 0, rope_deltas: torch.Tensor | None = None) -> CausalLMOutput:
        """``input_ids [B, L]`` (+ images / videos) -> :class:`CausalLMOutput` with ``logits [B, L, vocab]``.

        Without ``position_ids`` the M-RoPE ids are computed here: :meth:`get_rope_index` on a fresh cache
        (its deltas are stored on the cache), ``cache position + rope_delta`` once the cache holds the prompt.
        ``position_ids`` may also be given as ``[3, B, L]``, or ``[B, L]`` (text positions, copied to all streams).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = Qwen2VLCache(len(self.model.layers))
        past = cache.get_seq_length() if cache is not None else 0
        embeds = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if pixel_values is not None:
            embeds = self._insert_features(input_ids, embeds, pixel_values, image_grid_thw,
                                           self.config.image_token_id, "image")
        if pixel_values_videos is not None:
            embeds = self._insert_features(input_ids, embeds, pixel_values_videos, video_grid_thw,
                                           self.config.video_token_id, "video")
        if position_ids is None:
            position_ids = self._position_ids(input_ids, embeds, attention_mask, image_grid_thw, video_grid_thw,
                                              cache, past, rope_deltas)
        hidden, cache = self.model(None, attention_mask, position_ids, cache, cache is not None, embeds)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return CausalLMOutput(logits=self.lm_head(hidden), past_key_values=cache, last_hidden_state=hidden)

    def _position_ids(self, input_ids: torch.Tensor | None, embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                      image_grid_thw: torch.Tensor | None, video_grid_thw: torch.Tensor | None,
                      cache: KVCache | None, past: int, rope_deltas: torch.Tensor | None) -> torch.Tensor:
        batch, length = embeds.shape[:2]
        if past == 0 and input_ids is not None:
            positions, deltas = self.get_rope_index(input_ids, image_grid_thw, video_grid_thw, attention_mask)
            if cache is not None:
                cache.rope_deltas = deltas  # type: ignore[attr-defined]
            return positions
        if rope_deltas is None:
            rope_deltas = getattr(cache, "rope_deltas", None)
        if rope_deltas is None:  # text-only continuation on a plain cache, or inputs_embeds
            rope_deltas = torch.zeros(batch, 1, dtype=torch.long, device=embeds.device)
        return mrope_decode_positions(past, length, rope_deltas.to(embeds.device))


class Qwen2VLLayout(Qwen2Layout):
    """Checkpoint keys equal the module names: ``visual.*``, ``model.*``, ``lm_head.weight``.

    That is the hub layout, and transformers 5.x ``save_pretrained`` writes it too (it renames its internal
    ``model.visual.*`` / ``model.language_model.*`` back to these keys when saving).
    """


register_model(ModelEntry("qwen2_vl", Qwen2VLForConditionalGeneration, Qwen2VLConfig.from_hf_config,
                          Qwen2VLLayout(), description="Qwen2-VL (vision tower + M-RoPE Qwen2 decoder)"))
