"""Fixtures shared by several test modules."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from neonb.study import run_study

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class SmokeStudy:
    """The smoke study, run once per test session: every notebook, then the book."""

    book_dir: Path
    workdir: Path
    index: Path
    lines: tuple[str, ...]

    @property
    def html(self) -> Path:
        return self.book_dir / "_build" / "html"


@pytest.fixture(scope="session")
def smoke_study(tmp_path_factory) -> SmokeStudy:
    workdir = tmp_path_factory.mktemp("smoke-study")
    book_dir = shutil.copytree(
        ROOT / "book", workdir / "book", ignore=shutil.ignore_patterns("_build", "notebooks")
    )
    lines: list[str] = []
    index = run_study(
        ROOT / "params" / "smoke",
        book_dir=book_dir,
        workdir=workdir,
        echo=lambda *args, **kwargs: lines.append(" ".join(map(str, args))),
    )
    return SmokeStudy(book_dir, workdir, index, tuple(lines))
