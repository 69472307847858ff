"""The interactive RoPE explorer.

The explorer is a self-contained HTML fragment: controls, an SVG canvas, and a small script that does
the RoPE arithmetic in the browser. Because nothing runs in Python after the cell executes, the same
widget stays interactive in Jupyter, in Colab and on the static pages of the rendered book. The script's
formulas are checked against the Python reference in ``tests/test_viz_rope.py``.
"""

from __future__ import annotations

import html
import itertools
import json
from importlib import resources

__all__ = ["RopeExplorer", "rope_explorer", "SCALING_METHODS"]

SCALING_METHODS = ("none", "linear", "ntk", "dynamic", "qwen1_ntk", "yarn")
_counter = itertools.count()


def _script() -> str:
    return resources.files("qwen_edu.viz").joinpath("rope_explorer.js").read_text(encoding="utf-8")


class RopeExplorer:
    """An HTML widget; display it in a notebook (``_repr_html_``) or write it with :meth:`to_html`."""

    def __init__(self, **state: float | int | str) -> None:
        self.state = state
        self.element_id = f"qwen-rope-{next(_counter)}"

    def _repr_html_(self) -> str:
        state = json.dumps(self.state)
        return (
            f'<div id="{self.element_id}" class="qwen-rope-explorer" '
            f'data-state="{html.escape(state)}"></div>\n'
            f"<script>{_script()}\n"
            f'window.QwenRope.mount(document.getElementById("{self.element_id}"), {state});</script>'
        )

    def to_html(self, title: str = "RoPE explorer") -> str:
        """A complete standalone page (handy for sharing, and for the browser test)."""
        return (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body>{self._repr_html_()}</body></html>"
        )


def rope_explorer(
    base: float = 10000.0,
    head_dim: int = 128,
    position: int = 100,
    method: str = "none",
    factor: float = 4.0,
    original_max_position: int = 2048,
) -> RopeExplorer:
    """Build the explorer with its controls set to these starting values.

    Args:
        base: RoPE base (``rope_theta``); Qwen-1 uses 10,000, Qwen2 1,000,000.
        head_dim: rotary dimension (even); pairs are ``(i, i + head_dim/2)``.
        position: the token position whose rotations are shown, and the sequence length used by the
            dynamic methods.
        method: one of :data:`SCALING_METHODS`.
        factor: context-extension factor (>= 1).
        original_max_position: the context length the model was trained at.
    """
    if head_dim % 2 or head_dim <= 2:
        raise ValueError(f"head_dim must be an even number > 2, got {head_dim}")
    if method not in SCALING_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(SCALING_METHODS)}")
    if factor < 1:
        raise ValueError(f"factor must be >= 1 (it extends the context), got {factor}")
    if base <= 1:
        raise ValueError(f"base must be > 1, got {base}")
    if position < 0 or original_max_position < 1:
        raise ValueError("position must be >= 0 and original_max_position >= 1")
    return RopeExplorer(
        base=float(base),
        dim=int(head_dim),
        position=int(position),
        method=method,
        factor=float(factor),
        originalMax=int(original_max_position),
    )
