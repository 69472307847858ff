"""DeepStack on the LLM side: ViT features from several depths added to the vision tokens in the first layers.

A vision-language model usually hands the LLM only the vision tower's *last* layer, once, as the input
embeddings of the vision tokens. DeepStack (Meng et al., 2024; used by Qwen3-VL) also taps intermediate ViT
blocks -- their features go through mergers of their own (:class:`~qwen_edu.vision.qwen3_vl_vit.VisionPatchMerger`)
-- and *adds* tap ``j`` to the hidden states of the vision tokens right after LLM decoder layer ``j``:

    h_j[visual] = DecoderLayer_j(h_{j-1})[visual] + deepstack_j

so layers ``0 .. k-1`` each receive fresh visual detail from a different ViT depth, at no extra tokens.
Qwen3-VL-2B/4B tap ViT blocks 5, 11 and 17 into LLM layers 0, 1 and 2. Nothing is added while decoding: the
vision tokens are in the KV cache by then.

:func:`inject_deepstack` does the adding with forward hooks on the first decoder layers, only while the prefill
pass runs inside it, so the decoder itself stays chapter 2's; :func:`order_deepstack` lays the image and video
taps out in the order of the vision tokens in the batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

__all__ = ["add_visual_features", "order_deepstack", "inject_deepstack"]


def add_visual_features(hidden: torch.Tensor, visual_mask: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``hidden [B, L, H]`` with ``features [n_visual, H]`` added at the ``True`` slots of ``visual_mask [B, L]``."""
    if features.shape != (int(visual_mask.sum()), hidden.shape[-1]):
        raise ValueError(f"DeepStack features of shape {tuple(features.shape)} do not fit {int(visual_mask.sum())} "
                         f"vision tokens of width {hidden.shape[-1]}")
    hidden = hidden.clone()
    hidden[visual_mask] = hidden[visual_mask] + features.to(hidden.dtype)
    return hidden


def order_deepstack(parts: Sequence[tuple[torch.Tensor, Sequence[torch.Tensor]]],
                    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``[(mask [B, L], taps), ...]`` per modality -> ``(visual_mask, taps)`` in the order of all vision tokens.

    Each modality's taps hold one ``[n_tokens, H]`` tensor per DeepStack layer, rows in that modality's token
    order; the result interleaves images and videos as their tokens appear in the (row-major) batch.
    """
    if not parts:
        raise ValueError("order_deepstack needs at least one modality")
    visual = torch.zeros_like(parts[0][0], dtype=torch.bool)
    for mask, _ in parts:
        visual = visual | mask
    counts = {len(taps) for _, taps in parts}
    if len(counts) != 1:
        raise ValueError(f"every modality must have the same number of DeepStack taps, got {sorted(counts)}")
    merged = []
    for j in range(counts.pop()):
        first = parts[0][1][j]
        out = first.new_zeros(int(visual.sum()), first.shape[-1])
        for mask, taps in parts:
            out[mask[visual]] = taps[j]
        merged.append(out)
    return visual, merged


@contextlib.contextmanager
def inject_deepstack(layers: nn.ModuleList, visual_mask: torch.Tensor, features: Sequence[torch.Tensor],
                     ) -> Iterator[None]:
    """While active, decoder layer ``j``'s output gets ``features[j]`` added at the vision tokens."""
    if len(features) > len(layers):
        raise ValueError(f"{len(features)} DeepStack taps but the decoder has only {len(layers)} layers")

    def adder(tap: torch.Tensor):  # noqa: ANN202 - a forward hook
        return lambda module, args, output: add_visual_features(output, visual_mask, tap)

    handles = [layers[j].register_forward_hook(adder(tap)) for j, tap in enumerate(features)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
