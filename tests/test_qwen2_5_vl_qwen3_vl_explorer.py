"""The M-RoPE explorer's chapter-12 modes: Qwen2.5-VL's clock and Qwen3-VL's timestamped frame groups.

The ids the explorer computes in the browser (``QwenMrope.buildSegments`` + ``ropeIndex``) must equal the
package's :func:`~qwen_edu.vision.video_time.qwen2_5_vl_rope_index` and
:func:`~qwen_edu.vision.video_time.qwen3_vl_rope_index` for the prompt it draws; checked under node for many
settings, and in headless Chromium for the widget's controls.
"""

from __future__ import annotations

import json

import pytest
import torch

from qwen_edu.vision.video_time import (
    absolute_time_index,
    frame_group_timestamps,
    qwen2_5_vl_rope_index,
    qwen3_vl_rope_index,
    timestamp_text,
)
from qwen_edu.viz import mrope_explorer
from tests.browser import browser_page  # noqa: F401  (fixture)
from tests.test_viz_mrope import IMAGE, V_END, V_START, VIDEO, run_node

TOKENS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=V_START)


def _state(model: str, **changes) -> dict:
    return {**mrope_explorer(model=model).state, **changes}


def _prompt(segments: list[dict]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Token ids and grids of the prompt the explorer's segments describe (a split video's frames are one video)."""
    ids, images, videos = [], [], {}
    for seg in segments:
        if seg["type"] == "text":
            ids += [100 + k for k in range(seg["length"])]
            continue
        t, h, w = seg["grid"]
        token = IMAGE if seg["type"] == "image" else VIDEO
        if token == IMAGE:
            images.append(seg["grid"])
        else:
            item = videos.setdefault(seg.get("item", len(videos)), [0, h, w])
            item[0] += t
        ids += [V_START] + [token] * (t * h * w // 4) + [V_END]
    grid = lambda rows: torch.tensor(rows) if rows else None
    return torch.tensor([ids]), grid(images), grid(list(videos.values()))


def _explorer_ids(states: list[dict]) -> list[dict]:
    calls = ", ".join(f"(() => {{ const s = QwenMrope.buildSegments({json.dumps(st)}); "
                      f"return {{segments: s, ids: QwenMrope.ropeIndex(s, 2)}}; }})()" for st in states)
    return run_node(f"[{calls}]")


QWEN25_STATES = [_state("qwen2_5_vl", fps=fps, tokensPerSecond=tps, videoFrames=frames, videoHeight=h)
                 for fps, tps, frames, h in [(2, 2, 8, 112), (1, 2, 8, 112), (3, 2, 12, 56), (0.5, 2, 6, 56),
                                             (4, 2, 9, 84), (1.5, 3, 12, 56), (6, 4, 12, 28), (2, 1, 1, 224)]]
QWEN3_STATES = [_state("qwen3_vl", fps=fps, videoFrames=frames, imageWidth=w)
                for fps, frames, w in [(2, 8, 308), (1, 5, 112), (4, 12, 64), (0.5, 3, 200), (3, 7, 96)]]


def test_qwen2_5_vl_mode_ids_equal_the_package():
    for state, got in zip(QWEN25_STATES, _explorer_ids(QWEN25_STATES)):
        ids, images, videos = _prompt(got["segments"])
        want, deltas = qwen2_5_vl_rope_index(ids, images, videos, second_per_grid_ts=[2 / state["fps"]],
                                              tokens_per_second=state["tokensPerSecond"], **TOKENS)
        assert [got["ids"]["t"], got["ids"]["h"], got["ids"]["w"]] == want[:, 0].tolist(), state
        assert got["ids"]["ropeDelta"] == deltas.item()


def test_qwen3_vl_mode_ids_and_timestamps_equal_the_package():
    from qwen_edu.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    for state, got in zip(QWEN3_STATES, _explorer_ids(QWEN3_STATES)):
        ids, images, videos = _prompt(got["segments"])
        want, deltas = qwen3_vl_rope_index(ids, images, videos, **TOKENS)
        assert [got["ids"]["t"], got["ids"]["h"], got["ids"]["w"]] == want[:, 0].tolist(), state
        assert got["ids"]["ropeDelta"] == deltas.item()
        stamps = [s for s in got["segments"] if s.get("kind") == "time"]
        seconds = frame_group_timestamps(range(state["videoFrames"]), state["fps"])
        assert [s["label"] for s in stamps] == [timestamp_text(t) for t in seconds]
        assert [s["length"] for s in stamps] == [len(tokenizer.encode(s["label"])) for s in stamps]
        assert all(s["grid"][1] * 16 == s["pixels"][0] for s in got["segments"] if s["type"] == "video")


def test_the_arithmetic_matches_python_to_the_bit():
    values = [0.05, 0.15, 0.25, 0.35, 0.45, 0.75, 1.25, 2.25, 2.5, 3.05, 12.25, 99.95, 0.125 * 3, 2 / 3, 7 / 6]
    assert run_node(f"{json.dumps(values)}.map(QwenMrope.pyFixed1)") == [f"{v:.1f}" for v in values]
    cases = [(f, s, tps) for f in range(13) for s in (2 / 3, 0.5, 1.0, 4 / 3, 0.4, 2 / 7) for tps in (1, 2, 3)]
    got = run_node(f"{json.dumps(cases)}.map(([f, s, tps]) => QwenMrope.absoluteTime(f, s, tps))")
    assert got == [int(absolute_time_index(f + 1, s, tps)[-1]) for f, s, tps in cases]


@pytest.fixture(scope="module")
def explorer_page(browser_page, tmp_path_factory):  # noqa: F811
    page_file = tmp_path_factory.mktemp("viz") / "mrope12.html"
    page_file.write_text(mrope_explorer(model="qwen2_5_vl", video_frames=8, video_height=56, video_width=56).to_html())
    browser_page.goto(page_file.as_uri())
    browser_page.wait_for_selector(".qwen-mrope-explorer rect.token-cell")
    return browser_page


def _set(page, selector: str, value: str, event: str = "input") -> None:
    page.eval_on_selector(selector, f"(el, v) => {{ el.value = v; el.dispatchEvent(new Event('{event}')); }}", value)


def _page_ids(page) -> dict:
    return page.evaluate("document.querySelector('.qwen-mrope-explorer').qwenMropeIds")


def test_the_frame_rate_moves_the_clock_and_the_ids_stay_the_packages(explorer_page):
    page, svg = explorer_page, ".qwen-mrope-explorer svg"
    assert "second_per_grid = 2 / fps = 1.000 s" in page.inner_text(".qm-clock")
    before, picture = page.inner_html(svg), page.locator(svg).screenshot()
    _set(page, "input[name=fps]", "4")  # 4 fps: half a second per frame group, one id per group
    assert page.eval_on_selector("input[name=secondPerGrid]", "el => +el.value") == 0.5
    assert "second_per_grid = 2 / fps = 0.500 s" in page.inner_text(".qm-clock")
    assert page.inner_html(svg) != before and page.locator(svg).screenshot() != picture
    state = page.evaluate("document.querySelector('.qwen-mrope-explorer').qwenMropeState")
    got = page.evaluate(f"QwenMrope.ropeIndex(QwenMrope.buildSegments({json.dumps(state)}), 2)")
    assert got == _page_ids(page)
    ids, images, videos = _prompt(page.evaluate(f"QwenMrope.buildSegments({json.dumps(state)})"))
    want, _ = qwen2_5_vl_rope_index(ids, images, videos, second_per_grid_ts=[0.5], tokens_per_second=2, **TOKENS)
    assert [got["t"], got["h"], got["w"]] == want[:, 0].tolist()
    _set(page, "input[name=secondPerGrid]", "2")  # the other view of the same setting: 1 fps
    assert page.eval_on_selector("input[name=fps]", "el => +el.value") == 1
    assert "frame groups at t = " in page.inner_text(".qm-clock")
    assert page.js_errors == []


def test_switching_to_qwen3_vl_adds_timestamps_and_interleaves_the_bands(explorer_page):
    page = explorer_page
    _set(page, "select[name=model]", "qwen3_vl", "change")
    assert page.eval_on_selector("select[name=layout]", "el => el.value") == "interleaved"
    assert page.locator("rect.token-cell[data-row=type][fill='#f2b701']").count() > 0  # timestamp tokens
    assert "<0.2 seconds>" in page.inner_text(".qm-clock") or "<0.5 seconds>" in page.inner_text(".qm-clock")
    streams = page.eval_on_selector_all("rect.band-cell", "els => els.map(e => e.dataset.stream)")
    assert streams[:6] == ["t", "h", "w", "t", "h", "w"] and streams.count("t") == 24
    ids = _page_ids(page)
    frames = {cell[0] for cell, item in zip(ids["cell"], ids["item"]) if item == 1}
    assert len(frames) == 4  # 8 frames = 4 frame groups, split into 4 items for the ids but drawn as one video
    assert page.js_errors == []


@pytest.mark.parametrize("kwargs,message", [({"model": "qwen4_vl"}, "unknown model 'qwen4_vl'"),
                                            ({"fps": 0}, r"fps must be in \(0, 60\]"),
                                            ({"tokens_per_second": 0}, "tokens_per_second must be >= 1")])
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mrope_explorer(**kwargs)


def test_each_model_brings_its_own_layout_and_theta():
    assert mrope_explorer(model="qwen3_vl").state["layout"] == "interleaved"
    assert mrope_explorer(model="qwen3_vl").state["theta"] == 5e6
    assert mrope_explorer(model="qwen2_5_vl").state["section"] == [16, 24, 24]
    assert mrope_explorer(model="qwen3_vl", layout="contiguous").state["section"] == [16, 24, 24]
