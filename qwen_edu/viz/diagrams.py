"""Static diagrams of the decoder, drawn with matplotlib so that they render offline everywhere.

- :func:`draw_decoder_block`: the pre-norm Qwen decoder from token ids to logits, every box labelled
  with the module name that holds its weights (the checkpoint keys of :mod:`qwen_edu.models`).
- :func:`draw_gqa`: which key/value head each query head reads under grouped-query attention
  (:func:`gqa_kv_head`, the same grouping as :func:`qwen_edu.models.repeat_kv`).

Both return the matplotlib ``Figure`` and draw into ``ax`` when one is given, so a chapter can put
several panels side by side. Nothing is fetched from the network (no web fonts, no images).
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Circle, FancyBboxPatch, Rectangle

__all__ = ["DECODER_BLOCK_MODULES", "draw_decoder_block", "draw_gqa", "gqa_kv_head"]

#: The modules the decoder diagram names, as they appear in ``Qwen2ForCausalLM.named_modules()``
#: (``{i}`` is the layer index). The tests check that each one exists in the model.
DECODER_BLOCK_MODULES: tuple[str, ...] = (
    "model.embed_tokens",
    "model.layers.{i}.input_layernorm",
    "model.layers.{i}.self_attn.q_proj",
    "model.layers.{i}.self_attn.k_proj",
    "model.layers.{i}.self_attn.v_proj",
    "model.layers.{i}.self_attn.o_proj",
    "model.layers.{i}.post_attention_layernorm",
    "model.layers.{i}.mlp.gate_proj",
    "model.layers.{i}.mlp.up_proj",
    "model.layers.{i}.mlp.down_proj",
    "model.norm",
    "lm_head",
)

_COLOURS = {
    "embed": "#e8e1f5",
    "norm": "#fff1c1",
    "attn": "#dfe7fd",
    "mlp": "#d8f0dc",
    "edge": "#4a4a4a",
    "residual": "#c0392b",
}


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
    else:
        fig = ax.figure
    return fig, ax


def _box(ax: Axes, x: float, y: float, w: float, h: float, colour: str, title: str,
         detail: str | None = None) -> None:
    """A rounded box centred at ``(x, y)``: a monospace module name on top, detail lines below it."""
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.15",
                                fc=colour, ec=_COLOURS["edge"], lw=1.0, zorder=2))
    if detail is None:
        ax.text(x, y, title, ha="center", va="center", family="monospace", fontsize=8.5, zorder=3)
        return
    top = y + h / 2
    ax.text(x, top - 0.2, title, ha="center", va="center", family="monospace", fontsize=8.5, zorder=3)
    ax.text(x, (top - 0.38 + y - h / 2) / 2, detail, ha="center", va="center", fontsize=7.2,
            color="#333", linespacing=1.3, zorder=3)


def _arrow(ax: Axes, start: tuple[float, float], end: tuple[float, float], colour: str | None = None,
           **style: Any) -> None:
    ax.annotate("", xy=end, xytext=start, zorder=1,
                arrowprops=dict(arrowstyle="-|>", color=colour or _COLOURS["edge"], lw=1.2,
                                shrinkA=0, shrinkB=0, **style))


def _add(ax: Axes, x: float, y: float) -> None:
    """The residual addition: a circled plus on the residual stream."""
    ax.add_patch(Circle((x, y), 0.28, fc="white", ec=_COLOURS["residual"], lw=1.4, zorder=3))
    ax.text(x, y, "+", ha="center", va="center", fontsize=12, color=_COLOURS["residual"], zorder=4)


def draw_decoder_block(ax: Axes | None = None) -> Figure:
    """The Qwen decoder (Qwen-1 to Qwen2.5 share it): embedding, N pre-norm blocks, final norm, LM head.

    The red line is the residual stream: each sub-layer reads a normalised copy of it and adds its
    output back, and the stream itself is never normalised inside a block. Box titles are the module
    names of :data:`DECODER_BLOCK_MODULES` (shortened inside the block, where ``model.layers.{i}.`` is
    understood).
    """
    fig, ax = _axes(ax, (7.2, 8.8))
    stream_x, branch_x = 2.4, 6.3
    red = _COLOURS["residual"]

    ax.text(stream_x, 0.35, "input ids  [B, L]", ha="center", va="center", fontsize=9)
    _arrow(ax, (stream_x, 0.6), (stream_x, 1.05))
    _box(ax, stream_x, 1.45, 3.4, 0.8, _COLOURS["embed"], "model.embed_tokens", "lookup, no scaling")
    ax.add_patch(Rectangle((0.3, 2.35), 9.4, 9.35, fc="none", ec="#888", lw=1.0, ls="--", zorder=0))
    ax.text(0.5, 11.4, "model.layers.{i}   (repeated N times)", ha="left", va="center", fontsize=8.5,
            family="monospace", color="#555")

    def branch(y0: float, norm: str, name: str, detail: str, colour: str, height: float) -> float:
        """Stream -> norm -> sub-layer -> back onto the stream; returns the height of the addition."""
        ax.plot([stream_x, branch_x], [y0, y0], color=red, lw=1.4, zorder=1)
        _arrow(ax, (branch_x, y0), (branch_x, y0 + 0.45), red)
        _box(ax, branch_x, y0 + 0.8, 4.4, 0.7, _COLOURS["norm"], norm, "RMSNorm")
        _arrow(ax, (branch_x, y0 + 1.15), (branch_x, y0 + 1.5))
        _box(ax, branch_x, y0 + 1.5 + height / 2, 5.8, height, colour, name, detail)
        y_add = y0 + 1.5 + height + 0.4
        ax.plot([branch_x, branch_x], [y0 + 1.5 + height, y_add], color=_COLOURS["edge"], lw=1.2, zorder=1)
        _arrow(ax, (branch_x, y_add), (stream_x + 0.28, y_add))
        _add(ax, stream_x, y_add)
        ax.plot([stream_x, stream_x], [y0, y_add - 0.28], color=red, lw=2.2, zorder=1)
        return y_add

    _arrow(ax, (stream_x, 1.85), (stream_x, 2.9), red)
    y_attn = branch(3.0, "input_layernorm", "self_attn",
                    "q_proj, k_proj, v_proj (with bias)\nRoPE on q and k, causal softmax\n"
                    "H_kv key/value heads shared by H query heads\no_proj (no bias)", _COLOURS["attn"], 2.0)
    ax.plot([stream_x, stream_x], [y_attn + 0.28, y_attn + 0.5], color=red, lw=2.2, zorder=1)
    y_mlp = branch(y_attn + 0.5, "post_attention_layernorm", "mlp  (SwiGLU)",
                   "down_proj( silu(gate_proj(x)) * up_proj(x) )\nno biases; width d_ff about 8/3 d",
                   _COLOURS["mlp"], 1.4)
    ax.text(stream_x - 0.3, (3.0 + y_mlp) / 2, "residual stream  [B, L, d]", rotation=90, ha="right",
            va="center", fontsize=8, color=red)
    _arrow(ax, (stream_x, y_mlp + 0.28), (stream_x, 12.15), red)
    _box(ax, stream_x, 12.5, 3.4, 0.7, _COLOURS["norm"], "model.norm", "final RMSNorm")
    _arrow(ax, (stream_x, 12.85), (stream_x, 13.25))
    _box(ax, stream_x, 13.65, 3.4, 0.8, _COLOURS["embed"], "lm_head", "untied (Qwen-1) or tied")
    _arrow(ax, (stream_x, 14.05), (stream_x, 14.45))
    ax.text(stream_x, 14.7, "logits  [B, L, V]", ha="center", va="center", fontsize=9)

    ax.set_xlim(0, 10)
    ax.set_ylim(0, 15.0)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title("The Qwen decoder: pre-norm blocks on a residual stream", fontsize=10)
    return fig


def gqa_kv_head(query_head: int, num_heads: int, num_kv_heads: int) -> int:
    """The key/value head that query head ``query_head`` reads: consecutive groups of ``H / H_kv``."""
    if num_kv_heads < 1 or num_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a positive multiple of num_kv_heads={num_kv_heads}")
    if not 0 <= query_head < num_heads:
        raise ValueError(f"query_head={query_head} is outside 0..{num_heads - 1}")
    return query_head // (num_heads // num_kv_heads)


def draw_gqa(num_heads: int, num_kv_heads: int, ax: Axes | None = None, title: str | None = None) -> Figure:
    """Query heads (top) linked to the key/value head each one reads (bottom), coloured by group.

    ``num_kv_heads == num_heads`` is multi-head attention, ``1`` is multi-query attention. Each link
    carries the ``gid`` ``"q{h}->kv{g}"`` so that tests (and curious readers) can check the grouping.
    """
    gqa_kv_head(0, num_heads, num_kv_heads)  # validates the head counts
    fig, ax = _axes(ax, (max(3.0, 0.55 * num_heads + 1), 2.6))
    palette = plt.get_cmap("tab10")
    q_x = [h + 0.5 for h in range(num_heads)]
    group = num_heads // num_kv_heads
    kv_x = [g * group + group / 2 for g in range(num_kv_heads)]  # each kv head under its group
    for h, x in enumerate(q_x):
        g = gqa_kv_head(h, num_heads, num_kv_heads)
        colour = palette(g % 10)
        ax.add_patch(FancyBboxPatch((x - 0.35, 2.0), 0.7, 0.55, boxstyle="round,pad=0.02",
                                    fc=colour, ec="#333", alpha=0.85, zorder=2))
        ax.text(x, 2.275, f"q{h}", ha="center", va="center", fontsize=7, zorder=3)
        (line,) = ax.plot([x, kv_x[g]], [2.0, 0.85], color=colour, lw=1.3, zorder=1)
        line.set_gid(f"q{h}->kv{g}")
    for g, x in enumerate(kv_x):
        width = min(0.9, 0.7 * group)
        ax.add_patch(FancyBboxPatch((x - width / 2, 0.3), width, 0.55, boxstyle="round,pad=0.02",
                                    fc=palette(g % 10), ec="#333", zorder=2))
        ax.text(x, 0.575, f"kv{g}", ha="center", va="center", fontsize=7, zorder=3)
    ax.text(-0.15, 2.275, "query\nheads", ha="right", va="center", fontsize=7.5)
    ax.text(-0.15, 0.575, "key/value\nheads", ha="right", va="center", fontsize=7.5)
    ax.set_xlim(-1.6, num_heads + 0.1)
    ax.set_ylim(0.1, 2.8)
    ax.axis("off")
    default = f"H={num_heads} query heads, H_kv={num_kv_heads}: {group} per key/value head"
    ax.set_title(title or default, fontsize=9)
    return fig
