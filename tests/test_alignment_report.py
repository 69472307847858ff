"""Result tables: numbers formatted once, HTML for notebooks, aligned text for terminals."""

from __future__ import annotations

import pytest

from qwen_edu.alignment.report import Table, format_value


def test_values_are_formatted_not_dumped():
    assert format_value(-0.20000004768371582) == "-0.200"
    assert format_value(1234567) == "1,234,567"
    assert format_value(None) == "\u2014"
    assert format_value(True) == "yes"
    assert format_value(0.4609375, ".0%") == "46%"
    assert format_value(-0.0) == "0.000"  # no negative zero


def test_table_text_and_html():
    table = Table(["model", "reward", "right"], [["SFT", -0.5312, 0.46], ["PPO <b>", 0.1, None]],
                  formats={"right": ".0%"}, title="after training")
    lines = str(table).splitlines()
    assert lines[0] == "after training"
    assert lines[1].split() == ["model", "reward", "right"]
    assert lines[3].split() == ["SFT", "-0.531", "46%"]
    assert len({len(line) for line in lines[1:3]}) == 1  # header and rule line up
    page = table._repr_html_()
    assert page.count("<tr>") == 3 and "PPO &lt;b&gt;" in page and "<caption>after training</caption>" in page
    assert '<td style="text-align: right; padding: 0.15em 0.7em">-0.531</td>' in page  # numbers right-aligned


def test_table_errors_name_the_problem():
    with pytest.raises(ValueError, match="row 1 has 2 values for 3 columns"):
        Table(["a", "b", "c"], [[1, 2, 3], [1, 2]])
    with pytest.raises(ValueError, match="unknown columns \\['d'\\]"):
        Table(["a"], [[1]], formats={"d": ".1f"})
