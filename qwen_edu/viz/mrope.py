"""The interactive M-RoPE explorer (Qwen2-VL, Qwen2.5-VL and Qwen3-VL positions).

Build a prompt -- text, an image of a chosen size, text, a video of chosen frames and size, text -- and see for
every token its ``(t, h, w)`` ids as a colour strip next to the plain 1D ids, the image and video tokens on
their merged grids, how ``mrope_section`` splits the rotary frequencies between the three streams, and the
rotation angles of a chosen token in each band. The widget is an HTML fragment whose script
(``mrope_explorer.js``) does all the arithmetic in the browser, so it stays interactive in Jupyter, in Colab
and on the static pages of the book. ``tests/test_viz_mrope.py`` checks its ids against
:func:`qwen_edu.vision.mrope.get_rope_index` and its ``smart_resize`` against the Python one.

A ``model`` switch shows what the later generations changed (chapter 12): Qwen2.5-VL's absolute time (a
frame-rate slider and the seconds per frame group it implies, ids per second), Qwen3-VL's timestamped frame
groups, 16-pixel patches and interleaved frequency bands; ``tests/test_qwen2_5_vl_qwen3_vl_explorer.py`` checks
those ids against :func:`~qwen_edu.vision.video_time.qwen2_5_vl_rope_index` and
:func:`~qwen_edu.vision.video_time.qwen3_vl_rope_index`.
"""

from __future__ import annotations

import html
import itertools
import json
from importlib import resources
from typing import Any

__all__ = ["MropeExplorer", "mrope_explorer", "explorer_script"]

_ids = itertools.count()


def explorer_script() -> str:
    """The explorer's JavaScript (defines ``window.QwenMrope``; also loads under node as ``globalThis``)."""
    return resources.files("qwen_edu.viz").joinpath("mrope_explorer.js").read_text(encoding="utf-8")


class MropeExplorer:
    """Displays itself in a notebook (``_repr_html_``); :meth:`to_html` gives a standalone page."""

    css_class = "qwen-mrope-explorer"

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = dict(state)
        self.element_id = f"qwen-mrope-{next(_ids)}"

    def _repr_html_(self) -> str:
        state = json.dumps(self.state)
        mount = f'window.QwenMrope.mount(document.getElementById("{self.element_id}"), {state});'
        return "\n".join([
            f'<div id="{self.element_id}" class="{self.css_class}" data-state="{html.escape(state)}"></div>',
            f"<script>{explorer_script()}\n{mount}</script>",
        ])

    def to_html(self, title: str = "M-RoPE explorer") -> str:
        head = f"<meta charset='utf-8'><title>{html.escape(title)}</title>"
        return f"<!doctype html><html><head>{head}</head><body>{self._repr_html_()}</body></html>"


_MODELS = {"qwen2_vl": ("contiguous", 1_000_000.0), "qwen2_5_vl": ("contiguous", 1_000_000.0),
           "qwen3_vl": ("interleaved", 5_000_000.0)}


def mrope_explorer(image_height: int = 224, image_width: int = 308, video_frames: int = 8, video_height: int = 112,
                   video_width: int = 168, text_before: int = 3, text_between: int = 4, text_after: int = 3,
                   token: int = 20, layout: str | None = None, rope_theta: float | None = None,
                   model: str = "qwen2_vl", fps: float = 2.0, tokens_per_second: int = 2) -> MropeExplorer:
    """The explorer with its controls at these starting values.

    Sizes are in pixels; the explorer resizes them with ``smart_resize`` (the image processor's pixel bounds,
    also for the video frames; factor 28, or 32 for Qwen3-VL's 16-pixel patches) and shows the resulting
    grids. ``model`` is ``"qwen2_vl"``, ``"qwen2_5_vl"`` (video frame groups on the clock: ``fps`` frames per
    second, ``2 / fps`` seconds per frame group, ``tokens_per_second`` ids per second) or ``"qwen3_vl"`` (each
    frame group after its timestamp text). ``layout`` is ``"contiguous"`` (``mrope_section = [16, 24, 24]``)
    or ``"interleaved"`` (``[24, 20, 20]``); by default the model's own (and ``rope_theta`` too: 1e6, or 5e6
    for Qwen3-VL). ``token`` is the index of the token whose rotations are drawn.
    """
    sizes = dict(image_height=image_height, image_width=image_width, video_height=video_height,
                 video_width=video_width)
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1 pixel, got {value}")
    if video_frames < 1:
        raise ValueError(f"video_frames must be at least 1, got {video_frames}")
    if min(text_before, text_between, text_after, token) < 0:
        raise ValueError("text lengths and the token index must be >= 0")
    if model not in _MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {sorted(_MODELS)}")
    if not 0 < fps <= 60:
        raise ValueError(f"fps must be in (0, 60], got {fps}")
    if tokens_per_second < 1:
        raise ValueError(f"tokens_per_second must be >= 1, got {tokens_per_second}")
    layout = layout if layout is not None else _MODELS[model][0]
    rope_theta = rope_theta if rope_theta is not None else _MODELS[model][1]
    sections = {"contiguous": [16, 24, 24], "interleaved": [24, 20, 20]}
    if layout not in sections:
        raise ValueError(f"unknown layout {layout!r}; choose 'contiguous' or 'interleaved'")
    if rope_theta <= 1:
        raise ValueError(f"rope_theta must be > 1, got {rope_theta}")
    return MropeExplorer(dict(
        imageHeight=int(image_height), imageWidth=int(image_width), videoFrames=int(video_frames),
        videoHeight=int(video_height), videoWidth=int(video_width), textBefore=int(text_before),
        textBetween=int(text_between), textAfter=int(text_after), token=int(token), layout=layout,
        section=sections[layout], theta=float(rope_theta), model=model, fps=float(fps),
        tokensPerSecond=int(tokens_per_second),
    ))
