"""Vision code of the Qwen vision-language models, one module per job.

- :mod:`qwen_edu.vision.preprocessing`: loading images and CLIP normalisation, shared by every model.
- Qwen-VL (chapter 7): the fixed-resolution ViT with a learned position table and the 256-query
  cross-attention resampler.
- Qwen2-VL and later (chapters 10 and 12): dynamic resolution (``smart_resize``, patchification),
  the ViT with 2D rotary positions, the 2x2 patch merger and M-RoPE position ids.

The language-model side of each vision-language model lives in ``qwen_edu/models/<arch>.py`` and
imports its vision tower from here.
"""

from qwen_edu.vision.dynamic_resolution import (
    preprocess_image,
    preprocess_images,
    preprocess_video,
    smart_resize,
)
from qwen_edu.vision.mrope import get_rope_index

__all__ = ["smart_resize", "preprocess_image", "preprocess_images", "preprocess_video", "get_rope_index"]
