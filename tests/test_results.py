"""Tests of neonb.results: reading the chapters' tables and run environments back."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from neonb.errors import DataError
from neonb.results import pair_with_paper, read_table, run_environments


def test_read_table_names_the_chapter_to_run(tmp_path):
    with pytest.raises(DataError, match=r"table3\.tsv.*notebooks/03_budgeting\.ipynb"):
        read_table(tmp_path, "03_budgeting", "table3.tsv")
    (tmp_path / "01_pipeline").mkdir()
    pd.DataFrame({"a": [1, 2]}).to_csv(tmp_path / "01_pipeline" / "t.tsv", sep="\t", index=False)
    assert read_table(tmp_path, "01_pipeline", "t.tsv")["a"].tolist() == [1, 2]


def test_run_environments_lists_every_run_with_its_device(tmp_path):
    cpu = {"device": "cpu", "torch_threads": 2, "torch": "2.13.0+cpu", "monai": "1.6.1"}
    gpu = {**cpu, "device": "cuda", "cuda_device": "NVIDIA H100", "cuda_version": "12.8"}
    for folder, record in (("01_pipeline/run-0", cpu), ("04_transfer/source", gpu)):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "environment.json").write_text(json.dumps(record))
    table = run_environments(tmp_path)
    assert table[["chapter", "run"]].values.tolist() == [
        ["01_pipeline", "run-0"],
        ["04_transfer", "source"],
    ]
    assert table["environment"].iloc[0].startswith("CPU, 2 threads; torch 2.13.0+cpu")
    assert table["environment"].iloc[1].startswith("NVIDIA H100 (CUDA 12.8)")
    assert run_environments(tmp_path / "nothing").empty


def test_pair_with_paper_matches_each_cell_with_the_papers():
    table = pd.DataFrame(
        {"CSF": ["0.900 ± 0.01", 0.8, 0.7], "WM": ["0.5", "0.6", None]},  # mean ± std over runs
        index=pd.MultiIndex.from_tuples(
            [("test", "neonb (synthetic)"), ("test", "paper"), ("val", "neonb (synthetic)")],
            names=["set", "source"],
        ),
    )
    pairs = pair_with_paper(table, "Table 2")
    assert pairs.to_dict("records") == [
        {"table": "Table 2", "group": "test", "quantity": "CSF", "paper": 0.8, "neonb": 0.9},
        {"table": "Table 2", "group": "test", "quantity": "WM", "paper": 0.6, "neonb": 0.5},
    ]


def test_pair_with_paper_joins_two_column_levels():
    table = pd.DataFrame(
        [[0.5, 0.6], [0.9, 0.8]],
        index=pd.MultiIndex.from_tuples([("full", "neonb"), ("full", "paper")]),
        columns=pd.MultiIndex.from_tuples([("test", "Mean DSC"), ("test", "Mean DSC (no BG)")]),
    )
    pairs = pair_with_paper(table, "Table 3")
    assert pairs["quantity"].tolist() == ["test, Mean DSC", "test, Mean DSC (no BG)"]
    assert pairs["paper"].tolist() == [0.9, 0.8] and pairs["neonb"].tolist() == [0.5, 0.6]
