"""Writing files so that a reader never sees half of one.

Every output neonb writes (tables, checkpoints, logs) goes to a hidden temporary name in
the destination folder and is renamed into place only once complete; an interrupted
write leaves the previous file, or none, never a truncated one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


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
