"""Author-year citations that read the same in the text and in the bibliography.

sphinxcontrib-bibtex's ``author_year`` citations ("[Peng et al., 2023]") sat next to a bibliography
numbered [1]-[30], and two papers by the same first author in the same year (the Qwen and Qwen-VL
reports, Bai et al. 2023) got the same citation. This Sphinx extension registers:

* the bibliography style ``author_year_plain``: pybtex's ``plain`` entries, sorted by label, with
  labels "Surname, 2023", "A and B, 2023" or "A et al., 2023", and "2023a"/"2023b" when two
  entries would otherwise share a label;
* the citation style ``author_year_label``: ``{cite:p}`` prints exactly that label, ``{cite:t}``
  prints the authors and the label's year ("Bai et al. [2023b]").

Enabled in ``_config.yml`` (``local_extensions``, ``bibtex_default_style``,
``bibtex_reference_style``).
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from pybtex.database import Entry, Person
from pybtex.plugin import register_plugin
from pybtex.richtext import Text
from pybtex.style.formatting.plain import Style as PlainStyle
from pybtex.style.labels import BaseLabelStyle
from pybtex.style.sorting import BaseSortingStyle
from pybtex.style.template import join, node
from sphinxcontrib.bibtex.plugin import register_plugin as register_citation_style
from sphinxcontrib.bibtex.style.referencing import BaseReferenceStyle, BracketStyle, PersonStyle
from sphinxcontrib.bibtex.style.referencing.author_year import AuthorYearReferenceStyle
from sphinxcontrib.bibtex.style.referencing.basic_author_year import BasicAuthorYearTextualReferenceStyle
from sphinxcontrib.bibtex.style.template import entry_label, join2, post_text, pre_text, reference

LABEL_STYLE = "author_year"
SORTING_STYLE = "author_year_label"
BIBLIOGRAPHY_STYLE = "author_year_plain"
REFERENCE_STYLE = "author_year_label"


def _surname(person: Person) -> str:
    """'de Jong', 'Qwen Team' (braces dropped): the words a reader looks up in the list."""
    parts = [*person.rich_prelast_names, *person.rich_last_names]
    return " ".join(part.render_as("text") for part in parts)


def author_part(entry: Entry) -> str:
    """One author: the surname; two: "A and B"; three or more (or "and others"): "A et al."."""
    persons = entry.persons.get("author") or entry.persons.get("editor") or []
    if not persons:
        return Text.from_latex(entry.fields.get("title", entry.key)).render_as("text")
    names = [_surname(p) for p in persons]
    if len(names) == 1:
        return names[0]
    if len(names) == 2 and names[1] != "others":
        return f"{names[0]} and {names[1]}"
    return f"{names[0]} et al."


def author_year_labels(entries: Iterable[Entry]) -> list[str]:
    """Labels in the given (sorted) order, with a/b/c... where author part and year coincide."""
    entries = list(entries)
    bases = [f"{author_part(e)}, {e.fields.get('year', 'n.d.')}" for e in entries]
    shared = Counter(bases)
    seen: Counter[str] = Counter()
    labels = []
    for base in bases:
        if shared[base] == 1:
            labels.append(base)
            continue
        if shared[base] > len(string.ascii_lowercase):
            raise ValueError(f"more than 26 bibliography entries share the label {base!r}")
        labels.append(base + string.ascii_lowercase[seen[base]])
        seen[base] += 1
    return labels


class AuthorYearLabelStyle(BaseLabelStyle):
    def format_labels(self, sorted_entries: Iterable[Entry]) -> Iterator[str]:
        yield from author_year_labels(sorted_entries)


class AuthorYearSortingStyle(BaseSortingStyle):
    """In the order of the labels (author part, then year), so that 2023a comes before 2023b."""

    def sorting_key(self, entry: Entry) -> tuple[str, str, str]:
        title = Text.from_latex(entry.fields.get("title", "")).render_as("text")
        return author_part(entry).lower(), entry.fields.get("year", ""), title.lower()


class AuthorYearPlainStyle(PlainStyle):
    """pybtex's plain entry format, sorted and labelled by author and year."""

    default_label_style = LABEL_STYLE
    default_sorting_style = SORTING_STYLE


@node
def label_year(children, data) -> Text:
    """The year part of the entry's bibliography label, with its a/b suffix ("2023b")."""
    assert not children
    return Text(data["formatted_entry"].label.rpartition(", ")[2])


@dataclass
class LabelParentheticalReferenceStyle(BaseReferenceStyle):
    """``{cite:p}``: the bibliography label itself, "[Bai et al., 2023b]"."""

    bracket: BracketStyle = field(default_factory=BracketStyle)
    pre_text_sep: str = " "
    post_text_sep: str = ", "

    def role_names(self) -> Iterable[str]:
        return [f"{alt}p{full}" for alt in ["", "al"] for full in ["", "s"]]

    def outer(self, role_name: str, children):
        return self.bracket.outer(children, brackets="al" not in role_name, capfirst=False)

    def inner(self, role_name: str):
        return join2(sep1=self.pre_text_sep, sep2=self.post_text_sep)[
            pre_text, reference[entry_label], post_text
        ]


@dataclass
class LabelTextualReferenceStyle(BasicAuthorYearTextualReferenceStyle):
    """``{cite:t}``: the authors, then the label's year, "Bai et al. [2023b]"."""

    def inner(self, role_name: str):
        return join(sep=self.text_reference_sep)[
            self.person.author_or_editor_or_title(full="s" in role_name),
            join[
                self.bracket.left,
                join2(sep1=self.pre_text_sep, sep2=self.post_text_sep)[
                    pre_text, reference[label_year], post_text
                ],
                self.bracket.right,
            ],
        ]


@dataclass
class AuthorYearLabelReferenceStyle(AuthorYearReferenceStyle):
    """sphinxcontrib-bibtex's author-year roles, with ``p`` and ``t`` taken from the label.

    Labels contain a comma, so several works in one citation are separated by semicolons:
    "[Bai et al., 2023a; Bai et al., 2023b]".
    """

    bracket_parenthetical: BracketStyle = field(default_factory=lambda: BracketStyle(sep="; "))
    bracket_textual: BracketStyle = field(default_factory=lambda: BracketStyle(sep="; "))
    person: PersonStyle = field(default_factory=PersonStyle)

    def __post_init__(self) -> None:
        super().__post_init__()
        for style in (
            LabelParentheticalReferenceStyle(bracket=self.bracket_parenthetical),
            LabelTextualReferenceStyle(bracket=self.bracket_textual, person=self.person),
        ):
            self.role_style.update((role, style) for role in style.role_names())


def setup(app) -> dict:
    register_plugin("pybtex.style.labels", LABEL_STYLE, AuthorYearLabelStyle)
    register_plugin("pybtex.style.sorting", SORTING_STYLE, AuthorYearSortingStyle)
    register_plugin("pybtex.style.formatting", BIBLIOGRAPHY_STYLE, AuthorYearPlainStyle)
    register_citation_style("sphinxcontrib.bibtex.style.referencing", REFERENCE_STYLE, AuthorYearLabelReferenceStyle)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
