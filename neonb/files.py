"""Writing files so that a reader never sees half of one.

Every output neonb writes (tables, checkpoints, logs) goes to a hidden temporary name in
the destination folder and is renamed into place only once complete; an interrupted
write leaves the previous file, or none, never a truncated one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from neonb.errors import DataError

ID_COLUMNS = ("participant_id", "session_id")
"""Columns read back as text, so ids such as ``"0123"`` keep their leading zeros."""


def default_file_mode() -> int:
    """The mode a newly created file gets from ``open()``: ``0o666`` less the umask.

    Read from ``/proc/self/status`` where Linux offers it (setting the umask to read it back
    is not thread-safe); elsewhere the umask is set and restored at once.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold a lock file while a long writer runs; a second holder is refused at once.

    The lock is an ``fcntl.flock`` on ``path``, which holds the owner's process id. The
    operating system releases it when its owner ends, however it ends, so a lock file left
    by a process that died is simply taken over. The file is removed on exit.

    Args:
        path: the lock file (its folder must exist).
        what: what the lock protects, for the message (e.g. ``"a neonb segment --batch"``).

    Yields:
        ``path``.

    Raises:
        DataError: naming the lock file and the process id that holds it.
    """
    path = Path(path)
    while True:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, default_file_mode())
        except OSError as err:
            raise DataError(path, f"cannot create the lock file: {err.strerror or err}") from err
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(descriptor)
            raise DataError(
                path,
                f"locked by {what} still running (process {holder}) into the same folder",
                hint="wait for it to finish, or write to another folder",
            ) from None
        try:  # the lock holds only if no one removed the file between our open and flock
            same = os.fstat(descriptor).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(descriptor)
    try:
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode())
        yield path
    finally:
        path.unlink(missing_ok=True)
        os.close(descriptor)


def temporary_name(path: str | os.PathLike) -> Path:
    """The hidden name :func:`atomic_write` writes ``path`` to before renaming it.

    Example:
        >>> temporary_name("out/sub-1_dseg.nii.gz").name
        '.sub-1_dseg.tmp.nii.gz'
    """
    path = Path(path)
    suffixes = "".join(path.suffixes)
    stem = path.name[: len(path.name) - len(suffixes)] if suffixes else path.name
    return path.with_name(f".{stem}.tmp{suffixes}")


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
    tmp = temporary_name(path)
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


def read_json(path: str | os.PathLike, max_bytes: int) -> Any:
    """The JSON value of a file that may come from anyone (a model folder), read safely.

    At most ``max_bytes`` are read, so a huge or endless file is refused rather than loaded.

    Raises:
        DataError: naming the file when it is larger than ``max_bytes``, unreadable, not
            UTF-8, not JSON, or nested too deeply to parse.
    """
    size = f"{max_bytes // 2**20} MiB" if max_bytes % 2**20 == 0 else f"{max_bytes // 2**10} kiB"
    try:
        with open(path, "rb") as file:
            raw = file.read(max_bytes + 1)
        if len(raw) > max_bytes:
            raise DataError(path, f"is larger than {size}")
        return json.loads(raw.decode("utf-8"))
    except RecursionError as err:
        raise DataError(path, "is not readable JSON: nested too deeply") from err
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataError(path, f"is not readable JSON: {err}") from err
