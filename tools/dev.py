"""The README's commands: set up the environment, build the book, run every test.

Needs only Python 3.11+ on the machine; everything else is installed into ``.venv`` from PyPI,
with the versions locked in ``constraints.txt``::

    python3 tools/dev.py book     # build the rendered book into _build/html (executes the notebooks)
    python3 tools/dev.py test     # ruff, unit tests, nbval on every chapter, strict book build
    python3 tools/dev.py serve    # serve _build/html on http://localhost:8000

The environment is (re)installed only when ``pyproject.toml`` or ``constraints.txt`` changed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".qwen-edu-installed"
NB_CACHE = ROOT / "_build" / ".jupyter_cache"
EXTRAS = "book,test"


def run(*args: str | os.PathLike, **kwargs) -> None:
    printable = " ".join(str(a) for a in args)
    print(f"\n$ {printable}", flush=True)
    subprocess.run([str(a) for a in args], cwd=ROOT, check=True, **kwargs)


def run_quietly(*args: str | os.PathLike) -> None:
    """Run a setup command; show its output only if it fails (pip's build chatter is not news)."""
    printable = " ".join(str(a) for a in args)
    print(f"\n$ {printable}", flush=True)
    result = subprocess.run([str(a) for a in args], cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        print(result.stdout, result.stderr, sep="\n", file=sys.stderr)
        raise subprocess.CalledProcessError(result.returncode, [str(a) for a in args])


# The notebook kernels that nbval and the book build start talk to their client over localhost
# TCP, and ipykernel 7 warns about the missing transport encryption at every start. Neither nbval
# nor jupyter-cache lets us configure the client's transport, so the venv's own IPython config
# lowers the kernel application's log level instead (notebook output and Python warnings are
# unaffected).
KERNEL_CONFIG = VENV / "etc" / "ipython" / "ipython_kernel_config.py"
KERNEL_CONFIG_TEXT = 'c.IPKernelApp.log_level = "ERROR"  # written by tools/dev.py\n'


def environment_fingerprint() -> str:
    digest = hashlib.sha256()
    for name in ("pyproject.toml", "constraints.txt"):
        digest.update((ROOT / name).read_bytes())
    digest.update(sys.version.encode())
    return digest.hexdigest()


def ensure_environment() -> None:
    """Create .venv and install the package with its book and test extras, pinned by constraints.txt."""
    if sys.version_info < (3, 11):  # noqa: UP036 (the script may be started by an old python3)
        sys.exit(f"Python 3.11 or newer is needed; this is {sys.version.split()[0]}")
    fingerprint = environment_fingerprint()
    if PYTHON.exists() and STAMP.exists() and STAMP.read_text() == fingerprint and KERNEL_CONFIG.exists():
        return
    if not PYTHON.exists():
        print(f"creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    run_quietly(PYTHON, "-m", "pip", "install", "-q", "--upgrade", "pip")
    run_quietly(PYTHON, "-m", "pip", "install", "-q", "-c", "constraints.txt", "-e", f".[{EXTRAS}]")
    KERNEL_CONFIG.parent.mkdir(parents=True, exist_ok=True)
    KERNEL_CONFIG.write_text(KERNEL_CONFIG_TEXT)
    STAMP.write_text(fingerprint)


def toc_notebooks() -> list[str]:
    """Notebooks listed in _toc.yml, in book order."""
    toc = (ROOT / "_toc.yml").read_text()
    stems = re.findall(r"^\s*-?\s*file:\s*(notebooks/\S+)\s*$", toc, flags=re.MULTILINE)
    return [f"{stem}.ipynb" for stem in stems]


def command_book(_: argparse.Namespace) -> None:
    ensure_environment()
    run(BIN / "jupyter-book", "build", ".")
    index = ROOT / "_build" / "html" / "index.html"
    print(f"\nThe book is built. Open {index.as_uri()}\nor serve it with: python3 tools/dev.py serve")


def command_test(args: argparse.Namespace) -> None:
    ensure_environment()
    timings: list[tuple[str, float]] = []

    def step(name: str, *command: str | os.PathLike) -> None:
        start = time.perf_counter()
        run(*command)
        timings.append((name, time.perf_counter() - start))

    step("ruff", BIN / "ruff", "check", ".")
    # Each xdist worker (and each notebook kernel it starts) gets one intra-op thread: with two workers
    # on two cores, PyTorch's default of one thread per core oversubscribes the CPU, and OpenMP's
    # spin-waiting then slows every notebook down by an order of magnitude.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.workers)))
    pytest_args = [
        "-n", str(args.workers), "--dist", "loadfile",
        "--nbval-lax", "--nbval-current-env", "--nbval-cell-timeout", "900",
        "--nb-cache", str(NB_CACHE),
        "--ignore=tests/built_book", "tests", *toc_notebooks(),
    ]
    step("pytest: unit tests and notebooks (nbval)", PYTHON, "-m", "pytest", *pytest_args)
    step("book build (strict, reuses the nbval executions)",
         BIN / "jupyter-book", "build", ".", "-W", "-n", "--keep-going")
    os.environ["QWEN_EDU_REQUIRE_BUILT_BOOK"] = "1"
    step("checks on the built HTML, offline in Chromium (math, layout, bibliography, RoPE explorer)",
         PYTHON, "-m", "pytest", "-p", "no:cacheprovider", "tests/built_book")
    print("\nAll checks passed.")
    for name, seconds in timings:
        print(f"  {seconds:7.1f} s  {name}")


def command_serve(args: argparse.Namespace) -> None:
    html = ROOT / "_build" / "html"
    if not (html / "index.html").exists():
        sys.exit("No built book yet: run `python3 tools/dev.py book` first.")
    print(f"Serving {html} on http://localhost:{args.port} (Ctrl-C to stop)")
    subprocess.run([sys.executable, "-m", "http.server", str(args.port), "--directory", str(html)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("book", help="build the rendered book").set_defaults(func=command_book)
    test = sub.add_parser("test", help="run every test (ruff, unit, notebooks, strict book build)")
    test.add_argument("--workers", type=int, default=2, help="pytest-xdist workers (default 2)")
    test.set_defaults(func=command_test)
    serve = sub.add_parser("serve", help="serve the built book over HTTP")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(func=command_serve)
    sub.add_parser("env", help="only create/update .venv").set_defaults(func=lambda _: ensure_environment())
    args = parser.parse_args()
    try:
        args.func(args)
    except subprocess.CalledProcessError as error:
        sys.exit(f"\nFAILED (exit {error.returncode}): {' '.join(map(str, error.cmd))}")


if __name__ == "__main__":
    main()
