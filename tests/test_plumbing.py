"""The book's plumbing: the package, its helpers, and the notebooks' conventions."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import nbformat
import pytest
import torch
import yaml

import qwen_edu
from qwen_edu import get_device, seed_everything
from tests.conftest import ROOT, load_tool

NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
OPTIONAL_MODULES = [
    "transformers", "tokenizers", "tiktoken", "quicktok", "jupyter_book", "myst_nb", "sphinx",
    "nbval", "pytest", "hypothesis", "jupyter_cache", "yaml",
]


# --- the package --------------------------------------------------------------------------------


def test_package_imports_without_optional_extras():
    """`import qwen_edu` (and its entry points) must work with only the core dependencies."""
    blocker = textwrap.dedent(
        f"""
        import importlib.abc, sys
        BLOCKED = {OPTIONAL_MODULES!r}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"blocked optional module {{name}}")
        sys.meta_path.insert(0, Block())
        import qwen_edu
        print(qwen_edu.__version__, qwen_edu.get_device().type)
        """
    )
    result = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == qwen_edu.__version__


def test_unknown_attribute_is_a_clear_error():
    with pytest.raises(AttributeError, match="no attribute 'not_a_thing'"):
        qwen_edu.not_a_thing  # noqa: B018


def test_documented_entry_points_are_listed():
    for name in ["get_device", "seed_everything", "load_tokenizer", "load_model", "generate"]:
        assert name in qwen_edu.__all__
        assert name in dir(qwen_edu)


# --- device helper ------------------------------------------------------------------------------


def test_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.delenv("QWEN_EDU_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert get_device().type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert get_device().type == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert get_device() == torch.device("cpu")


def test_device_can_be_forced(monkeypatch):
    monkeypatch.setenv("QWEN_EDU_DEVICE", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert get_device() == torch.device("cpu")
    monkeypatch.delenv("QWEN_EDU_DEVICE")
    assert get_device("cpu") == torch.device("cpu")


def test_unavailable_device_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        get_device("cuda")
    with pytest.raises(RuntimeError, match="MPS is not available"):
        get_device("mps")


def test_describe_device_names_the_cpu():
    assert qwen_edu.describe_device("cpu").startswith("cpu (")


# --- seeding ------------------------------------------------------------------------------------


def test_seeding_repeats_every_generator():
    import random

    import numpy as np

    def draw():
        return random.random(), float(np.random.rand()), torch.randn(4)

    seed_everything(7)
    first = draw()
    seed_everything(7)
    second = draw()
    assert first[:2] == second[:2]
    torch.testing.assert_close(first[2], second[2], rtol=0, atol=0)
    seed_everything(8)
    assert draw()[0] != first[0]


def test_seeding_returns_an_independent_seeded_generator():
    a = torch.randn(5, generator=seed_everything(3))
    b = torch.randn(5, generator=seed_everything(3))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_deterministic_mode_switches_off_tf32():
    seed_everything(0, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.backends.cuda.matmul.allow_tf32
    assert not torch.backends.cudnn.allow_tf32
    torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("bad", [-1, 1.5, "0"])
def test_bad_seed_is_rejected(bad):
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        seed_everything(bad)


# --- the book's structure -----------------------------------------------------------------------


def toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    found: list[str] = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                found.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(toc.get("parts", []))
    return found


def test_every_notebook_is_in_the_toc_and_every_toc_entry_exists():
    listed = toc_files()
    notebooks_listed = {f for f in listed if f.startswith("notebooks/")}
    on_disk = {f"notebooks/{p.stem}" for p in NOTEBOOKS}
    assert on_disk, "there must be at least one chapter notebook"
    assert on_disk - notebooks_listed == set(), "notebooks missing from _toc.yml"
    assert notebooks_listed - on_disk == set(), "_toc.yml lists notebooks that do not exist"
    for entry in listed:
        matches = [p for p in (ROOT / f"{entry}.md", ROOT / f"{entry}.ipynb") if p.exists()]
        assert len(matches) == 1, f"{entry}: expected exactly one .md or .ipynb file, found {matches}"


def test_the_test_command_runs_exactly_the_toc_notebooks():
    dev = load_tool("dev")
    assert dev.toc_notebooks() == [f"{f}.ipynb" for f in toc_files() if f.startswith("notebooks/")]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_current_badge_and_setup_cell(notebook):
    tool = load_tool("notebooks")
    assert tool.problems(notebook, tool.read_repository()) == []
    nb = nbformat.read(notebook, as_version=4)
    setup = nb.cells[1]
    assert {"remove-cell", "nbval-skip"} <= set(setup.metadata["tags"])
    assert '"google.colab" in sys.modules' in setup.source
    repo = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    assert repo in setup.source and repo.split("github.com/")[1] in nb.cells[0].source


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_follows_the_chapter_template(notebook):
    nb = nbformat.read(notebook, as_version=4)
    nbformat.validate(nb)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    markdown = [c.source for c in nb.cells if c.cell_type == "markdown"]
    assert "get_device(" in code, "chapters run on the device chosen by qwen_edu.get_device"
    assert "seed_everything(" in code, "chapters are seeded"
    checks = re.findall(r"torch\.testing\.assert_close\(|^\s*assert .+==", code, flags=re.MULTILINE)
    assert len(checks) >= 3, "chapters check their hand-built parts against qwen_edu (assert_close / ==)"
    assert any(re.search(r"^## Summary", m, flags=re.MULTILINE) for m in markdown[-3:]), "ends with a summary"
    assert "## Exercises" in "\n".join(markdown[-2:]), "ends with exercises"
    stored = [c for c in nb.cells if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not stored, "notebooks are committed without outputs: python tools/notebooks.py strip"


def test_badges_follow_the_configured_repository(tmp_path, monkeypatch):
    """Changing repository.url in _config.yml changes every badge and install cell."""
    tool = load_tool("notebooks")
    repo = tool.Repository(url="https://github.com/someone/fork", branch="dev")
    copy = NOTEBOOK_DIR / "00_getting_started.ipynb"
    nb = nbformat.read(copy, as_version=4)
    target = NOTEBOOK_DIR / "zz_tmp_badge_test.ipynb"
    try:
        nbformat.write(nb, target)
        assert tool.problems(target, repo), "a notebook made for another repository must be flagged"
        assert tool.write_head(target, repo)
        assert tool.problems(target, repo) == []
        written = nbformat.read(target, as_version=4)
        assert "someone/fork/blob/dev/notebooks/zz_tmp_badge_test.ipynb" in written.cells[0].source
        assert "git+https://github.com/someone/fork@dev" in written.cells[1].source
        assert not tool.write_head(target, repo), "a second write changes nothing"
    finally:
        target.unlink(missing_ok=True)


def test_config_excludes_what_breaks_a_strict_build():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    for pattern in [".*", "**/.*", "_build", ".venv", "tests"]:
        assert pattern in config["exclude_patterns"]
    assert config["execute"]["execute_notebooks"] == "cache"
    assert config["execute"]["timeout"] >= 300
    assert config["launch_buttons"]["colab_url"] == "https://colab.research.google.com"


def test_every_citation_has_a_bibliography_entry():
    bib = (ROOT / "book" / "references.bib").read_text()
    keys = set(re.findall(r"^@\w+\{([^,]+),", bib, flags=re.MULTILINE))
    sources = [p.read_text() for p in (ROOT / "book").glob("*.md")]
    for nb in NOTEBOOKS:
        sources += [c["source"] if isinstance(c["source"], str) else "".join(c["source"])
                    for c in json.loads(nb.read_text())["cells"]]
    cited = {key.strip() for text in sources
             for group in re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", text) for key in group.split(",")}
    assert cited, "the book cites its sources"
    assert cited - keys == set(), "cited keys missing from book/references.bib"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 tools/dev.py test" in readme
    assert "python3 tools/dev.py book" in readme
    assert "tools/dev.py test" in ci
    assert os.access(ROOT / ".ci" / "run", os.X_OK)


def test_torch_is_pinned_only_in_the_constraints():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert not re.search(r'"torch\s*==', pyproject), "never pin torch in the package metadata"
    assert re.search(r"^torch==2\.13\.0$", (ROOT / "constraints.txt").read_text(), flags=re.MULTILINE)


# --- reading the rendered book (rules in tests/built_book/rules.py) ------------------------------


def _long_line_param(notebook):
    from tests.built_book.rules import long_line_mark

    mark = long_line_mark(notebook.stem)
    return pytest.param(notebook, id=notebook.stem, marks=[mark] if mark else [])


@pytest.mark.parametrize("notebook", [_long_line_param(nb) for nb in NOTEBOOKS])
def test_notebook_code_lines_fit_the_column(notebook):
    """A code line longer than the book's column makes the reader scroll sideways (limit: 88)."""
    from tests.built_book.rules import CODE_COLUMN_CHARS, long_code_lines

    too_long = long_code_lines(notebook)
    assert not too_long, (
        f"{notebook.name}: {len(too_long)} code lines are longer than the {CODE_COLUMN_CHARS} characters "
        "that fit the rendered column at 1400 px (aim for 80):\n" + "\n".join(too_long)
    )


def test_long_code_lines_are_found_and_hidden_cells_ignored(tmp_path):
    from tests.built_book.rules import long_code_lines

    nb = nbformat.v4.new_notebook()
    hidden = nbformat.v4.new_code_cell("x = 1  # " + "h" * 100)
    hidden.metadata["tags"] = ["remove-cell"]
    nb.cells = [
        nbformat.v4.new_markdown_cell("m" * 200),  # prose wraps; only code is checked
        nbformat.v4.new_code_cell("short = 1\n" + "y = 2  # " + "a" * 79),  # exactly 88 characters
        nbformat.v4.new_code_cell("z = 3  # " + "b" * 80),  # 89 characters
        hidden,
    ]
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    assert long_code_lines(path) == [f"cell 2, line 1 (89 chars): z = 3  # {'b' * 51}..."]


def test_bibliography_titles_keep_acronyms_capitalised():
    """The bibliography sentence-cases titles; braces keep GQA, YaRN, Qwen2-VL, 7B... as written."""
    from pybtex.database import parse_file
    from pybtex.richtext import Text

    from tests.built_book.rules import acronyms

    entries = parse_file(ROOT / "book" / "references.bib").entries
    lowered = {}
    for key, entry in entries.items():
        title = entry.fields.get("title", "")
        rendered = Text.from_latex(title).capitalize().render_as("text")  # what pybtex's plain style prints
        lost = [word for word in acronyms(title) if word not in rendered]
        if lost:
            lowered[key] = (rendered, lost)
    assert not lowered, f"brace-protect these words in book/references.bib titles, e.g. {{GQA}}: {lowered}"
    assert "GQA" in acronyms(entries["ainslie2023gqa"].fields["title"])


def _book_extension(name: str):
    import importlib.util

    if (module := sys.modules.get(f"book_ext_{name}")) is not None:
        return module
    spec = importlib.util.spec_from_file_location(f"book_ext_{name}", ROOT / "book" / "_ext" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_bibliography_labels_are_author_year_and_tell_namesakes_apart():
    from pybtex.database import parse_string

    author_year = _book_extension("author_year")
    bib = parse_string(
        """
        @article{one, title={A}, author={Zhang, Biao}, year={2019}}
        @article{two, title={B}, author={Press, Ofir and Wolf, Lior}, year={2017}}
        @article{many, title={Qwen}, author={Bai, Jinze and Bai, Shuai and Chu, Yunfei}, year={2023}}
        @article{others, title={Qwen-VL}, author={Bai, Jinze and others}, year={2023}}
        @misc{team, title={Qwen2.5}, author={{Qwen Team}}, year={2024}}
        @inproceedings{dejong, title={GQA}, author={de Jong, Michiel}, year={2023}}
        """,
        "bibtex",
    )
    entries = author_year.AuthorYearSortingStyle().sort(bib.entries.values())
    labels = dict(zip([e.key for e in entries], author_year.author_year_labels(entries), strict=True))
    assert labels == {
        "one": "Zhang, 2019",
        "two": "Press and Wolf, 2017",
        "many": "Bai et al., 2023a",  # same first author and year as "others": told apart, in title order
        "others": "Bai et al., 2023b",
        "team": "Qwen Team, 2024",
        "dejong": "de Jong, 2023",
    }
    assert [e.key for e in entries] == ["many", "others", "dejong", "two", "team", "one"]
