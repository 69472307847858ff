"""Headless Chromium for the tests that check what a reader sees in a browser.

CI installs Debian's ``chromium`` (see ``.ci/run``) and sets ``QWEN_EDU_REQUIRE_BROWSER=1``, which
turns a missing browser into a failure instead of a skip. Playwright drives the system browser; it
never downloads one of its own.

The page is offline, as a reader's locally built book may be: every request that would leave the
machine is refused and recorded in ``page.offline_requests`` (only ``file:`` pages load).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def find_chromium() -> str | None:
    for candidate in (os.environ.get("QWEN_EDU_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and (path := shutil.which(candidate)):
            return path
    return None


def _missing(reason: str) -> None:
    if os.environ.get("QWEN_EDU_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason}, and QWEN_EDU_REQUIRE_BROWSER=1 says the browser tests must run")
    pytest.skip(reason)


def _offline(route, refused: list[str]) -> None:
    url = route.request.url
    if url.startswith("file:"):
        route.continue_()
    else:
        refused.append(url)
        route.abort("internetdisconnected")


@pytest.fixture(scope="module")
def browser_page() -> Iterator[object]:
    """A Playwright page in headless Chromium (module-scoped: starting Chromium takes a second)."""
    executable = find_chromium()
    if executable is None:
        _missing("no Chromium found (apt-get install chromium, or set QWEN_EDU_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is not installed")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 900, "height": 900})
        errors: list[str] = []
        refused: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.route("**/*", lambda route: _offline(route, refused))
        page.js_errors = errors  # type: ignore[attr-defined]
        page.offline_requests = refused  # type: ignore[attr-defined]
        yield page
        browser.close()
