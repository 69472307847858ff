"""The four-model RLHF loop of PPO as a matplotlib diagram (renders offline, no image files).

:func:`draw_rlhf_loop` draws what one PPO iteration does (:mod:`qwen_edu.alignment.ppo`): the policy
samples replies to prompts; the frozen reference and reward model and the trained value model read
them; the KL-shaped rewards and GAE give advantages; the update changes the policy and the value
model (and, with pre-training gradient mixing, also sees pre-training text).
"""

from __future__ import annotations

from typing import Any

__all__ = ["RLHF_BOXES", "draw_rlhf_loop"]

TRAINED, FROZEN, DATA, STEP = "#cfe3f7", "#e6e6e6", "#fdf1d6", "#ffffff"

# name -> (x, y, width, height, colour, label): the boxes, in axes units (0..12 x 0..6).
RLHF_BOXES: dict[str, tuple[float, float, float, float, str, str]] = {
    "prompts": (0.1, 4.25, 1.6, 0.9, DATA, "prompts $x$"),
    "policy": (2.3, 4.05, 2.3, 1.3, TRAINED, "policy $\\pi_\\theta$\ntrained; starts as\nthe SFT model"),
    "reference": (5.9, 4.75, 2.5, 0.95, FROZEN, "reference $\\pi_{ref}$\nfrozen copy of SFT"),
    "reward": (5.9, 3.25, 2.5, 0.95, FROZEN, "reward model $r$\nfrozen"),
    "value": (5.9, 1.7, 2.5, 1.05, TRAINED, "value model $V$\ntrained; starts from\nthe reward model"),
    "advantages": (9.3, 3.0, 2.6, 1.4, STEP, "rewards $-\\beta\\,KL_t$\n+ score at the end;\nGAE: advantages $A_t$"),
    "update": (5.9, 0.1, 2.5, 1.1, STEP, "PPO update\nclipped policy loss\n+ value loss"),
    "pretrain": (1.9, 0.2, 2.7, 0.9, DATA, "pre-training text\n(Qwen mixes in its loss)"),
}

Anchor = tuple[float, float]  # a point of a box, as fractions of its width and height


def _point(box: tuple[float, float, float, float, str, str], at: str | Anchor) -> tuple[float, float]:
    x, y, w, h = box[:4]
    fx, fy = {"left": (0, 0.5), "right": (1, 0.5), "top": (0.5, 1), "bottom": (0.5, 0)}[at] if isinstance(at, str) \
        else at
    return x + fx * w, y + fy * h


def draw_rlhf_loop(ax: Any = None, *, show_pretraining: bool = True) -> Any:
    """Draw the loop on ``ax`` (a new 11 x 5.2 inch figure when ``None``); returns the figure.

    Blue boxes are trained, grey ones frozen, yellow ones data. ``show_pretraining`` adds the
    pre-training text that Qwen mixes into the update (dashed: an option, off in the book's run).
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch

    if ax is None:
        _, ax = plt.subplots(figsize=(11, 5.2))
    ax.set_xlim(0, 12)
    ax.set_ylim(0, 6)
    ax.set_axis_off()
    boxes = {k: v for k, v in RLHF_BOXES.items() if show_pretraining or k != "pretrain"}
    for name, (x, y, w, h, colour, label) in boxes.items():
        dashed = name == "pretrain"
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.04,rounding_size=0.12", fc=colour,
                                    ec="#555555", lw=1.2, ls="--" if dashed else "-"))
        ax.text(x + w / 2, y + h / 2, label, ha="center", va="center", fontsize=9.5)

    def arrow(a: str, a_at: str | Anchor, b: str, b_at: str | Anchor, text: str = "", *,
              dashed: bool = False, rad: float = 0.0, text_at: tuple[float, float] | None = None,
              colour: str = "#333333") -> None:
        start, end = _point(boxes[a], a_at), _point(boxes[b], b_at)
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, lw=1.3, color=colour,
                                     ls="--" if dashed else "-", connectionstyle=f"arc3,rad={rad}",
                                     shrinkA=2, shrinkB=2))
        if text:
            tx, ty = text_at or ((start[0] + end[0]) / 2, (start[1] + end[1]) / 2)
            ax.text(tx, ty, text, ha="center", va="center", fontsize=8.5, color=colour,
                    bbox={"fc": "white", "ec": "none", "pad": 0.5})

    arrow("prompts", "right", "policy", "left")
    arrow("policy", (1, 0.75), "reference", "left", rad=-0.1)
    arrow("policy", "right", "reward", "left")
    arrow("policy", (1, 0.25), "value", "left", rad=0.1)
    ax.text(5.15, 5.65, "sampled replies $y$", ha="center", va="center", fontsize=8.5)
    arrow("reference", "right", "advantages", "top", "$\\log\\pi_{ref}(y_t)$", rad=-0.3, text_at=(10.2, 5.05))
    arrow("reward", "right", "advantages", (0, 0.6), "score", text_at=(8.85, 3.83))
    arrow("value", "right", "advantages", "bottom", "$V_t$", rad=0.3, text_at=(10.15, 2.2))
    arrow("advantages", (0.75, 0), "update", "right", "$A_t$, returns", rad=-0.3, text_at=(10.2, 0.95))
    blue = "#1f5fa8"
    arrow("update", "top", "value", "bottom", "gradient", dashed=True, colour=blue, text_at=(7.15, 1.45))
    arrow("update", (0, 0.8), "policy", "bottom", "gradient", dashed=True, colour=blue, rad=-0.2,
          text_at=(4.55, 2.6))
    if show_pretraining:
        arrow("pretrain", "right", "update", (0, 0.3), dashed=True, colour="#8a6d1f")
    legend = [Patch(fc=TRAINED, ec="#555555", label="trained"), Patch(fc=FROZEN, ec="#555555", label="frozen"),
              Patch(fc=DATA, ec="#555555", label="data")]
    ax.legend(handles=legend, loc="upper left", ncol=3, frameon=False, fontsize=8.5, bbox_to_anchor=(0.0, 1.0))
    ax.set_title("One PPO iteration: four models", fontsize=11)
    return ax.figure
