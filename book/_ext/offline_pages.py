"""Pages that work without a network, and without script errors.

* ``book/_static`` (the book's CSS and its Colab badge) is added to every build, also the one-page
  builds of a single notebook, and ``qwen-book.css`` is loaded on every page.
* The Open-in-Colab badge at the top of every notebook points at an image on Colab's site (the right
  thing inside Colab and on GitHub). In the rendered book the image is swapped for the book's own
  badge, ``book/_static/colab-badge.svg``, so the page shows a badge, not a broken image, offline.
* Sphinx 7.4 renders an inline script twice when an extension adds it after the builder has started
  (the builder keeps it under the name ``None``, and again under ``''`` when it copies the
  registry in ``prepare_writing``). sphinx-thebe's ``const THEBE_JS_URL = ...`` is such a script, so
  every page threw "Identifier 'THEBE_JS_URL' has already been declared". Each page now gets each
  inline script once.

MathJax is served from the build by the sphinx-mathjax-offline extension (see ``_config.yml``).
"""

from __future__ import annotations

from pathlib import Path

from docutils import nodes
from sphinx.util.osutil import relative_uri

STATIC = Path(__file__).resolve().parents[1] / "_static"
LOCAL_BADGE = "_static/colab-badge.svg"


def is_remote_colab_badge(uri: str) -> bool:
    return uri.startswith("https://colab.research.google.com/") and uri.endswith("colab-badge.svg")


def use_local_badge(app, doctree: nodes.document, docname: str) -> None:
    if app.builder.format != "html":
        return
    local = relative_uri(app.builder.get_target_uri(docname), LOCAL_BADGE)
    for image in doctree.findall(nodes.image):
        if is_remote_colab_badge(image.get("uri", "")):
            image["uri"] = local  # its candidates stay {"?": ...}: Sphinx copies nothing


def drop_repeated_scripts(app, pagename: str, templatename: str, context: dict, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen: set[tuple] = set()
    unique = []
    for script in scripts:
        key = (script.filename or "", script.priority, tuple(sorted(script.attributes.items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    scripts[:] = unique


def add_static_folder(app) -> None:
    app.config.html_static_path.append(str(STATIC))


def setup(app) -> dict:
    app.connect("builder-inited", add_static_folder)
    app.add_css_file("qwen-book.css")
    app.connect("doctree-resolved", use_local_badge)
    # After every other handler (MathJax, myst-nb) has added its scripts to the page.
    app.connect("html-page-context", drop_repeated_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
