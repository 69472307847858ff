"""The RoPE explorer: its in-browser math equals the reference, and its controls redraw the picture."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Qwen2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from qwen_edu.viz import SCALING_METHODS, rope_explorer
from tests.browser import browser_page  # noqa: F401  (fixture)


def reference_inv_freq(method: str, base: float, dim: int, factor: float, original: int, seq_len: int):
    """transformers' RoPE initialisers where they exist, the published formulas elsewhere."""
    arange = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if method == "none":
        return 1.0 / base**arange, 1.0
    if method == "ntk":
        return 1.0 / (base * factor ** (dim / (dim - 2))) ** arange, 1.0
    if method == "qwen1_ntk":
        alpha = max(2 ** math.ceil(math.log2(seq_len / original) + 1) - 1, 1)
        return 1.0 / (base * alpha ** (dim / (dim - 2))) ** arange, 1.0
    parameters = {"rope_type": method, "factor": factor, "rope_theta": base}
    if method == "yarn":
        parameters["original_max_position_embeddings"] = original
    config = Qwen2Config(
        hidden_size=dim * 2, num_attention_heads=2, max_position_embeddings=original, rope_parameters=parameters
    )
    kwargs = {"seq_len": seq_len} if method == "dynamic" else {}
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[method](config, "cpu", **kwargs)
    return inv_freq, scaling


@pytest.fixture(scope="module")
def explorer_page(browser_page, tmp_path_factory):  # noqa: F811
    page_file = tmp_path_factory.mktemp("viz") / "rope.html"
    page_file.write_text(rope_explorer(method="yarn", position=3000).to_html())
    browser_page.goto(page_file.as_uri())
    browser_page.wait_for_selector("polyline.scaled-wavelength")
    return browser_page


CASES = [
    (method, base, dim, factor, original, seq_len)
    for method in SCALING_METHODS
    for base, dim in [(10000.0, 128), (1_000_000.0, 64)]
    for factor, original, seq_len in [(4.0, 2048, 5000), (2.0, 8192, 16384), (8.0, 512, 300)]
]


@pytest.mark.parametrize("method,base,dim,factor,original,seq_len", CASES)
def test_browser_math_matches_reference(explorer_page, method, base, dim, factor, original, seq_len):
    result = explorer_page.evaluate(
        "p => window.QwenRope.invFreq(p)",
        {"method": method, "base": base, "dim": dim, "factor": factor, "originalMax": original, "seqLen": seq_len},
    )
    expected, scaling = reference_inv_freq(method, base, dim, factor, original, seq_len)
    # The browser computes in float64; the reference in float32.
    torch.testing.assert_close(torch.tensor(result["invFreq"], dtype=torch.float32), expected.float(),
                               rtol=2e-6, atol=0)
    assert result["attentionScaling"] == pytest.approx(scaling, rel=1e-12)


def test_qwen1_alpha_matches_the_published_examples(explorer_page):
    """Qwen-1 with seq_length 8192: alpha 1 up to 8192 tokens, then 3, 7, 15; alpha 3 -> base ~30527.7."""
    alphas = [
        explorer_page.evaluate(
            "n => window.QwenRope.invFreq({method: 'qwen1_ntk', base: 10000, dim: 128, factor: 1,"
            " originalMax: 8192, seqLen: n}).alpha",
            n,
        )
        for n in (100, 8192, 8193, 16384, 16385, 32768, 32769)
    ]
    assert alphas == [1, 1, 3, 3, 7, 7, 15]
    lowest_two = explorer_page.evaluate(
        "() => window.QwenRope.invFreq({method: 'qwen1_ntk', base: 10000, dim: 128, factor: 1,"
        " originalMax: 8192, seqLen: 9000}).invFreq[1]"
    )
    assert 1 / lowest_two ** (128 / 2) == pytest.approx(30527.7, rel=1e-5)


def _wavelength_points(page) -> str:
    return page.get_attribute("polyline.scaled-wavelength", "points")


def _set(page, selector: str, value: str, event: str) -> None:
    page.eval_on_selector(
        selector, f"(el, v) => {{ el.value = v; el.dispatchEvent(new Event('{event}')); }}", value
    )


def test_moving_a_control_changes_the_picture(explorer_page):
    before_points = _wavelength_points(explorer_page)
    before_png = explorer_page.screenshot()
    _set(explorer_page, "input[name=factor]", "16", "input")
    assert _wavelength_points(explorer_page) != before_points
    assert explorer_page.screenshot() != before_png
    hands = explorer_page.eval_on_selector_all("line.dial-hand", "els => els.map(e => e.getAttribute('x2'))")
    _set(explorer_page, "input[name=position]", "12345", "input")
    assert explorer_page.eval_on_selector_all("line.dial-hand", "els => els.map(e => e.getAttribute('x2'))") != hands
    _set(explorer_page, "select[name=method]", "linear", "change")
    assert "position interpolation" in explorer_page.inner_text(".qwen-rope-explorer")
    assert explorer_page.js_errors == []


def test_bad_input_in_the_browser_is_reported_not_drawn(explorer_page):
    with pytest.raises(Exception, match="scaling factor must be >= 1"):
        explorer_page.evaluate(
            "() => window.QwenRope.invFreq({method: 'linear', base: 1e4, dim: 64, factor: 0.5,"
            " originalMax: 2048, seqLen: 10})"
        )
    with pytest.raises(Exception, match="head dimension must be even"):
        explorer_page.evaluate(
            "() => window.QwenRope.invFreq({method: 'none', base: 1e4, dim: 63, factor: 1,"
            " originalMax: 2048, seqLen: 10})"
        )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"head_dim": 63}, "head_dim must be an even number"),
        ({"factor": 0.5}, "factor must be >= 1"),
        ({"method": "rotary"}, "unknown method 'rotary'"),
        ({"base": 1.0}, "base must be > 1"),
        ({"position": -1}, "position must be >= 0"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rope_explorer(**kwargs)


def test_each_explorer_gets_its_own_element():
    first, second = rope_explorer(), rope_explorer()
    assert first.element_id != second.element_id
    assert f'id="{first.element_id}"' in first._repr_html_()


# --- the picture reads cleanly: labels never sit on the titles, the legend names each curve once ----

LAYOUTS = [
    # method, factor, training context, base: the target line at the top of the wavelength plot
    # (plain RoPE at factor 32 puts it above every wavelength), factor 1 (target on the training
    # line), and the chapter's own setting.
    ("none", "32", "2048", "3"),
    ("none", "4", "2048", "4"),
    ("none", "1", "4096", "4"),
    ("yarn", "4", "2048", "4"),
    ("linear", "32", "32768", "7"),
]


def _boxes(scope, selector: str) -> list[dict]:
    """Text and on-screen box of every element that ``selector`` finds inside ``scope``."""
    return scope.locator(selector).evaluate_all(
        "els => els.map(e => { const r = e.getBoundingClientRect();"
        " return {text: e.textContent, x: r.x, y: r.y, w: r.width, h: r.height}; })",
    )


def _intersect(a: dict, b: dict) -> bool:
    return a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"] and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"]


@pytest.mark.parametrize("method,factor,original,base_log10", LAYOUTS)
def test_line_labels_stay_clear_of_titles_and_each_other(explorer_page, method, factor, original, base_log10):
    _set(explorer_page, "select[name=method]", method, "change")
    _set(explorer_page, "input[name=factor]", factor, "input")
    _set(explorer_page, "input[name=originalMax]", original, "input")
    _set(explorer_page, "input[name=base]", base_log10, "input")
    plots = explorer_page.locator(".qwen-rope-explorer g.plot").all()
    assert len(plots) == 2
    for plot in plots:
        title = _boxes(plot, "text.plot-title")
        labels = _boxes(plot, "text.line-label")
        legend = _boxes(plot, "text.legend-label")
        assert len(title) == 1
        for label in labels:
            assert not _intersect(label, title[0]), f"{label['text']!r} overlaps the title {title[0]['text']!r}"
            for other in legend:
                assert not _intersect(label, other), f"{label['text']!r} overlaps the legend {other['text']!r}"
        for i, label in enumerate(labels):
            for other in labels[i + 1:]:
                assert not _intersect(label, other), f"{label['text']!r} overlaps {other['text']!r}"
    assert explorer_page.js_errors == []


@pytest.mark.parametrize("method", SCALING_METHODS)
def test_each_legend_names_each_curve_once(explorer_page, method):
    _set(explorer_page, "select[name=method]", method, "change")
    plots = explorer_page.locator(".qwen-rope-explorer g.plot").all()
    assert len(plots) == 2
    for plot in plots:
        names = [box["text"] for box in _boxes(plot, "text.legend-label")]
        assert names and len(names) == len(set(names)), names
        assert ("plain RoPE" in names) and (len(names) == (1 if method == "none" else 2))
