"""The decoder and GQA diagrams say what the code does: the modules they name exist, the links follow repeat_kv."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # no display, no network: the diagrams must render anywhere

import matplotlib.pyplot as plt
import pytest
import torch

from qwen_edu.models import Qwen2ForCausalLM, repeat_kv
from qwen_edu.models.presets import preset
from qwen_edu.viz.diagrams import DECODER_BLOCK_MODULES, draw_decoder_block, draw_gqa, gqa_kv_head


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (8, 2), (6, 3), (5, 1)])
def test_gqa_grouping_is_the_one_repeat_kv_uses(num_heads, num_kv_heads):
    # Tag each key/value head with its index, expand it as attention does, and read which one each
    # query head ends up with.
    kv = torch.arange(num_kv_heads, dtype=torch.float32).view(1, num_kv_heads, 1, 1)
    expanded = repeat_kv(kv, num_heads // num_kv_heads)[0, :, 0, 0].long().tolist()
    assert [gqa_kv_head(h, num_heads, num_kv_heads) for h in range(num_heads)] == expanded


def test_gqa_diagram_draws_one_link_per_query_head_to_its_kv_head():
    fig = draw_gqa(8, 2)
    links = sorted(line.get_gid() for line in fig.axes[0].lines if line.get_gid())
    assert links == sorted(f"q{h}->kv{h // 4}" for h in range(8))
    labels = {t.get_text() for t in fig.axes[0].texts}
    assert {f"q{h}" for h in range(8)} | {"kv0", "kv1"} <= labels
    plt.close(fig)


def test_gqa_diagram_draws_into_a_given_axes():
    fig, axes = plt.subplots(1, 2)
    assert draw_gqa(4, 4, ax=axes[1], title="MHA") is fig
    assert axes[1].get_title() == "MHA" and not axes[0].lines
    plt.close(fig)


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(6, 4), (4, 0)])
def test_gqa_rejects_head_counts_that_do_not_group(num_heads, num_kv_heads):
    with pytest.raises(ValueError, match=f"num_heads={num_heads}.*num_kv_heads={num_kv_heads}"):
        draw_gqa(num_heads, num_kv_heads)


def test_gqa_kv_head_rejects_a_query_head_out_of_range():
    with pytest.raises(ValueError, match="query_head=8"):
        gqa_kv_head(8, 8, 2)


def test_decoder_diagram_names_real_modules_and_renders_offline():
    with torch.device("meta"):
        model = Qwen2ForCausalLM(preset("tiny", tie_word_embeddings=False))
    modules = dict(model.named_modules())
    for name in DECODER_BLOCK_MODULES:
        assert name.format(i=0) in modules, name
    fig = draw_decoder_block()
    text = " ".join(t.get_text() for t in fig.axes[0].texts)
    for name in DECODER_BLOCK_MODULES:  # each named module appears (its last part inside the block)
        short = name.removeprefix("model.layers.{i}.").split(".")[-1]
        assert short in text, short
    png = io.BytesIO()
    fig.savefig(png, format="png")
    assert png.getvalue().startswith(b"\x89PNG")
    plt.close(fig)
