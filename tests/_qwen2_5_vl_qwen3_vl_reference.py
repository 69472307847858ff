"""Test helpers for Qwen2.5-VL and Qwen3-VL: tiny random transformers models and renderings of Qwen's own code.

The renderings are written independently of ``qwen_edu`` (plain Python lists, torch only where Qwen's code
relies on float32 arithmetic), so comparing against them checks the library against Qwen's rules:

* :func:`rope2d_25_positions` -- ``get_rope_index_25`` of ``qwen-vl-finetune/qwenvl/data/rope2d.py``
  (QwenLM/Qwen2.5-VL and QwenLM/Qwen3-VL): video temporal ids ``(tau * second_per_grid) * 2`` in float32,
  truncated; every text run resumes at the largest id so far + 1; padded slots 1, deltas over the padded length.
* :func:`rope2d_3_positions` -- ``get_rope_index_3``: video grids split into one ``(1, h, w)`` row per frame
  group (the frames are separated by timestamp text), otherwise the same walk without a clock.
* :func:`qwen_linspace_position_table` -- the released Qwen3-VL ``fast_pos_embed_interpolate`` (``linspace``
  coordinates, raster order, then reordered into 2 x 2 merge blocks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests._checkpoints import randomize_all_parameters
from tests._qwen2_vl_reference import IMAGE, V_END, V_START, VIDEO, mm_token_type_ids

TEXT = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
#: Qwen2.5-VL tower: windows of 56 px = 2 x 2 merged tokens, so every test picture holds several windows;
#: block 1 of 3 attends over whole frames.
VISION_25 = dict(depth=3, hidden_size=32, out_hidden_size=64, num_heads=4, intermediate_size=48, window_size=56,
                 fullatt_block_indexes=[1], tokens_per_second=2)
#: Qwen3-VL tower: 16 px patches, a 6 x 6 learned position table, DeepStack taps after blocks 0 and 2.
VISION_3 = dict(depth=3, hidden_size=32, out_hidden_size=64, num_heads=4, intermediate_size=48, patch_size=16,
                num_position_embeddings=36, deepstack_visual_indexes=[0, 2])
TOKEN_IDS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=V_START, vision_end_token_id=V_END)


def tiny_qwen2_5_vl_config(tie_word_embeddings: bool = False, vision: dict | None = None, **text: Any):
    import transformers

    text_config = {**TEXT, **text, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                         "mrope_section": [2, 3, 3]}}
    return transformers.Qwen2_5_VLConfig(text_config=text_config, vision_config={**VISION_25, **(vision or {})},
                                         tie_word_embeddings=tie_word_embeddings, **TOKEN_IDS)


def tiny_qwen3_vl_config(tie_word_embeddings: bool = False, vision: dict | None = None, **text: Any):
    import transformers

    text_config = {**TEXT, "head_dim": 16, **text,
                   "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                                       "mrope_interleaved": True}}
    return transformers.Qwen3VLConfig(text_config=text_config, vision_config={**VISION_3, **(vision or {})},
                                      tie_word_embeddings=tie_word_embeddings, **TOKEN_IDS)


def make_checkpoint(kind: str, folder: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """``save_pretrained`` of a tiny ``kind`` ("qwen2_5_vl" / "qwen3_vl") model with every parameter drawn."""
    import transformers

    if kind == "qwen2_5_vl":
        model = transformers.Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config(**overrides))
    else:
        model = transformers.Qwen3VLForConditionalGeneration(tiny_qwen3_vl_config(**overrides))
    randomize_all_parameters(model, seed)
    model.save_pretrained(folder)
    return Path(folder)


def load_reference(kind: str, folder: str | Path, attn_implementation: str = "eager"):
    import transformers

    cls = (transformers.Qwen2_5_VLForConditionalGeneration if kind == "qwen2_5_vl"
           else transformers.Qwen3VLForConditionalGeneration)
    return cls.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn_implementation).eval()


# ---------------------------------------------------------------------------------------------------
# Qwen's rope2d.py, rendered
# ---------------------------------------------------------------------------------------------------
def _walk(tokens: list[int], items: list[tuple[str, list[int], float]], merge: int) -> list[list[int]]:
    """Positions of one unpadded row: ``items`` are (kind, (t, h, w), seconds per grid or 0) in order of use."""
    streams: list[list[int]] = [[], [], []]
    last_max = None
    cursor = 0
    images = [i for i in items if i[0] == "image"]
    videos = [i for i in items if i[0] == "video"]
    followers = [tokens[i + 1] for i, tok in enumerate(tokens[:-1]) if tok == V_START]
    left = {"image": followers.count(IMAGE), "video": followers.count(VIDEO)}
    for _ in range(left["image"] + left["video"]):
        at_image = tokens.index(IMAGE, cursor) if IMAGE in tokens and left["image"] > 0 else len(tokens) + 1
        at_video = tokens.index(VIDEO, cursor) if VIDEO in tokens and left["video"] > 0 else len(tokens) + 1
        kind, end = ("image", at_image) if at_image < at_video else ("video", at_video)
        _, (t, h, w), seconds = (images if kind == "image" else videos).pop(0)
        left[kind] -= 1
        gh, gw = h // merge, w // merge
        first = last_max + 1 if last_max is not None else 0
        text_len = end - cursor
        for i in range(text_len):
            for s in range(3):
                streams[s].append(first + i)
        # Qwen: (arange(t) * second_per_grid_t * 2).long() in float32 (images: second_per_grid_t = 0)
        offsets = ((torch.arange(t) * torch.tensor(seconds, dtype=torch.float32)) * 2).long().tolist()
        item = [[], [], []]
        for ti in range(t):
            for hi in range(gh):
                for wi in range(gw):
                    item[0].append(first + text_len + offsets[ti])
                    item[1].append(first + text_len + hi)
                    item[2].append(first + text_len + wi)
        for s in range(3):
            streams[s] += item[s]
        last_max = max(max(stream) for stream in item)
        cursor = end + t * gh * gw
    if cursor < len(tokens):
        first = last_max + 1 if last_max is not None else 0
        for i in range(len(tokens) - cursor):
            for s in range(3):
                streams[s].append(first + i)
    return streams


def _rope2d(input_ids: torch.Tensor, items: list[tuple[str, list[int], float]], attention_mask=None,
            merge: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    batch, length = input_ids.shape
    mask = attention_mask.tolist() if attention_mask is not None else [[1] * length] * batch
    result = [[[1] * length for _ in range(batch)] for _ in range(3)]
    deltas = []
    queue = list(items)
    for b in range(batch):
        tokens = [tok for tok, m in zip(input_ids[b].tolist(), mask[b]) if m == 1]
        # grids are consumed across the batch in order; this row takes as many as it announces
        followers = [tokens[i + 1] for i, tok in enumerate(tokens[:-1]) if tok == V_START]
        n_images, n_videos = followers.count(IMAGE), followers.count(VIDEO)
        mine = ([q for q in queue if q[0] == "image"][:n_images] + [q for q in queue if q[0] == "video"][:n_videos])
        for q in mine:
            queue.remove(q)
        streams = _walk(tokens, mine, merge)
        slots = [i for i in range(length) if mask[b][i] == 1]
        for s in range(3):
            for slot, value in zip(slots, streams[s]):
                result[s][b][slot] = value
        deltas.append([max(max(stream) for stream in streams) + 1 - length])
    return torch.tensor(result), torch.tensor(deltas)


def rope2d_25_positions(input_ids, image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None,
                        attention_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``get_rope_index_25`` (1.0 s per grid when ``second_per_grid_ts`` is None, images at 0)."""
    images = [("image", row, 0.0) for row in (image_grid_thw.tolist() if image_grid_thw is not None else [])]
    videos = [("video", row, float(second_per_grid_ts[k]) if second_per_grid_ts is not None else 1.0)
              for k, row in enumerate(video_grid_thw.tolist() if video_grid_thw is not None else [])]
    return _rope2d(input_ids, images + videos, attention_mask)


def rope2d_3_positions(input_ids, image_grid_thw=None, video_grid_thw=None, attention_mask=None,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``get_rope_index_3``: every frame group a separate ``(1, h, w)`` video item, no clock."""
    images = [("image", row, 0.0) for row in (image_grid_thw.tolist() if image_grid_thw is not None else [])]
    frames = [("video", [1, h, w], 0.0) for t, h, w in (video_grid_thw.tolist() if video_grid_thw is not None
                                                        else []) for _ in range(t)]
    return _rope2d(input_ids, images + frames, attention_mask)


def qwen_linspace_position_table(table: torch.Tensor, grid_thw: torch.Tensor, merge: int = 2) -> torch.Tensor:
    """The released Qwen3-VL interpolation: ``linspace`` coordinates, four weighted taps, merge-block order."""
    side = int(table.shape[0] ** 0.5)
    out = []
    for t, h, w in grid_thw.tolist():
        h_idx, w_idx = torch.linspace(0, side - 1, h), torch.linspace(0, side - 1, w)
        h_floor, w_floor = h_idx.int(), w_idx.int()
        h_ceil, w_ceil = (h_floor + 1).clip(max=side - 1), (w_floor + 1).clip(max=side - 1)
        dh, dw = h_idx - h_floor, w_idx - w_floor
        taps = [(h_floor[:, None] * side + w_floor[None]), (h_floor[:, None] * side + w_ceil[None]),
                (h_ceil[:, None] * side + w_floor[None]), (h_ceil[:, None] * side + w_ceil[None])]
        weights = [(1 - dh)[:, None] * (1 - dw)[None], (1 - dh)[:, None] * dw[None], dh[:, None] * (1 - dw)[None],
                   dh[:, None] * dw[None]]
        raster = sum(table[i.flatten().long()] * wt.flatten()[:, None] for i, wt in zip(taps, weights))
        blocks = raster.view(h // merge, merge, w // merge, merge, -1).permute(0, 2, 1, 3, 4).reshape(h * w, -1)
        out.append(blocks.repeat(t, 1))
    return torch.cat(out)


def qwen3_video_prompt(grid_thw, timestamp_tokens: list[list[int]]) -> list[int]:
    """Qwen3-VL's expansion of one video: per frame group its timestamp tokens, then vision start, pads, end."""
    t, h, w = [int(v) for v in grid_thw]
    per_frame = h * w // 4
    ids: list[int] = []
    for g in range(t):
        ids += timestamp_tokens[g] + [V_START] + [VIDEO] * per_frame + [V_END]
    return ids


# ---------------------------------------------------------------------------------------------------
# Checks shared by the Qwen2.5-VL and Qwen3-VL parity tests
# ---------------------------------------------------------------------------------------------------
def assert_logits_match(ours, reference, ids: torch.Tensor, mask: torch.Tensor | None, vision: dict,
                        atol: float) -> None:
    """Logits of a (left-padded) batch agree at every real position (padded query rows are garbage)."""
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm_token_type_ids(ids),
                         **vision).logits
        got = ours(ids, mask, **vision).logits
    real = mask.bool() if mask is not None else torch.ones(ids.shape, dtype=torch.bool)
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=atol)


def assert_greedy_identical(ours, reference, ids: torch.Tensor, mask: torch.Tensor, vision: dict,
                            new_tokens: int = 10) -> None:
    """``qwen_edu.generate`` and transformers' ``generate`` pick the same tokens, step for step."""
    import qwen_edu

    want = reference.generate(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm_token_type_ids(ids),
                              max_new_tokens=new_tokens, do_sample=False, **vision)
    got = qwen_edu.generate(ours, ids, mask, max_new_tokens=new_tokens, eos_token_id=[], **vision)
    assert got.shape[1] == ids.shape[1] + new_tokens
    assert torch.equal(got, want[:, :got.shape[1]])
