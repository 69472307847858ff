"""How a video's clock reaches the LLM: Qwen2.5-VL's absolute-time ids and Qwen3-VL's timestamp text.

In Qwen2-VL a video's temporal M-RoPE id steps by 1 per frame group, whatever the frame rate: the same two
seconds are 1 step at 1 frame per second and 4 steps at 4. Two later answers:

* **Qwen2.5-VL -- absolute time.** Frame group ``tau`` gets the temporal id
  ``start + floor(tau * second_per_grid * tokens_per_second)``: ids count *time*, ``tokens_per_second`` (2 in
  the released models) per second, and a frame group spans ``second_per_grid = temporal_patch_size / fps``
  seconds. Any frame rate lines up with the same clock (:func:`absolute_time_index`).
* **Qwen3-VL -- timestamps in the text.** Every frame group becomes its own vision item, preceded by its time
  as ordinary text, ``<1.2 seconds>`` (:func:`timestamp_text`, :func:`frame_group_timestamps`); the M-RoPE ids
  are computed per frame group (:func:`split_video_grid`), so the temporal id carries no clock at all and the
  model reads the time like any other words.

Both follow Qwen's own position code (``qwen-vl-finetune/qwenvl/data/rope2d.py``): its temporal product is
``(tau * second_per_grid) * 2`` in float32, truncated -- reproduced here op for op.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from qwen_edu.vision.mrope import get_rope_index

__all__ = ["second_per_grid", "absolute_time_index", "split_video_grid", "frame_group_timestamps",
           "timestamp_text", "qwen2_5_vl_rope_index", "qwen3_vl_rope_index"]


def second_per_grid(fps: float, temporal_patch_size: int = 2) -> float:
    """Seconds one temporal patch (frame group) of a video sampled at ``fps`` frames per second spans."""
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return temporal_patch_size / fps


def absolute_time_index(grid_t: int, second_per_grid: float | torch.Tensor, tokens_per_second: int = 2,
                        ) -> torch.Tensor:
    """``[grid_t]`` temporal offsets ``floor(tau * second_per_grid * tokens_per_second)`` (Qwen2.5-VL).

    Computed as Qwen's code computes it: ``tau * second_per_grid`` in float32, times ``tokens_per_second``, then
    truncated (``.long()``); e.g. 3 fps (2/3 s per grid, 4/3 ids per group) gives 0, 1, 2, 4.
    """
    if grid_t < 1:
        raise ValueError(f"grid_t must be >= 1, got {grid_t}")
    seconds = torch.as_tensor(second_per_grid, dtype=torch.float32)
    if seconds.dim() != 0 or not bool(seconds >= 0):
        raise ValueError(f"second_per_grid must be one non-negative number, got {second_per_grid!r}")
    return ((torch.arange(grid_t) * seconds) * tokens_per_second).long()


def split_video_grid(video_grid_thw: torch.Tensor) -> torch.Tensor:
    """One ``(1, h, w)`` row per frame group: how Qwen3-VL counts a video whose frames are separate items."""
    if video_grid_thw.dim() != 2 or video_grid_thw.shape[-1] != 3:
        raise ValueError(f"video_grid_thw must be [n_videos, 3], got shape {tuple(video_grid_thw.shape)}")
    rows = torch.repeat_interleave(video_grid_thw, video_grid_thw[:, 0], dim=0)
    rows[:, 0] = 1
    return rows


def frame_group_timestamps(frame_indices: Sequence[int], video_fps: float, temporal_patch_size: int = 2,
                           ) -> list[float]:
    """Seconds of each frame group: the mean time of its first and last frame (Qwen3-VL's processor).

    ``frame_indices`` are the sampled frames' indices in the source video (played at ``video_fps``); the list is
    padded to whole groups by repeating the last index, as the frames themselves are.
    """
    if video_fps <= 0:
        raise ValueError(f"video_fps must be positive, got {video_fps}")
    indices = [int(i) for i in frame_indices]
    if not indices:
        raise ValueError("a video needs at least one frame")
    indices += [indices[-1]] * (-len(indices) % temporal_patch_size)
    times = [i / video_fps for i in indices]
    return [(times[g] + times[g + temporal_patch_size - 1]) / 2 for g in range(0, len(times), temporal_patch_size)]


def timestamp_text(seconds: float) -> str:
    """``<1.2 seconds>``: the text before a frame group (one decimal, Python's rounding of the binary value)."""
    return f"<{seconds:.1f} seconds>"


def qwen2_5_vl_rope_index(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                          video_grid_thw: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                          second_per_grid_ts: torch.Tensor | Sequence[float] | None = None,
                          tokens_per_second: int = 2, **token_ids: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL's M-RoPE ids: chapter 10's rule (:func:`~qwen_edu.vision.mrope.get_rope_index`, Qwen's
    rope2d.py) with video ``k``'s temporal ids on the clock, ``second_per_grid_ts[k]`` seconds per frame group
    (1.0 when absent, as in Qwen's code). ``token_ids`` are get_rope_index's token-id keywords."""
    seconds = None if second_per_grid_ts is None else torch.as_tensor(second_per_grid_ts, dtype=torch.float32)
    n_videos = 0 if video_grid_thw is None else video_grid_thw.shape[0]
    if seconds is not None and seconds.shape != (n_videos,):
        raise ValueError(f"second_per_grid_ts needs one value per video: got shape {tuple(seconds.shape)} "
                         f"for {n_videos} video(s)")

    def clock(grid_t: int, video: int) -> torch.Tensor:
        return absolute_time_index(grid_t, seconds[video] if seconds is not None else 1.0, tokens_per_second)

    return get_rope_index(input_ids, image_grid_thw, video_grid_thw, attention_mask, temporal_index=clock, **token_ids)


def qwen3_vl_rope_index(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                        video_grid_thw: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                        **token_ids: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-VL's M-RoPE ids: every frame group of a video is its own item (announced by its own vision start,
    after its timestamp text), so ``video_grid_thw`` is split per frame group; no clock in the temporal id."""
    frames = split_video_grid(video_grid_thw) if video_grid_thw is not None else None
    return get_rope_index(input_ids, image_grid_thw, frames, attention_mask, **token_ids)
