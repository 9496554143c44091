"""Sphinx fixes the neonb book needs on top of Jupyter Book 1.x.

sphinx-thebe 0.3 registers its configuration script once per read of the sources, and
Jupyter Book reads them twice, so each page declared ``const THEBE_JS_URL`` twice and
the browser reported a SyntaxError. Scripts are made unique per page here; the test that
opens the built book in Chromium (tests/test_study.py) fails if the error comes back.
"""

from __future__ import annotations

from typing import Any


def _script_key(script: Any) -> tuple[str, tuple[tuple[str, str], ...]]:
    # an inline script's filename is None or "" depending on who added it
    filename = getattr(script, "filename", script) or ""
    attributes = getattr(script, "attributes", {}) or {}
    return str(filename), tuple(sorted((k, str(v)) for k, v in attributes.items()))


def drop_duplicate_scripts(app, pagename, templatename, context, doctree) -> None:
    """Keep the first of any scripts that a page would load twice."""
    scripts = context.get("script_files")
    if not scripts:
        return
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    unique = []
    for script in scripts:
        key = _script_key(script)
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def setup(app) -> dict[str, Any]:
    app.connect("html-page-context", drop_duplicate_scripts)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
