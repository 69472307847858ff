"""Print the per-page layout measurements of the built-book checks after the run."""

from __future__ import annotations


def pytest_terminal_summary(terminalreporter) -> None:
    from tests.built_book.rules import CODE_COLUMN_CHARS, LAYOUT_REPORT, VIEWPORT

    if not LAYOUT_REPORT:
        return
    write = terminalreporter.write_line
    terminalreporter.section(f"chapter pages at {VIEWPORT['width']} px (code column limit {CODE_COLUMN_CHARS})")
    write(f"{'page':<40} {'column':>7} {'fits':>5} {'code cells over':>16} {'outputs over':>13}")
    for page, m in LAYOUT_REPORT.items():
        code = f"{len(m['codeOverflow'])}/{m['codeCells']}"
        outputs = f"{len(m['outputOverflow'])}/{m['outputs']}"
        write(f"{page:<40} {m['column']:>5}px {m['fit'] or '-':>5} {code:>16} {outputs:>13}")
        for sample in m["outputOverflow"]:
            write(f"    output past the column: {sample!r}")
