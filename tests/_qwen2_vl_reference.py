"""Test helpers for Qwen2-VL: tiny random transformers models, test inputs, and Qwen's position rule.

:func:`rope2d_positions` renders the position rule of Qwen's own training code
(``QwenLM/Qwen2.5-VL``, ``qwen-vl-finetune/qwenvl/data/rope2d.py``, ``get_rope_index_2``) step by step in
plain Python lists, written independently of :mod:`qwen_edu.vision.mrope` so that comparing the two checks
the library against Qwen's rule rather than against itself. transformers 5.24 differs from it for videos
whose temporal extent exceeds their spatial extent (reference notes, qwen_later_generations.md §3).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from tests._checkpoints import randomize_all_parameters

IMAGE, VIDEO, V_START, V_END = 290, 291, 292, 293

TEXT = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
VISION = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2)


def tiny_qwen2_vl_config(tie_word_embeddings: bool = False, mrope_section=(2, 3, 3), vision: dict | None = None,
                         **text: Any):
    """A ``transformers.Qwen2VLConfig``: 2-layer GQA decoder (head_dim 16), 2-block ViT (head_dim 8)."""
    import transformers

    text_config = {**TEXT, **text, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                         "mrope_section": list(mrope_section)}}
    return transformers.Qwen2VLConfig(text_config=text_config, vision_config={**VISION, **(vision or {})},
                                      image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=V_START,
                                      vision_end_token_id=V_END, tie_word_embeddings=tie_word_embeddings)


def make_tiny_qwen2_vl_checkpoint(folder: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """``save_pretrained`` of a randomised tiny ``Qwen2VLForConditionalGeneration`` (every parameter drawn)."""
    import transformers

    model = transformers.Qwen2VLForConditionalGeneration(tiny_qwen2_vl_config(**overrides))
    randomize_all_parameters(model, seed)
    model.save_pretrained(folder)
    return Path(folder)


def load_reference(folder: str | Path, attn_implementation: str = "eager"):
    import transformers

    return transformers.Qwen2VLForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, attn_implementation=attn_implementation).eval()


def random_images(sizes, seed: int = 0):
    """PIL images of random pixels, one per ``(height, width)``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def mm_token_type_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """What the 5.x processor returns next to input_ids: 1 for image pads, 2 for video pads, else 0."""
    return (input_ids == IMAGE).long() + 2 * (input_ids == VIDEO).long()


def n_tokens(grid_row) -> int:
    return int(torch.as_tensor(grid_row).prod()) // 4


def left_pad(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def rope2d_positions(input_ids: torch.Tensor, image_grid_thw=None, video_grid_thw=None, attention_mask=None,
                     merge: int = 2, image_id: int = IMAGE, video_id: int = VIDEO, start_id: int = V_START):
    """Qwen's rule (rope2d.py ``get_rope_index_2``), returning ``(position_ids [3, B, L], deltas [B, 1])``."""
    batch, length = input_ids.shape
    if image_grid_thw is None and video_grid_thw is None:
        if attention_mask is None:
            pos = [[list(range(length))] * batch] * 3
            return torch.tensor(pos), torch.zeros(batch, 1, dtype=torch.long)
        out, deltas = [], []
        for mask_row in attention_mask.tolist():
            running, row = 0, []
            for m in mask_row:
                running += m
                row.append(running - 1 if m else 1)
            out.append(row)
            deltas.append([max(row) + 1 - length])
        return torch.tensor([out] * 3), torch.tensor(deltas)
    images = image_grid_thw.tolist() if image_grid_thw is not None else []
    videos = video_grid_thw.tolist() if video_grid_thw is not None else []
    mask = attention_mask.tolist() if attention_mask is not None else [[1] * length] * batch
    result = [[[1] * length for _ in range(batch)] for _ in range(3)]
    deltas = []
    next_image = next_video = 0
    for b in range(batch):
        tokens = [tok for tok, m in zip(input_ids[b].tolist(), mask[b]) if m == 1]
        followers = [tokens[i + 1] for i, tok in enumerate(tokens[:-1]) if tok == start_id]
        remaining_images, remaining_videos = followers.count(image_id), followers.count(video_id)
        streams: list[list[int]] = [[], [], []]  # t, h, w for the unpadded tokens
        last_chunk_max = None
        cursor = 0
        for _ in range(remaining_images + remaining_videos):
            at_image = tokens.index(image_id, cursor) if image_id in tokens and remaining_images > 0 else len(tokens) + 1
            at_video = tokens.index(video_id, cursor) if video_id in tokens and remaining_videos > 0 else len(tokens) + 1
            if at_image < at_video:
                t, h, w = images[next_image]
                next_image, remaining_images, end = next_image + 1, remaining_images - 1, at_image
            else:
                t, h, w = videos[next_video]
                next_video, remaining_videos, end = next_video + 1, remaining_videos - 1, at_video
            gh, gw = h // merge, w // merge
            text_len = end - cursor
            first = last_chunk_max + 1 if last_chunk_max is not None else 0
            for i in range(text_len):
                for s in range(3):
                    streams[s].append(first + i)
            for ti in range(t):
                for hi in range(gh):
                    for wi in range(gw):
                        streams[0].append(first + text_len + ti)
                        streams[1].append(first + text_len + hi)
                        streams[2].append(first + text_len + wi)
            last_chunk_max = first + text_len + max(t - 1, gh - 1, gw - 1)
            cursor = end + t * gh * gw
        if cursor < len(tokens):
            first = last_chunk_max + 1 if last_chunk_max is not None else 0
            for i in range(len(tokens) - cursor):
                for s in range(3):
                    streams[s].append(first + i)
        slots = [i for i in range(length) if mask[b][i] == 1]
        for s in range(3):
            for slot, value in zip(slots, streams[s]):
                result[s][b][slot] = value
        deltas.append([max(max(stream) for stream in streams) + 1 - length])
    return torch.tensor(result), torch.tensor(deltas)
