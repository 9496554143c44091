"""The smoke study end to end: every notebook, the book, and the book in a browser.

The browser test opens each built page in headless Chromium (Debian's ``chromium``,
which ``make test`` installs) with the network switched off, and fails on any JavaScript
error, any request that leaves the book's folder, or a plotly figure that did not draw.
It saves a screenshot of every page to ``build/screenshots/``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nbformat
import pytest

from neonb.study import NOTEBOOKS

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "build" / "screenshots"
# Least number of plotly figures each chapter draws on the smoke parameters.
FIGURES = {"00_data": 5, "01_pipeline": 4}
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
FIGURES_DRAWN = """() => {
    const divs = [...document.querySelectorAll('.plotly-graph-div')];
    return divs.length > 0 && divs.every(d => d._fullLayout && d.querySelector('.main-svg'));
}"""


def chapters(toc: str) -> list[str]:
    return [name for name in NOTEBOOKS if f"notebooks/{name}" in toc]


def test_smoke_study_runs_every_chapter_and_builds_the_book(smoke_study):
    assert smoke_study.index.is_file()
    toc = (smoke_study.book_dir / "_toc.yml").read_text()
    for name in chapters(toc):
        page = (smoke_study.html / "notebooks" / f"{name}.html").read_text()
        assert page.count('class="plotly-graph-div"') >= FIGURES.get(name, 1), name
        assert "cdn.plot.ly" not in page
        assert "google.colab" not in page  # the Colab cell is removed from the book
        assert any(line.startswith("[") and name in line for line in smoke_study.lines)
    assert (smoke_study.html / "_static" / "plotly.min.js").is_file()
    executed = nbformat.read(smoke_study.book_dir / "notebooks" / "00_data.ipynb", as_version=4)
    parameters = [c for c in executed.cells if "parameters" in c.metadata.get("tags", [])]
    assert "hide-input" in parameters[0].metadata["tags"]
    assert (smoke_study.workdir / "results" / "smoke" / "splits_pipeline.tsv").is_file()


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        message = "chromium is not installed (make test installs it: apt-get install chromium)"
        if os.environ.get("NEONB_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def test_book_pages_render_offline_without_javascript_errors(smoke_study):
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = _chromium()
    toc = (smoke_study.book_dir / "_toc.yml").read_text()
    pages = [smoke_study.html / "intro.html"] + [
        smoke_study.html / "notebooks" / f"{name}.html" for name in chapters(toc)
    ]
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        context = browser.new_context(offline=True, viewport={"width": 1280, "height": 900})

        def refuse_network(route):
            if not route.request.url.startswith("file:"):
                problems.append(f"requested {route.request.url}")
                return route.abort()
            return route.continue_()

        context.route("**/*", refuse_network)
        for path in pages:
            page = context.new_page()
            page.on("pageerror", lambda error, p=path: problems.append(f"{p.name}: {error}"))
            page.on(
                "console",
                lambda message, p=path: (
                    problems.append(f"{p.name}: {message.text}")
                    if message.type == "error"
                    else None
                ),
            )
            page.goto(path.as_uri(), wait_until="load")
            if path.parent.name == "notebooks":
                page.wait_for_function(FIGURES_DRAWN, timeout=30_000)
            page.screenshot(path=SCREENSHOTS / f"{path.stem}.png", full_page=True)
            page.close()
        browser.close()
    assert not problems, "\n".join(problems)
    assert (SCREENSHOTS / "01_pipeline.png").stat().st_size > 10_000
