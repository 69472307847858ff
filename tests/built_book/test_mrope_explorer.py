"""The M-RoPE explorer on the rendered chapter-10 page stays interactive with no kernel (headless Chromium)."""

from __future__ import annotations

import os

import pytest

from tests.browser import browser_page  # noqa: F401  (fixture)
from tests.conftest import ROOT

PAGE = ROOT / "_build" / "html" / "notebooks" / "10_qwen2_vl.html"


@pytest.fixture(scope="module")
def chapter_page(browser_page):  # noqa: F811
    if not PAGE.exists():
        if os.environ.get("QWEN_EDU_REQUIRE_BUILT_BOOK") == "1":
            pytest.fail(f"{PAGE} is missing: the book build must run before these tests")
        pytest.skip("chapter 10 is not built (run `python3 tools/dev.py book`)")
    browser_page.goto(PAGE.as_uri())
    browser_page.wait_for_selector(".qwen-mrope-explorer rect.token-cell")
    return browser_page


def test_moving_a_slider_redraws_the_explorer(chapter_page):
    explorer = chapter_page.locator(".qwen-mrope-explorer").first
    svg = explorer.locator("svg")
    before, picture = svg.inner_html(), svg.screenshot()
    summary = explorer.locator(".qm-summary").inner_text()
    explorer.locator("input[name=videoFrames]").evaluate(
        "el => { el.value = String(+el.value === 2 ? 10 : 2); el.dispatchEvent(new Event('input')); }")
    assert svg.inner_html() != before, "moving the frames slider must redraw the token strip and grids"
    assert svg.screenshot() != picture
    assert explorer.locator(".qm-summary").inner_text() != summary
    # The theme's own scripts declare THEBE_JS_URL twice on notebook pages (harmless, not ours).
    assert [e for e in chapter_page.js_errors if "THEBE_JS_URL" not in e] == []


CHAPTER_12 = ROOT / "_build" / "html" / "notebooks" / "12_qwen25vl_qwen3vl.html"


def test_chapter_12_explorer_moves_the_clock_and_switches_models(browser_page):  # noqa: F811
    if not CHAPTER_12.exists():
        if os.environ.get("QWEN_EDU_REQUIRE_BUILT_BOOK") == "1":
            pytest.fail(f"{CHAPTER_12} is missing: the book build must run before these tests")
        pytest.skip("chapter 12 is not built (run `python3 tools/dev.py book`)")
    browser_page.goto(CHAPTER_12.as_uri())
    browser_page.wait_for_selector(".qwen-mrope-explorer rect.token-cell")
    explorer = browser_page.locator(".qwen-mrope-explorer").first
    clock = explorer.locator(".qm-clock")
    assert "Qwen2.5-VL, absolute time" in clock.inner_text()
    before = clock.inner_text()
    explorer.locator("input[name=fps]").evaluate("el => { el.value = '4'; el.dispatchEvent(new Event('input')); }")
    assert clock.inner_text() != before and "2 / fps = 0.500 s" in clock.inner_text()
    explorer.locator("select[name=model]").evaluate(
        "el => { el.value = 'qwen3_vl'; el.dispatchEvent(new Event('change')); }")
    assert "seconds>" in clock.inner_text()
    assert explorer.locator("select[name=layout]").evaluate("el => el.value") == "interleaved"
    assert [e for e in browser_page.js_errors if "THEBE_JS_URL" not in e] == []
