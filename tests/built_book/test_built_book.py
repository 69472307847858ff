"""Checks on the rendered book in _build/html, run by the test command after the strict book build.

They look at what a reader gets: the introduction, every chapter page with its Colab button, and the RoPE
explorer staying interactive on a static page (no kernel) in headless Chromium.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.browser import browser_page  # noqa: F401  (fixture)
from tests.conftest import ROOT, load_tool

HTML = ROOT / "_build" / "html"


@pytest.fixture(scope="module", autouse=True)
def built_book() -> Path:
    if not (HTML / "index.html").exists():
        if os.environ.get("QWEN_EDU_REQUIRE_BUILT_BOOK") == "1":
            pytest.fail("_build/html is missing: the book build must run before these tests")
        pytest.skip("the book is not built (run `python3 tools/dev.py book`)")
    return HTML


def test_introduction_page_is_there():
    intro = (HTML / "book" / "intro.html").read_text()
    assert "Qwen, Built from Scratch" in intro
    assert "Three ways to use it" in intro


@pytest.mark.parametrize("notebook", load_tool("dev").toc_notebooks(), ids=lambda p: Path(p).stem)
def test_every_chapter_page_has_its_colab_button(notebook):
    page = HTML / Path(notebook).with_suffix(".html")
    assert page.exists(), f"{page} was not built"
    text = page.read_text()
    link = f"https://colab.research.google.com/github/{_repo()}/blob/{_branch()}/{notebook}"
    assert text.count(link) >= 2, "expected the launch button and the badge to open this notebook in Colab"
    assert "Summary" in text and "Exercises" in text


def test_rope_explorer_is_interactive_on_the_static_page(browser_page):  # noqa: F811
    page_file = HTML / "notebooks" / "04_context_extension.html"
    if not page_file.exists():
        pytest.skip("chapter 4 is not in this build")
    browser_page.goto(page_file.as_uri())
    browser_page.wait_for_selector(".qwen-rope-explorer polyline.scaled-wavelength")
    before = browser_page.get_attribute(".qwen-rope-explorer polyline.scaled-wavelength", "points")
    picture = browser_page.locator(".qwen-rope-explorer svg").screenshot()
    browser_page.eval_on_selector(
        ".qwen-rope-explorer input[name=factor]",
        "el => { el.value = '12'; el.dispatchEvent(new Event('input')); }",
    )
    after = browser_page.get_attribute(".qwen-rope-explorer polyline.scaled-wavelength", "points")
    assert after != before, "moving the factor slider must redraw the wavelengths"
    assert browser_page.locator(".qwen-rope-explorer svg").screenshot() != picture
    # The theme's own scripts declare THEBE_JS_URL twice on notebook pages (harmless, not ours).
    ours = [e for e in browser_page.js_errors if "THEBE_JS_URL" not in e]
    assert ours == []


def _config() -> str:
    return (ROOT / "_config.yml").read_text()


def _repo() -> str:
    return re.search(r"url:\s*https://github\.com/(\S+?)/?\s*$", _config(), flags=re.MULTILINE).group(1)


def _branch() -> str:
    return re.search(r"branch:\s*(\S+)", _config()).group(1)
