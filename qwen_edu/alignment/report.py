"""Result tables for the alignment chapters: an HTML table in a notebook, aligned text elsewhere.

A notebook that prints a dict of metrics shows raw floats (``0.20000004768371582``) and braces;
:class:`Table` formats every number once (``formats`` per column, or a default by type) and renders
as a real table in Jupyter and in the built book (``_repr_html_``), and as aligned columns in a
terminal (``str``).
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from typing import Any

__all__ = ["Table", "format_value"]


def format_value(value: Any, spec: str | None = None) -> str:
    """``spec`` applied with ``format`` when given; otherwise ints with thousands separators, floats
    with three decimals, ``None`` as an em dash, anything else as ``str``."""
    if value is None:
        return "\u2014"
    if isinstance(value, Real) and not isinstance(value, bool) and value == 0:
        value = abs(value)  # no "-0.000" for a rounded negative zero
    if spec is not None:
        return format(value, spec)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Integral):
        return f"{value:,}"
    if isinstance(value, Real):
        return f"{value:,.3f}"
    return str(value)


def _numeric(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


class Table:
    """``columns`` and ``rows`` (one sequence of values per row); ``formats`` maps a column to a
    format spec (``".1%"``, ``".3f"``, ``",d"``). Numeric columns are right-aligned."""

    def __init__(self, columns: Sequence[str], rows: Sequence[Sequence[Any]], *,
                 formats: Mapping[str, str] | None = None, title: str | None = None) -> None:
        self.columns = list(columns)
        self.rows = [list(r) for r in rows]
        for i, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ValueError(f"row {i} has {len(row)} values for {len(self.columns)} columns {self.columns}")
        unknown = set(formats or {}) - set(self.columns)
        if unknown:
            raise ValueError(f"formats name unknown columns {sorted(unknown)}; columns are {self.columns}")
        self.formats = dict(formats or {})
        self.title = title

    def cells(self) -> list[list[str]]:
        """Every value formatted as it is shown."""
        return [[format_value(v, self.formats.get(c)) for c, v in zip(self.columns, row)] for row in self.rows]

    def _right(self) -> list[bool]:
        return [bool(self.rows) and all(_numeric(r[j]) or r[j] is None for r in self.rows)
                for j in range(len(self.columns))]

    def __str__(self) -> str:
        cells, right = self.cells(), self._right()
        widths = [max([len(c)] + [len(r[j]) for r in cells]) for j, c in enumerate(self.columns)]

        def line(values: Sequence[str]) -> str:
            return "  ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)).rstrip()

        out = [self.title] if self.title else []
        out += [line(self.columns), line(["-" * w for w in widths])]
        out += [line(r) for r in cells]
        return "\n".join(out)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        right = self._right()

        def cell(tag: str, text: str, align_right: bool) -> str:
            align = "right" if align_right else "left"
            return f'<{tag} style="text-align: {align}; padding: 0.15em 0.7em">{html.escape(text)}</{tag}>'

        head = "".join(cell("th", c, r) for c, r in zip(self.columns, right))
        body = "".join("<tr>" + "".join(cell("td", v, r) for v, r in zip(row, right)) + "</tr>"
                       for row in self.cells())
        caption = f"<caption>{html.escape(self.title)}</caption>" if self.title else ""
        return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
