"""The M-RoPE explorer: its in-browser ids equal get_rope_index, and its controls redraw the picture.

The explorer's script also loads under node (it attaches ``QwenMrope`` to ``globalThis`` when there is no
``window``), so the arithmetic is checked without a browser; the drawing is checked in headless Chromium.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch

from qwen_edu.vision.dynamic_resolution import smart_resize
from qwen_edu.vision.mrope import get_rope_index, mrope_stream_index
from qwen_edu.viz import mrope_explorer
from qwen_edu.viz.mrope import explorer_script
from tests.browser import browser_page  # noqa: F401  (fixture)

IMAGE, VIDEO, V_START, V_END = 151655, 151656, 151652, 151653

SEQUENCES = [
    [{"type": "text", "length": 5}],
    [{"type": "image", "grid": [1, 16, 16]}],
    [{"type": "text", "length": 2}, {"type": "image", "grid": [1, 4, 6]}, {"type": "text", "length": 3},
     {"type": "video", "grid": [4, 4, 4]}, {"type": "text", "length": 2}],
    [{"type": "video", "grid": [6, 4, 4]}, {"type": "image", "grid": [1, 2, 8]}, {"type": "text", "length": 1}],
    [{"type": "text", "length": 1}, {"type": "image", "grid": [1, 10, 2]}, {"type": "image", "grid": [1, 2, 2]},
     {"type": "video", "grid": [1, 6, 4]}, {"type": "text", "length": 4}, {"type": "video", "grid": [3, 2, 10]}],
]


def run_node(expression: str):
    """Evaluate ``expression`` (JSON-serialisable) after loading the explorer script into node."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    program = explorer_script() + f"\nprocess.stdout.write(JSON.stringify({expression}));"
    result = subprocess.run([node, "-e", program], capture_output=True, text=True, timeout=60)
    if result.returncode:
        raise RuntimeError(result.stderr)
    return json.loads(result.stdout)


def _input_ids(segments):
    """The token ids of the prompt an explorer sequence describes, with its grids."""
    ids, images, videos = [], [], []
    for seg in segments:
        if seg["type"] == "text":
            ids += [100 + k for k in range(seg["length"])]
            continue
        t, h, w = seg["grid"]
        token = IMAGE if seg["type"] == "image" else VIDEO
        (images if token == IMAGE else videos).append(seg["grid"])
        ids += [V_START] + [token] * (t * h * w // 4) + [V_END]
    grid = lambda rows: torch.tensor(rows) if rows else None
    return torch.tensor([ids]), grid(images), grid(videos)


def test_explorer_ids_equal_get_rope_index():
    results = run_node("[" + ", ".join(f"QwenMrope.ropeIndex({json.dumps(s)}, 2)" for s in SEQUENCES) + "]")
    for segments, got in zip(SEQUENCES, results):
        ids, images, videos = _input_ids(segments)
        positions, deltas = get_rope_index(ids, images, videos)
        assert [got["t"], got["h"], got["w"]] == positions[:, 0].tolist()
        assert got["ropeDelta"] == deltas.item()
        assert got["oneD"] == list(range(ids.shape[1]))
        assert got["maxId"] == int(positions.max())


def test_explorer_smart_resize_rounds_like_python():
    sizes = [1, 13, 14, 28, 42, 55, 56, 70, 98, 126, 154, 224, 250, 336, 1000, 3000]
    pairs = [(h, w) for h in sizes for w in sizes if max(h, w) / min(h, w) <= 200]
    got = run_node("[" + ", ".join(f"QwenMrope.smartResize({h}, {w})" for h, w in pairs) + "]")
    assert [tuple(g) for g in got] == [smart_resize(h, w) for h, w in pairs]
    assert run_node("[QwenMrope.roundHalfEven(2.5), QwenMrope.roundHalfEven(3.5), QwenMrope.roundHalfEven(-0.5)]") \
        == [round(2.5), round(3.5), round(-0.5)]
    with pytest.raises(RuntimeError, match="aspect ratio must be at most 200"):
        run_node("QwenMrope.smartResize(10, 2500)")


def test_explorer_bands_equal_the_layouts():
    got = run_node("[QwenMrope.streamIndex([16, 24, 24], 'contiguous'), QwenMrope.streamIndex([24, 20, 20], 'interleaved')]")
    assert got[0] == mrope_stream_index([16, 24, 24], 128).tolist()
    assert got[1] == mrope_stream_index([24, 20, 20], 128, "interleaved").tolist()


@pytest.fixture(scope="module")
def explorer_page(browser_page, tmp_path_factory):  # noqa: F811
    page_file = tmp_path_factory.mktemp("viz") / "mrope.html"
    page_file.write_text(mrope_explorer(image_height=56, image_width=84, video_frames=6, video_height=56,
                                        video_width=56).to_html())
    browser_page.goto(page_file.as_uri())
    browser_page.wait_for_selector(".qwen-mrope-explorer rect.token-cell")
    return browser_page


def _set(page, selector: str, value: str, event: str = "input") -> None:
    page.eval_on_selector(selector, f"(el, v) => {{ el.value = v; el.dispatchEvent(new Event('{event}')); }}", value)


def test_the_browser_computes_the_same_ids(explorer_page):
    got = explorer_page.evaluate(f"QwenMrope.ropeIndex({json.dumps(SEQUENCES[2])}, 2)")
    ids, images, videos = _input_ids(SEQUENCES[2])
    assert [got["t"], got["h"], got["w"]] == get_rope_index(ids, images, videos)[0][:, 0].tolist()


def test_moving_a_control_changes_the_picture(explorer_page):
    svg = ".qwen-mrope-explorer svg"
    before, picture = explorer_page.inner_html(svg), explorer_page.locator(svg).screenshot()
    cells = explorer_page.locator("rect.token-cell[data-row=t]").count()
    _set(explorer_page, "input[name=imageWidth]", "168")  # 84 -> 168 px: 4x6 -> 4x12 patches, +6 tokens
    assert explorer_page.locator("rect.token-cell[data-row=t]").count() == cells + 6
    assert explorer_page.inner_html(svg) != before
    assert explorer_page.locator(svg).screenshot() != picture
    assert "largest position id: M-RoPE" in explorer_page.inner_text(".qm-summary")
    hands = explorer_page.eval_on_selector_all("line.dial-hand", "els => els.map(e => e.getAttribute('x2'))")
    explorer_page.locator("rect.grid-cell").nth(3).click()  # select an image token by clicking the grid
    assert explorer_page.eval_on_selector_all("line.dial-hand", "els => els.map(e => e.getAttribute('x2'))") != hands
    _set(explorer_page, "select[name=layout]", "interleaved", "change")
    streams = explorer_page.eval_on_selector_all("rect.band-cell", "els => els.map(e => e.dataset.stream)")
    assert streams[:4] == ["t", "h", "w", "t"]
    assert explorer_page.js_errors == []


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"image_width": 0}, "image_width must be at least 1 pixel"),
        ({"video_frames": 0}, "video_frames must be at least 1"),
        ({"layout": "spiral"}, "unknown layout 'spiral'"),
        ({"token": -1}, "must be >= 0"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mrope_explorer(**kwargs)


def test_each_explorer_gets_its_own_element():
    first, second = mrope_explorer(), mrope_explorer()
    assert first.element_id != second.element_id
    assert f'id="{first.element_id}"' in first._repr_html_()
