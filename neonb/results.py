"""Read back what the study's chapters wrote, and where it was computed.

Every chapter writes its tables as TSV files under ``<results_dir>/<chapter>/`` and its
training runs as folders holding ``environment.json`` (software versions, device, start
time; :func:`neonb.engine.environment_record`). The closing chapter, which puts the paper's
tables beside neonb's, reads them through these functions, so each number it shows is the
one its chapter computed, with the hardware it was computed on.

Example:
    >>> table1 = read_table("results/demo", "01_pipeline", "table1.tsv", index_col=[0, 1])
    >>> environments = run_environments("results/demo")
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from neonb.engine import ENVIRONMENT_FILE
from neonb.errors import DataError


def read_table(
    results_dir: str | os.PathLike, chapter: str, name: str, **read_csv: Any
) -> pd.DataFrame:
    """One TSV table a chapter wrote, e.g. ``results/demo/01_pipeline/table1.tsv``.

    Args:
        results_dir: the study's results folder (``results_dir`` of ``params/*/study.yaml``).
        chapter: the chapter's notebook name, e.g. ``"01_pipeline"``.
        name: the file name within the chapter's folder.
        **read_csv: passed to :func:`pandas.read_csv` (e.g. ``index_col``).

    Raises:
        DataError: naming the file and the notebook to run when it does not exist.
    """
    path = Path(results_dir) / chapter / name
    if not path.is_file():
        raise DataError(
            path,
            "missing",
            f"run notebooks/{chapter}.ipynb first (`neonb study` runs the chapters in order)",
        )
    return pd.read_csv(path, sep="\t", **read_csv)


def describe_environment(record: dict[str, Any]) -> str:
    """A short line for one ``environment.json``: the device and the software versions."""
    if record.get("cuda_device"):
        device = f"{record['cuda_device']} (CUDA {record.get('cuda_version')})"
    else:
        threads = record.get("torch_threads", "?")
        device = f"CPU, {threads} thread{'' if threads == 1 else 's'}"
    return f"{device}; torch {record.get('torch')}, MONAI {record.get('monai')}"


def run_environments(results_dir: str | os.PathLike) -> pd.DataFrame:
    """Where every training run under ``results_dir`` was computed.

    Returns:
        One row per run folder: ``chapter``, ``run`` (the folder within the chapter),
        ``environment`` (:func:`describe_environment`), ``started`` (ISO time) and
        ``platform``; sorted by chapter and run. Empty if no run was found.
    """
    rows = []
    results_dir = Path(results_dir)
    for path in sorted(results_dir.glob(f"*/**/{ENVIRONMENT_FILE}")):
        record = json.loads(path.read_text(encoding="utf-8"))
        chapter, *run = path.parent.relative_to(results_dir).parts
        rows.append(
            {
                "chapter": chapter,
                "run": "/".join(run) or ".",
                "environment": describe_environment(record),
                "started": record.get("started"),
                "platform": record.get("platform"),
            }
        )
    columns = ["chapter", "run", "environment", "started", "platform"]
    return pd.DataFrame(rows, columns=columns)


def pair_with_paper(table: pd.DataFrame, name: str) -> pd.DataFrame:
    """Long pairs of neonb's and the paper's value of each cell of a side-by-side table.

    Args:
        table: rows indexed ``(group, source)`` where ``source`` is ``"paper"`` for the
            paper's row and anything else for neonb's (as Tables 2 and 4 are written);
            one column per quantity (e.g. tissue; two column levels are joined as
            ``"test, Mean DSC"``), numbers or ``"mean ± std"`` text (its mean is paired).
        name: the table's name, e.g. ``"Table 2"``.

    Returns:
        Columns ``table``, ``group``, ``quantity``, ``paper``, ``neonb``: one row per
        group and quantity where both values exist.
    """
    if isinstance(table.columns, pd.MultiIndex):  # e.g. Table 3: (set, metric)
        table = table.set_axis([", ".join(map(str, c)) for c in table.columns], axis=1)
    long = table.stack().rename("value").reset_index()
    long.columns = ["group", "source", "quantity", "value"]
    long["source"] = long["source"].where(long["source"] == "paper", "neonb")
    # "0.934 ± 0.0004" (mean ± std over runs) pairs by its mean
    mean = long["value"].astype(str).str.split("±").str[0].str.strip()
    long["value"] = pd.to_numeric(mean, errors="coerce")
    pairs = long.pivot_table(
        index=["group", "quantity"], columns="source", values="value", sort=False
    )
    pairs = pairs.dropna(subset=[c for c in ("paper", "neonb") if c in pairs]).reset_index()
    pairs.columns.name = None
    pairs.insert(0, "table", name)
    return pairs[["table", "group", "quantity", "paper", "neonb"]]
