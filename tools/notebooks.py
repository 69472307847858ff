"""Keep every chapter notebook's Colab badge and setup cell in step with ``_config.yml``.

The repository's public address lives in one place, ``_config.yml`` (``repository.url`` and
``repository.branch``). This script derives from it:

* the Open-in-Colab badge in the first (markdown) cell of each notebook, and
* the hidden setup cell (tags ``remove-cell`` and ``nbval-skip``) that installs ``qwen_edu`` from
  the repository when the notebook runs in Colab.

Usage::

    python tools/notebooks.py check            # exit 1 and list what is out of date
    python tools/notebooks.py write            # fix badges and setup cells in place
    python tools/notebooks.py new 03_pretraining "Pre-training a small Qwen"
    python tools/notebooks.py strip            # drop outputs and execution counts
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _reexec_in_project_venv() -> None:
    """Started by a Python without nbformat/yaml (e.g. the system ``python3``): re-run in ``.venv``."""
    venv_python = ROOT / ".venv" / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if venv_python.exists() and Path(sys.executable).resolve() != venv_python.resolve():
        os.execv(str(venv_python), [str(venv_python), *sys.argv])
    sys.exit("tools/notebooks.py needs nbformat and pyyaml: run `python3 tools/dev.py env` once "
             "(it creates .venv), then run this script again")


try:
    import nbformat
    import yaml
except ImportError:
    _reexec_in_project_venv()
NOTEBOOKS = ROOT / "notebooks"
BADGE_MARKER = "<!-- colab-badge -->"
SETUP_TAGS = ("remove-cell", "nbval-skip")
SETUP_MARKER = "# qwen-edu setup cell"
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}


@dataclass(frozen=True)
class Repository:
    url: str
    branch: str

    @property
    def github_path(self) -> str:
        match = re.fullmatch(r"https://github\.com/([^/]+/[^/]+?)(?:\.git)?/?", self.url)
        if match is None:
            raise ValueError(f"_config.yml repository.url must be a GitHub URL, got {self.url!r}")
        return match.group(1)


def read_repository(config_path: Path = ROOT / "_config.yml") -> Repository:
    config = yaml.safe_load(config_path.read_text())
    repo = config.get("repository") or {}
    if "url" not in repo:
        raise ValueError(f"{config_path}: repository.url is missing")
    return Repository(url=repo["url"], branch=repo.get("branch", "main"))


def badge_markdown(repo: Repository, notebook: Path) -> str:
    relative = notebook.resolve().relative_to(ROOT).as_posix()
    link = f"https://colab.research.google.com/github/{repo.github_path}/blob/{repo.branch}/{relative}"
    image = "https://colab.research.google.com/assets/colab-badge.svg"
    return f"{BADGE_MARKER}\n[![Open In Colab]({image})]({link})"


def setup_source(repo: Repository) -> str:
    spec = f"qwen-edu[notebooks] @ git+{repo.url}@{repo.branch}"
    return "\n".join(
        [
            f"{SETUP_MARKER}: installs qwen_edu when running in Colab (hidden in the rendered book).",
            "import subprocess",
            "import sys",
            "",
            'if "google.colab" in sys.modules:',
            f'    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "{spec}"], check=True)',
        ]
    )


def expected_head(repo: Repository, notebook: Path, title: str) -> list[nbformat.NotebookNode]:
    badge = nbformat.v4.new_markdown_cell(f"{badge_markdown(repo, notebook)}\n\n# {title}")
    setup = nbformat.v4.new_code_cell(setup_source(repo))
    setup.metadata["tags"] = list(SETUP_TAGS)
    return [badge, setup]


def _title_of(cell: nbformat.NotebookNode, notebook: Path) -> str:
    for line in cell.source.splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    raise ValueError(f"{notebook}: the first cell must contain the chapter title as '# Title'")


def problems(notebook: Path, repo: Repository) -> list[str]:
    """What is wrong with a notebook's head (badge cell, setup cell); empty when it is in step."""
    nb = nbformat.read(notebook, as_version=4)
    found: list[str] = []
    if len(nb.cells) < 2:
        return [f"{notebook.name}: needs at least a title/badge cell and a setup cell"]
    first, second = nb.cells[0], nb.cells[1]
    if first.cell_type != "markdown" or badge_markdown(repo, notebook) not in first.source:
        found.append(f"{notebook.name}: first cell lacks the current Colab badge")
    if second.cell_type != "code" or second.source != setup_source(repo):
        found.append(f"{notebook.name}: second cell is not the current setup cell")
    elif set(SETUP_TAGS) - set(second.metadata.get("tags", [])):
        found.append(f"{notebook.name}: setup cell must be tagged {', '.join(SETUP_TAGS)}")
    if nb.metadata.get("kernelspec", {}).get("name") != KERNELSPEC["name"]:
        found.append(f"{notebook.name}: kernelspec must be {KERNELSPEC['name']!r}")
    return found


def write_head(notebook: Path, repo: Repository) -> bool:
    """Insert or refresh the badge and setup cell; returns whether the file changed."""
    nb = nbformat.read(notebook, as_version=4)
    before = nbformat.writes(nb)
    if not nb.cells or nb.cells[0].cell_type != "markdown":
        raise ValueError(f"{notebook}: the first cell must be markdown with the chapter title")
    first = nb.cells[0]
    body = re.sub(
        rf"{re.escape(BADGE_MARKER)}\n\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)\n*", "", first.source
    )
    first.source = f"{badge_markdown(repo, notebook)}\n\n{body.lstrip()}"
    has_setup = len(nb.cells) > 1 and nb.cells[1].cell_type == "code" and SETUP_MARKER in nb.cells[1].source
    setup = nb.cells[1] if has_setup else nbformat.v4.new_code_cell("")
    setup.source = setup_source(repo)
    setup.metadata["tags"] = sorted(set(setup.metadata.get("tags", [])) | set(SETUP_TAGS))
    setup.outputs, setup.execution_count = [], None
    if not has_setup:
        nb.cells.insert(1, setup)
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata.setdefault("language_info", {"name": "python"})
    after = nbformat.writes(nb)
    if after != before:
        nbformat.write(nb, notebook)
    return after != before


def strip_outputs(notebook: Path) -> bool:
    nb = nbformat.read(notebook, as_version=4)
    before = nbformat.writes(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nb.metadata.pop("widgets", None)
    after = nbformat.writes(nb)
    if after != before:
        nbformat.write(nb, notebook)
    return after != before


def new_chapter(name: str, title: str, repo: Repository) -> Path:
    path = NOTEBOOKS / f"{name}.ipynb"
    if path.exists():
        raise FileExistsError(f"{path} already exists")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = [
        *expected_head(repo, path, title),
        nbformat.v4.new_markdown_cell("One paragraph: what this chapter builds and which Qwen claim it checks."),
        nbformat.v4.new_code_cell(
            "import torch\n\nimport qwen_edu\nfrom qwen_edu import get_device, seed_everything\n\n"
            "device = get_device()\nseed_everything(0)\nprint(qwen_edu.describe_device(device))"
        ),
        nbformat.v4.new_markdown_cell("## Summary\n\n- ..."),
        nbformat.v4.new_markdown_cell("## Exercises\n\n1. ..."),
    ]
    nbformat.write(nb, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check")
    sub.add_parser("write")
    sub.add_parser("strip")
    new = sub.add_parser("new")
    new.add_argument("name", help="file stem, e.g. 03_pretraining")
    new.add_argument("title")
    args = parser.parse_args(argv)

    repo = read_repository()
    notebooks = sorted(NOTEBOOKS.glob("*.ipynb"))
    if args.command == "new":
        print(f"created {new_chapter(args.name, args.title, repo).relative_to(ROOT)}; add it to _toc.yml")
        return 0
    if args.command == "check":
        found = [p for nb in notebooks for p in problems(nb, repo)]
        print("\n".join(found) or f"{len(notebooks)} notebooks in step with _config.yml")
        return 1 if found else 0
    action = write_head if args.command == "write" else lambda nb, _repo: strip_outputs(nb)
    for nb in notebooks:
        if action(nb, repo):
            print(f"updated {nb.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
