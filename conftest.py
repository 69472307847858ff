"""Root pytest hooks: hand the notebooks that nbval executed to the book build.

The test command runs every chapter notebook once under nbval (``--nbval-lax``: each cell must run
without error; cells tagged ``nbval-check-output`` must also reproduce their stored output). Running
``jupyter-book build`` afterwards would execute every notebook a second time. To avoid that, pass
``--nb-cache _build/.jupyter_cache``: as each notebook finishes without a failure, the outputs nbval
collected are written back into a copy of the notebook and stored in that jupyter-cache, which is the
cache the book reads with ``execute_notebooks: cache``. The book build then finds a hash match for every
unchanged notebook and executes nothing. A notebook with any failing cell is never cached, so the book
build executes it (and fails) on its own.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest

_STAGING = "nbval-executed"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--nb-cache",
        default=None,
        metavar="DIR",
        help="store notebooks executed by nbval in this jupyter-cache folder (read by the book build)",
    )


class _NotebookRun:
    def __init__(self) -> None:
        self.outputs: dict[int, list] = {}
        self.failed = False
        self.started = time.perf_counter()


_runs: dict[str, _NotebookRun] = {}


def _is_nbval_cell(item: pytest.Item) -> bool:
    return hasattr(item, "cell_num") and hasattr(item, "test_outputs")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    if not _is_nbval_cell(item) or not item.config.getoption("--nb-cache"):
        return
    report = outcome.get_result()
    run = _runs.setdefault(str(item.parent.path), _NotebookRun())
    if report.failed:
        run.failed = True
    if call.when == "call" and report.passed and item.test_outputs is not None:
        run.outputs[item.cell_num] = copy.deepcopy(item.test_outputs)


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    cache_dir = item.config.getoption("--nb-cache")
    if not cache_dir or not _is_nbval_cell(item):
        return
    if nextitem is not None and getattr(nextitem, "parent", None) is item.parent:
        return  # the notebook has more cells to run
    run = _runs.pop(str(item.parent.path), None)
    if run is None or run.failed:
        return
    _stage_executed_notebook(item, run, Path(cache_dir))


def _stage_executed_notebook(item: pytest.Item, run: _NotebookRun, cache_dir: Path) -> None:
    """Write the executed notebook next to the cache; the controller process stores it."""
    import nbformat

    notebook = copy.deepcopy(item.parent.nb)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    for number, cell in enumerate(code_cells, start=1):
        cell.execution_count = number
        cell.outputs = [nbformat.from_dict(dict(out)) for out in run.outputs.get(number - 1, [])]
        for out in cell.outputs:
            if out.output_type == "execute_result":
                out.execution_count = number
    nbformat.validate(notebook)
    staging = cache_dir.parent / _STAGING
    staging.mkdir(parents=True, exist_ok=True)
    target = staging / Path(item.parent.path).name
    notebook.metadata["qwen_edu_execution_seconds"] = round(time.perf_counter() - run.started, 2)
    notebook.metadata["qwen_edu_source"] = str(Path(item.parent.path).resolve())
    nbformat.write(notebook, target)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    cache_dir = session.config.getoption("--nb-cache")
    if not cache_dir or hasattr(session.config, "workerinput"):
        return  # only the controller (or a run without xdist) talks to the cache database
    staging = Path(cache_dir).parent / _STAGING
    if not staging.is_dir():
        return
    import nbformat
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    cache = get_cache(str(cache_dir))
    stored = []
    for path in sorted(staging.glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        seconds = notebook.metadata.pop("qwen_edu_execution_seconds", None)
        source = notebook.metadata.pop("qwen_edu_source", str(path))
        cache.cache_notebook_bundle(
            CacheBundleIn(notebook, source, data={"execution_seconds": seconds}),
            check_validity=True,
            overwrite=True,
        )
        stored.append(f"{Path(source).name} ({seconds} s)")
        path.unlink()
    if stored:
        session.config.get_terminal_writer().line(
            f"\nnb-cache: stored {len(stored)} executed notebook(s) in {cache_dir}: {', '.join(stored)}"
        )
