"""The four-model RLHF diagram draws offline with matplotlib (no image files, no network)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

from qwen_edu.alignment.diagram import RLHF_BOXES, draw_rlhf_loop  # noqa: E402


def test_the_loop_has_the_four_models_their_inputs_and_the_update():
    fig = draw_rlhf_loop()
    ax = fig.axes[0]
    texts = " ".join(t.get_text() for t in ax.texts)
    for word in ("policy", "reference", "reward model", "value model", "PPO update", "pre-training text"):
        assert word in texts
    boxes = [p for p in ax.patches if isinstance(p, FancyBboxPatch)]
    arrows = [p for p in ax.patches if isinstance(p, FancyArrowPatch)]
    # prompts -> policy -> (reference, reward, value) -> advantages -> update -> (policy, value),
    # and the pre-training text -> update: 11 arrows.
    assert len(boxes) == len(RLHF_BOXES) and len(arrows) == 11
    plt.close(fig)

    fig = draw_rlhf_loop(show_pretraining=False)
    ax = fig.axes[0]
    assert "pre-training text" not in " ".join(t.get_text() for t in ax.texts)
    assert len([p for p in ax.patches if isinstance(p, FancyBboxPatch)]) == len(RLHF_BOXES) - 1
    assert len([p for p in ax.patches if isinstance(p, FancyArrowPatch)]) == 10
    plt.close(fig)


def test_it_draws_into_a_given_axes():
    fig, (left, right) = plt.subplots(1, 2)
    assert draw_rlhf_loop(right) is fig
    assert right.patches and not left.patches
    plt.close(fig)
