"""Reading rules shared by the source checks (tests/test_plumbing.py) and the built-book checks.

The column: at a 1400 px wide window the theme leaves a code cell 748 px for its text, and the
monospace font (14 px; DejaVu Sans Mono on Linux, and Menlo or SF Mono on a Mac, all 0.6 em per
character) takes 8.43 px per character, so 88 characters fit (measured in Chromium;
tests/built_book/test_built_book.py measures it again on every build). A longer code line makes the
reader scroll sideways, so notebooks keep their code lines at most CODE_COLUMN_CHARS long (the
chapters aim for 80).
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat

VIEWPORT = {"width": 1400, "height": 900}
CODE_COLUMN_CHARS = 88

# Notebooks that still have code lines longer than CODE_COLUMN_CHARS. Their checks are expected
# failures (strict: once a notebook fits, its check reports XPASS and fails until it is taken off
# this list). Empty this set, do not add to it.
LONG_LINE_NOTEBOOKS = frozenset({
})

LAYOUT_REPORT: dict[str, dict] = {}  # page -> measurements; tests/built_book/conftest.py prints them

HIDDEN_SOURCE_TAGS = {"remove-cell", "remove-input"}  # cells whose code the book does not show


def long_code_lines(notebook: Path, limit: int = CODE_COLUMN_CHARS) -> list[str]:
    """'cell N, line M (K chars): ...' for every shown code line longer than ``limit``."""
    nb = nbformat.read(notebook, as_version=4)
    found = []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or HIDDEN_SOURCE_TAGS & set(cell.metadata.get("tags", [])):
            continue
        for number, line in enumerate(cell.source.splitlines(), start=1):
            width = len(line.expandtabs(4))
            if width > limit:
                found.append(f"cell {index}, line {number} ({width} chars): {line.strip()[:60]}...")
    return found


def long_line_mark(stem: str):
    """The xfail mark for a notebook still on LONG_LINE_NOTEBOOKS, or None."""
    import pytest

    if stem not in LONG_LINE_NOTEBOOKS:
        return None
    return pytest.mark.xfail(
        strict=True,
        reason=f"{stem} still has code lines over {CODE_COLUMN_CHARS} characters "
        "(listed in tests/built_book/rules.py LONG_LINE_NOTEBOOKS; remove it there once it fits)",
    )


def acronyms(title: str) -> list[str]:
    """Words a sentence-cased title must keep as written: GQA, YaRN, MoE, Qwen2-VL's parts, 7B."""
    plain = title.replace("{", "").replace("}", "")
    words = re.findall(r"[A-Za-z0-9.+]+", plain)
    return [w.strip(".") for w in words if re.search(r".[A-Z]", w) or (re.search(r"\d", w) and re.search(r"[A-Za-z]", w))]
