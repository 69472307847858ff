"""Checks on the rendered book in _build/html, run by the test command after the strict book build.

They look at what a reader gets, offline (tests/browser.py refuses every request that would leave
the machine): the introduction, every chapter page with its Colab button, typeset formulas, code
and outputs that fit the column at 1400 px, an author-year bibliography that matches the citations,
and the RoPE explorer staying interactive on a static page (no kernel) in headless Chromium.

``QWEN_EDU_BUILT_BOOK=/path/to/html`` checks a book built elsewhere (e.g. with --path-output).
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path

import pytest

from tests.browser import browser_page  # noqa: F401  (fixture)
from tests.built_book import rules
from tests.conftest import ROOT, load_tool

HTML = Path(os.environ.get("QWEN_EDU_BUILT_BOOK", ROOT / "_build" / "html"))
CHAPTERS = [Path(nb).with_suffix(".html").as_posix() for nb in load_tool("dev").toc_notebooks()]
PROSE = ["book/intro.html", "book/conventions.html", "book/bibliography.html"]


@pytest.fixture(scope="module", autouse=True)
def built_book() -> Path:
    if not (HTML / "index.html").exists():
        if os.environ.get("QWEN_EDU_REQUIRE_BUILT_BOOK") == "1":
            pytest.fail(f"{HTML} is missing: the book build must run before these tests")
        pytest.skip("the book is not built (run `python3 tools/dev.py book`)")
    return HTML


def _chapter_param(page: str, marks_for=None):
    stem = Path(page).stem
    mark = marks_for(stem) if marks_for else None
    return pytest.param(page, id=stem, marks=[mark] if mark else [])


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
    # The badge's picture is the book's own copy, so it shows offline.
    assert 'src="../_static/colab-badge.svg"' in text
    assert "colab.research.google.com/assets" not in text
    assert (HTML / "_static" / "colab-badge.svg").is_file()


# --- offline: nothing fetched from the web, no script errors ------------------------------------


@pytest.mark.parametrize("page", PROSE + CHAPTERS, ids=lambda p: Path(p).stem)
def test_page_loads_nothing_from_the_network_and_raises_no_script_error(browser_page, page):  # noqa: F811
    browser_page.offline_requests.clear()
    browser_page.js_errors.clear()
    browser_page.goto((HTML / page).as_uri(), wait_until="networkidle")  # MathJax loads more parts late
    assert browser_page.offline_requests == [], "the page asked the network for these (it must work offline)"
    assert browser_page.js_errors == []


def test_mathjax_comes_from_the_build_not_a_cdn():
    mathjax = HTML / "_static" / "mathjax" / "tex-chtml.js"
    assert mathjax.is_file(), "sphinx-mathjax-offline copies MathJax into _static/mathjax"
    assert mathjax.stat().st_size > 100_000
    assert (HTML / "_static" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").is_dir()
    for page in PROSE + CHAPTERS:
        text = (HTML / page).read_text()
        assert "cdn.jsdelivr.net" not in text and "mathjax@3" not in text, page
        if 'class="math' in text:
            assert re.search(r'<script defer="defer" src="(\.\./)*_static/mathjax/tex-chtml\.js', text), page


# --- formulas are typeset, offline --------------------------------------------------------------

RENDERED_MATH = """() => {
  const article = document.querySelector('article.bd-article') || document.body;
  const formulas = [...article.querySelectorAll('.math')];
  const prose = article.cloneNode(true);
  prose.querySelectorAll('pre, code, mjx-container').forEach((e) => e.remove());
  return {
    formulas: formulas.length,
    typeset: formulas.filter((e) => e.querySelector('mjx-container')).length,
    errors: [...article.querySelectorAll('mjx-merror')].map((e) => e.textContent),
    prose: prose.textContent,
  };
}"""
RAW_TEX = re.compile(r"\\\(|\\\)|\\\[|\\\]|\$\$|\\[A-Za-z]{2,}")


def _wait_for_mathjax(page) -> None:
    """Until MathJax has typeset the page (if it has formulas); fails if MathJax never starts."""
    if page.evaluate("() => document.querySelector('.math') !== null"):
        try:
            page.wait_for_function("() => window.MathJax?.startup?.promise", timeout=10_000)
        except Exception as error:  # playwright's TimeoutError
            raise AssertionError("MathJax did not start within 10 s: is it served from the build?") from error
        page.evaluate("() => window.MathJax.startup.promise.then(() => true)")


@pytest.mark.parametrize("page", ["book/conventions.html", *CHAPTERS], ids=lambda p: Path(p).stem)
def test_formulas_are_typeset_offline(browser_page, page):  # noqa: F811
    browser_page.goto((HTML / page).as_uri(), wait_until="load")
    _wait_for_mathjax(browser_page)
    math = browser_page.evaluate(RENDERED_MATH)
    assert math["typeset"] == math["formulas"], f"{math['formulas'] - math['typeset']} formulas left as raw TeX"
    assert math["errors"] == [], "MathJax could not typeset these"
    leftovers = sorted({m.group(0) for m in RAW_TEX.finditer(math["prose"])})
    assert leftovers == [], f"raw TeX in the visible text: {leftovers}"
    if page == "book/conventions.html":
        assert math["formulas"] >= 10, "the conventions table is all formulas"


def test_at_least_one_chapter_has_formulas():
    assert any('class="math' in (HTML / page).read_text() for page in CHAPTERS)


# --- code and outputs fit the column at 1400 px -------------------------------------------------

MEASURE_LAYOUT = """() => {
  const article = document.querySelector('article.bd-article');
  const columnRight = article.getBoundingClientRect().right;
  const spills = (e) => e.clientWidth > 0 && e.scrollWidth > e.clientWidth + 1;
  const codes = [...article.querySelectorAll('div.cell_input pre')];
  let fit = null;
  if (codes.length) {
    const pre = codes[0], style = getComputedStyle(pre);
    const probe = document.createElement('span');
    probe.textContent = 'x'.repeat(200);
    pre.appendChild(probe);
    const charWidth = probe.getBoundingClientRect().width / 200;
    probe.remove();
    const inner = pre.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
    fit = Math.floor(inner / charWidth + 1e-6);
  }
  const outputs = [...article.querySelectorAll('div.cell_output > *')];
  const outputSpills = (o) => o.getBoundingClientRect().right > columnRight + 1 ||
    [o, ...o.querySelectorAll('*')].some((e) => !e.tagName.startsWith('MJX-') && spills(e) &&
                                               getComputedStyle(e).position !== 'absolute');
  const sample = (e) => (e.innerText || e.textContent || e.tagName).trim().slice(0, 70);
  return {
    column: Math.round(article.getBoundingClientRect().width),
    fit: fit,
    codeCells: codes.length,
    codeOverflow: codes.filter(spills).map(sample),
    outputs: outputs.length,
    outputOverflow: outputs.filter(outputSpills).map(sample),
  };
}"""


@pytest.fixture(scope="module")
def layout(browser_page) -> dict[str, dict]:  # noqa: F811
    """Every chapter page measured once at 1400 px (also printed as a table after the run)."""
    browser_page.set_viewport_size(rules.VIEWPORT)
    for page in CHAPTERS:
        browser_page.goto((HTML / page).as_uri(), wait_until="networkidle")  # typeset formulas take room
        rules.LAYOUT_REPORT[page] = browser_page.evaluate(MEASURE_LAYOUT)
    return rules.LAYOUT_REPORT


def test_the_code_column_holds_the_line_limit(layout):
    fits = {page: m["fit"] for page, m in layout.items() if m["fit"] is not None}
    assert fits, "no code cells found on the chapter pages"
    assert min(fits.values()) >= rules.CODE_COLUMN_CHARS, (
        f"at 1400 px a code cell holds {fits} characters, fewer than the {rules.CODE_COLUMN_CHARS} "
        "that tests/built_book/rules.py allows: lower CODE_COLUMN_CHARS or widen the column"
    )


@pytest.mark.parametrize("page", [_chapter_param(p) for p in CHAPTERS])
def test_outputs_fit_the_column(layout, page):
    spilling = layout[page]["outputOverflow"]
    assert spilling == [], f"{len(spilling)} of {layout[page]['outputs']} outputs run past the column"


@pytest.mark.parametrize("page", [_chapter_param(p, rules.long_line_mark) for p in CHAPTERS])
def test_code_cells_fit_the_column(layout, page):
    spilling = layout[page]["codeOverflow"]
    assert spilling == [], f"{len(spilling)} of {layout[page]['codeCells']} code cells scroll sideways"


# --- the bibliography reads author-year, like the citations -------------------------------------

LABEL = re.compile(
    r'<div class="citation" id="([^"]+)"[^>]*>\s*<span class="label"><span class="fn-bracket">\[</span>'
    r'(.*?)<span class="fn-bracket">\]</span>'
)
CITATION = re.compile(r'<a class="reference internal" href="[./]*book/bibliography\.html#([^"]+)"[^>]*>(.*?)</a>')


def _bibliography_labels() -> dict[str, str]:
    return {anchor: html.unescape(label) for anchor, label in LABEL.findall(_read("book/bibliography.html"))}


def test_bibliography_is_labelled_by_author_and_year():
    labels = _bibliography_labels()
    assert len(labels) >= 10
    for label in labels.values():
        assert re.fullmatch(r".+, \d{4}[a-z]?", label), f"not an author-year label: {label!r}"
    assert len(set(labels.values())) == len(labels), "two works share a label"


@pytest.mark.parametrize("page", ["book/intro.html", *CHAPTERS], ids=lambda p: Path(p).stem)
def test_citations_read_like_their_bibliography_label(page):
    labels = _bibliography_labels()
    for anchor, text in CITATION.findall(_read(page)):
        shown = html.unescape(re.sub(r"<[^>]+>", "", text))
        label = labels[anchor]
        # [Bai et al., 2023a] in parentheses; Bai et al. [2023a] in running text
        assert shown in (label, label.rpartition(", ")[2]), f"citation {shown!r} for [{label}]"


def test_bibliography_titles_keep_their_acronyms():
    from pybtex.database import parse_file

    shown = html.unescape(re.sub(r"<[^>]+>", "", _read("book/bibliography.html")))
    for entry in parse_file(ROOT / "book" / "references.bib").entries.values():
        for word in rules.acronyms(entry.fields.get("title", "")):
            if re.search(rf"(?i)(?<![A-Za-z0-9]){re.escape(word)}(?![A-Za-z0-9])", shown):
                assert word in shown, f"{word!r} lost its capitals in the bibliography"


# --- the RoPE explorer ---------------------------------------------------------------------------


def test_rope_explorer_is_interactive_on_the_static_page(browser_page):  # noqa: F811
    page_file = HTML / "notebooks" / "04_context_extension.html"
    if not page_file.exists():
        pytest.skip("chapter 4 is not in this build")
    browser_page.js_errors.clear()
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
    assert browser_page.js_errors == []


def _read(page: str) -> str:
    return (HTML / page).read_text()


def _config() -> str:
    return (ROOT / "_config.yml").read_text()


def _repo() -> str:
    return re.search(r"url:\s*https://github\.com/(\S+?)/?\s*$", _config(), flags=re.MULTILINE).group(1)


def _branch() -> str:
    return re.search(r"branch:\s*(\S+)", _config()).group(1)
