"""M-RoPE: multimodal rotary positions (Qwen2-VL). Three position streams -- time, height, width -- share one head.

Every token gets three ids ``(t, h, w)``. Text tokens get three equal ids, so for text M-RoPE *is* 1D RoPE.
The tokens of an image share one ``t`` and take their row and column on the merged grid as ``h`` and ``w``;
video tokens also step ``t`` from one frame group to the next. Each vision item starts at the position where
its text run ended, and the text after it resumes at the item's largest id + 1 (:func:`get_rope_index`), so
an image of ``H' x W'`` tokens advances the positions by ``max(H', W')`` only, not by ``H' * W'``.

Inside the attention head the ``head_dim / 2`` rotary frequencies are split between the streams by
``mrope_section`` (Qwen2-VL: ``[16, 24, 24]``): frequency ``j`` is driven by the stream
:func:`mrope_stream_index` assigns it. Qwen2-VL uses contiguous sections (fast frequencies for time);
Qwen3-VL interleaves them -- both are layouts in :data:`MROPE_LAYOUTS`, and :func:`register_mrope_layout`
adds more. Qwen2.5-VL's absolute-time temporal ids are a ``temporal_index`` callback of :func:`get_rope_index`.

Positions follow **Qwen's own reference** (``qwen-vl-finetune/qwenvl/data/rope2d.py``, as transformers <= 4.57):
text after a vision item starts at the largest id so far + 1, padded slots hold 1, and
``rope_delta = max + 1 - padded_length``, so decoding continues at ``cache_length + rope_delta``
(:func:`mrope_decode_positions`). transformers 5.24 instead restarts text at ``start + max(H', W')``, which
differs for videos whose time extent exceeds their spatial extent; the tests pin Qwen's rule.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Any

import torch

from qwen_edu.models.rope import RotaryEmbedding

__all__ = [
    "MROPE_LAYOUTS",
    "register_mrope_layout",
    "mrope_stream_index",
    "MRotaryEmbedding",
    "vision_item_positions",
    "get_rope_index",
    "text_rope_index",
    "mrope_decode_positions",
]

#: ``(mrope_section, half_dim) -> LongTensor [half_dim]`` of stream ids (0 = t, 1 = h, 2 = w) per frequency.
MropeLayout = Callable[[Sequence[int], int], torch.Tensor]


def _contiguous(section: Sequence[int], half: int) -> torch.Tensor:
    """Qwen2-VL / Qwen2.5-VL: frequencies ``[0, s0)`` -> t, ``[s0, s0+s1)`` -> h, the rest -> w."""
    return torch.repeat_interleave(torch.arange(len(section)), torch.tensor(list(section)))


def _interleaved(section: Sequence[int], half: int) -> torch.Tensor:
    """Qwen3-VL: ``t h w t h w ...`` -- frequency j is h if ``j % 3 == 1`` and ``j < 3 * s_h``, w if
    ``j % 3 == 2`` and ``j < 3 * s_w``, else t; every stream sees fast and slow frequencies."""
    j = torch.arange(half)
    index = torch.zeros(half, dtype=torch.long)
    index[(j % 3 == 1) & (j < 3 * section[1])] = 1
    index[(j % 3 == 2) & (j < 3 * section[2])] = 2
    return index


MROPE_LAYOUTS: dict[str, MropeLayout] = {"contiguous": _contiguous, "interleaved": _interleaved}


def register_mrope_layout(name: str, fn: MropeLayout) -> None:
    """Add a way of splitting the rotary frequencies between the t/h/w streams."""
    MROPE_LAYOUTS[name] = fn


def mrope_stream_index(mrope_section: Sequence[int], head_dim: int, layout: str = "contiguous") -> torch.Tensor:
    """``[head_dim / 2]`` stream id (0 = t, 1 = h, 2 = w) that drives each rotary frequency."""
    half = head_dim // 2
    if len(mrope_section) != 3 or sum(mrope_section) != half or min(mrope_section) < 0:
        raise ValueError(f"mrope_section must be three non-negative sizes summing to head_dim/2 = {half}, "
                         f"got {list(mrope_section)}")
    if layout not in MROPE_LAYOUTS:
        raise ValueError(f"unknown M-RoPE layout {layout!r}; known: {sorted(MROPE_LAYOUTS)}")
    with torch.device("cpu"):
        index = MROPE_LAYOUTS[layout](mrope_section, half).long()
    if index.shape != (half,):
        raise ValueError(f"layout {layout!r} returned shape {tuple(index.shape)}, expected ({half},)")
    return index


class MRotaryEmbedding(RotaryEmbedding):
    """``position_ids [3, B, L]`` (or ``[B, L]`` for text) -> ``cos, sin [B, L, head_dim]``.

    The frequencies are those of :class:`~qwen_edu.models.rope.RotaryEmbedding`; only the angle
    ``position * inv_freq[j]`` takes its position from the stream that owns frequency ``j``. Selecting
    before or after the cosine gives the same bits, so this equals computing three RoPE tables and
    splicing their sections together, as the reference does.
    """

    def __init__(self, head_dim: int, rope_theta: float = 1_000_000.0, mrope_section: Sequence[int] = (16, 24, 24),
                 layout: str = "contiguous", rope_scaling: dict[str, Any] | None = None,
                 max_position_embeddings: int = 32768) -> None:
        rope_type = (rope_scaling or {}).get("rope_type", "default")
        if rope_type in ("dynamic", "qwen1_ntk"):
            raise NotImplementedError(f"M-RoPE with the length-dependent rope_type {rope_type!r} is not supported")
        super().__init__(head_dim, rope_theta, rope_scaling, max_position_embeddings)
        self.mrope_section = list(mrope_section)
        self.layout = layout
        self.stream_index = mrope_stream_index(self.mrope_section, head_dim, layout)  # a plain CPU tensor

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, past_length: int = 0,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if position_ids.dim() == 2:
            position_ids = position_ids[None].expand(3, *position_ids.shape)
        if position_ids.dim() != 3 or position_ids.shape[0] != 3:
            raise ValueError(f"M-RoPE position_ids must be [3, B, L] (or [B, L] for text), got {tuple(position_ids.shape)}")
        if self.inv_freq.device != x.device:
            self.reset_frequencies(x.device)
        if self.stream_index.device != x.device:
            self.stream_index = self.stream_index.to(x.device)
        freqs = position_ids.to(x.device)[..., None].float() * self.inv_freq  # [3, B, L, half]
        index = self.stream_index.view(1, 1, 1, -1).expand(1, *freqs.shape[1:])
        freqs = freqs.gather(0, index)[0]  # [B, L, half]: each frequency from its own stream
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mrope_section={self.mrope_section}, layout={self.layout}"


# ---------------------------------------------------------------------------------------------------
# Position ids
# ---------------------------------------------------------------------------------------------------
def vision_item_positions(grid_t: int, grid_h: int, grid_w: int, start: int,
                          temporal: torch.Tensor | None = None) -> torch.Tensor:
    """``[3, grid_t * grid_h * grid_w]`` ids of one image or video on its *merged* grid, offset by ``start``.

    Tokens run t-major, then row, then column (the order of the merger's output). ``temporal`` overrides
    the per-frame-group time offsets (default ``0, 1, 2, ...``; Qwen2.5-VL stretches them to seconds).
    """
    t_ids = torch.arange(grid_t) if temporal is None else temporal.long()
    per_frame = grid_h * grid_w
    return torch.stack([
        t_ids.repeat_interleave(per_frame),
        torch.arange(grid_h).repeat_interleave(grid_w).repeat(grid_t),
        torch.arange(grid_w).repeat(grid_t * grid_h),
    ]) + start


def text_rope_index(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Text only: three equal streams, ``cumsum(mask) - 1`` with padded slots at 1 (``arange`` without a mask)."""
    batch, length = input_ids.shape
    if attention_mask is None:
        pos = torch.arange(length, device=input_ids.device).expand(batch, length)
        return pos[None].expand(3, batch, length), torch.zeros(batch, 1, dtype=torch.long, device=input_ids.device)
    pos = attention_mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(attention_mask == 0, 1)
    deltas = pos.max(-1, keepdim=True).values + 1 - length
    return pos[None].expand(3, batch, length), deltas


def get_rope_index(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                   video_grid_thw: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                   image_token_id: int = 151655, video_token_id: int = 151656,
                   vision_start_token_id: int = 151652, spatial_merge_size: int = 2,
                   temporal_index: Callable[[int, int], torch.Tensor] | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE ids ``position_ids [3, B, L]`` and ``rope_deltas [B, 1]``, with Qwen's rule.

    Per row, over the unpadded tokens: every ``<|vision_start|>`` followed by an image (video) pad token
    announces an item; items are taken in order of their first pad token, each consuming the next row of
    ``image_grid_thw`` (``video_grid_thw``) across the whole batch, and ``t * h * w / merge**2`` pad tokens.
    A text run of length n starting at p gets ``p .. p+n-1`` on all three streams; an item starting at p
    gets :func:`vision_item_positions` offset by p; the next run starts at the largest id so far + 1.
    Padded slots get 1, and ``rope_delta = max + 1 - L`` with ``L`` the padded row length, so a decoded token
    at cache position c sits at ``c + rope_delta`` on all streams.

    ``temporal_index(grid_t, video_number)`` gives the frame-group time offsets of a video (default
    ``arange(grid_t)``); images always use 0.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
    if image_grid_thw is None and video_grid_thw is None:
        return text_rope_index(input_ids, attention_mask)
    batch, length = input_ids.shape
    grids = {image_token_id: _grid_rows(image_grid_thw), video_token_id: _grid_rows(video_grid_thw)}
    names = {image_token_id: "image", video_token_id: "video"}
    used = {image_token_id: 0, video_token_id: 0}
    merge_area = spatial_merge_size**2
    position_ids = torch.ones(3, batch, length, dtype=torch.long)
    deltas = []
    keep_rows = attention_mask.bool().cpu() if attention_mask is not None else None
    for b, row in enumerate(input_ids.cpu()):
        keep = keep_rows[b] if keep_rows is not None else None
        ids = (row[keep] if keep is not None else row).tolist()
        if not ids:
            raise ValueError(f"row {b} of input_ids has no unmasked tokens")
        announced = sum(1 for i, tok in enumerate(ids[:-1]) if tok == vision_start_token_id
                        and ids[i + 1] in (image_token_id, video_token_id))
        pads = [i for i, tok in enumerate(ids) if tok == image_token_id or tok == video_token_id]
        chunks: list[torch.Tensor] = []
        cursor, next_pos = 0, 0
        for _ in range(announced):
            k = bisect.bisect_left(pads, cursor)
            if k == len(pads):
                raise ValueError(f"row {b}: a <|vision_start|> announces an item, but no pad token follows")
            start = pads[k]
            token = ids[start]
            grid_list = grids[token]
            if used[token] >= len(grid_list):
                raise ValueError(f"input_ids hold more {names[token]}s than the {len(grid_list)} rows of "
                                 f"{names[token]}_grid_thw")
            t, h, w = grid_list[used[token]]
            count = t * h * w // merge_area
            if ids[start:start + count].count(token) != count:
                raise ValueError(
                    f"row {b}: {names[token]} {used[token]} (grid {[t, h, w]}) needs {count} consecutive "
                    f"{names[token]} pad tokens from index {start}, found {ids[start:start + count].count(token)}"
                )
            temporal = None
            if token == video_token_id and temporal_index is not None:
                temporal = temporal_index(t, used[token])
            used[token] += 1
            if start > cursor:
                chunks.append(torch.arange(next_pos, next_pos + start - cursor).expand(3, -1))
                next_pos += start - cursor
            item = vision_item_positions(t, h // spatial_merge_size, w // spatial_merge_size, next_pos, temporal)
            chunks.append(item)
            next_pos = int(item.max()) + 1
            cursor = start + count
        if cursor < len(ids):
            chunks.append(torch.arange(next_pos, next_pos + len(ids) - cursor).expand(3, -1))
        positions = torch.cat(chunks, dim=1)
        if keep is not None:
            position_ids[:, b, keep] = positions
        else:
            position_ids[:, b] = positions
        deltas.append(int(positions.max()) + 1 - length)
    for token, grid_list in grids.items():
        if used[token] != len(grid_list):
            raise ValueError(f"{names[token]}_grid_thw has {len(grid_list)} rows but input_ids announce "
                             f"{used[token]} {names[token]}s (<|vision_start|> followed by a {names[token]} pad token)")
    device = input_ids.device
    return position_ids.to(device), torch.tensor(deltas, dtype=torch.long, device=device)[:, None]


def _grid_rows(grid: torch.Tensor | None) -> list[list[int]]:
    if grid is None:
        return []
    if grid.dim() != 2 or grid.shape[-1] != 3:
        raise ValueError(f"a grid_thw must be [n_items, 3], got shape {tuple(grid.shape)}")
    return grid.tolist()


def mrope_decode_positions(past_length: int, length: int, rope_deltas: torch.Tensor) -> torch.Tensor:
    """``[3, B, length]`` ids for tokens after the prefill: ``cache position + rope_delta`` on every stream."""
    steps = torch.arange(past_length, past_length + length, device=rope_deltas.device)
    pos = steps[None, :] + rope_deltas.view(-1, 1)
    return pos[None].expand(3, *pos.shape)
