"""Writing files so that a reader never sees half of one.

Every output neonb writes (tables, checkpoints, logs) goes to a hidden temporary name in
the destination folder and is renamed into place only once complete; an interrupted
write leaves the previous file, or none, never a truncated one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from neonb.errors import DataError

ID_COLUMNS = ("participant_id", "session_id")
"""Columns read back as text, so ids such as ``"0123"`` keep their leading zeros."""


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a hidden name beside ``path``, then rename it to ``path``.

    The temporary name keeps ``path``'s suffixes (``.log.tmp.tsv``), for writers that
    choose the format from the file name.

    Args:
        path: the destination file.
        write: writes the whole file to the path it is given.

    Returns:
        ``path``.
    """
    path = Path(path)
    suffixes = "".join(path.suffixes)
    stem = path.name[: len(path.name) - len(suffixes)] if suffixes else path.name
    tmp = path.with_name(f".{stem}.tmp{suffixes}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_id_table(table: pd.DataFrame, columns: Sequence[str], path: str | os.PathLike) -> Path:
    """Write ``table[columns]`` as TSV atomically, creating the folder. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: table[list(columns)].to_csv(tmp, sep="\t", index=False))


def read_id_table(path: str | os.PathLike, columns: Sequence[str], what: str) -> pd.DataFrame:
    """Read a TSV written by :func:`write_id_table`, with the ids (:data:`ID_COLUMNS`) as text.

    Args:
        path: the TSV file.
        columns: columns it must have.
        what: what the file holds, for the error (e.g. ``"splits"``).

    Raises:
        DataError: if the file is missing or lacks one of ``columns``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, f"no such {what} file")
    table = pd.read_csv(path, sep="\t", dtype=dict.fromkeys(ID_COLUMNS, str))
    missing = set(columns) - set(table.columns)
    if missing:
        raise DataError(path, f"missing column(s) {sorted(missing)}")
    return table
