"""Qwen2.5-VL's window attention: most ViT blocks attend inside small windows, a few over the whole frame.

Full attention over a frame of ``N`` patches costs ``N^2`` query-key pairs, so a 1,000 x 1,000 pixel picture
(about 5,000 patches) costs 25 million pairs per head and block. Qwen2.5-VL cuts each frame into windows of
``window_size`` pixels (112 px = 8 x 8 patches = 4 x 4 merged tokens) and lets most blocks attend only inside
their window -- at most 64 x 64 pairs per window, so the cost grows *linearly* with the picture's area. A few
blocks (``fullatt_block_indexes``, 4 of 32 in the released towers) still attend over the whole frame, so
information crosses window borders.

Windows are made of whole merge units (the 2 x 2 patches that become one LLM token), and chapter 10's patch
order already keeps a unit's four patches consecutive. So a window partition is a **permutation of merge
units** (:func:`window_partition`): reorder the units window by window, and each window becomes one contiguous
segment of the packed sequence -- the same ``cu_seqlens`` attention as before does the rest. After the last
block the merger turns each unit into a token, and :func:`unpermute_units` restores the original order.

Partial windows at the right and bottom borders are kept (smaller), empty ones are dropped; windows are
ordered frame, window row, window column, and the units inside a window row by row, as in the reference.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["window_partition", "permute_units", "unpermute_units", "attention_pairs"]


@functools.lru_cache(maxsize=64)
def _partition(grid: tuple[tuple[int, int, int], ...], window: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    order, lengths, offset = [], [], 0
    for t, h, w in grid:
        rows, cols = h // merge, w // merge  # merged grid of one frame
        n_rows, n_cols = -(-rows // window), -(-cols // window)  # windows per column / row (ceil)
        units = torch.arange(t * rows * cols).view(t, rows, cols)
        # Pad to whole windows with -1, then read window by window: [t, wr, wc, r, c].
        padded = torch.full((t, n_rows * window, n_cols * window), -1, dtype=torch.long)
        padded[:, :rows, :cols] = units
        blocks = padded.view(t, n_rows, window, n_cols, window).permute(0, 1, 3, 2, 4).reshape(-1, window * window)
        valid = blocks >= 0
        order.append(blocks[valid] + offset)
        lengths.append(valid.sum(-1))
        offset += t * rows * cols
    index = torch.cat(order)
    cu = torch.nn.functional.pad(torch.cat(lengths).cumsum(0) * merge**2, (1, 0)).to(torch.int32)
    return index, cu


def window_partition(grid_thw: torch.Tensor, window_size: int = 112, patch_size: int = 14,
                     spatial_merge_size: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """``(window_index, cu_window_seqlens)`` for the packed items of ``grid_thw [n_items, 3]`` (patch units).

    ``window_index [n_units]`` lists the merge units (numbered in their packed order, across items) window by
    window; ``cu_window_seqlens [n_windows + 1]`` (int32) are the window boundaries in the *permuted* sequence,
    in patches (4 per unit). ``window_size`` is in pixels and must cover whole merge units.
    """
    unit_px = patch_size * spatial_merge_size
    if window_size < unit_px or window_size % unit_px:
        raise ValueError(f"window_size={window_size} px must be a positive multiple of patch_size x spatial_merge_size"
                         f" = {unit_px} px (whole merge units)")
    if grid_thw.dim() != 2 or grid_thw.shape[-1] != 3:
        raise ValueError(f"grid_thw must be [n_items, 3], got shape {tuple(grid_thw.shape)}")
    grid = tuple(tuple(int(v) for v in row) for row in grid_thw.tolist())
    index, cu = _partition(grid, window_size // unit_px, spatial_merge_size)
    return index.to(grid_thw.device), cu.to(grid_thw.device)


def permute_units(x: torch.Tensor, window_index: torch.Tensor, unit: int = 4) -> torch.Tensor:
    """Reorder the rows of ``x [N, ...]`` in blocks of ``unit`` consecutive rows (one merge unit each)."""
    return x.reshape(-1, unit, *x.shape[1:])[window_index].reshape(x.shape)


def unpermute_units(tokens: torch.Tensor, window_index: torch.Tensor) -> torch.Tensor:
    """The inverse for merged tokens: ``tokens[k]`` came from unit ``window_index[k]``; put it back there."""
    return tokens[torch.argsort(window_index)]


def attention_pairs(cu_seqlens: torch.Tensor) -> int:
    """How many query-key pairs attention inside the segments of ``cu_seqlens`` computes: ``sum(len^2)``."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return int((lengths * lengths).sum())
