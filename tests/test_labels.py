"""The drawem9 label table."""

from __future__ import annotations

import pandas as pd

from neonb.labels import (
    BACKGROUND_LABELS,
    DRAWEM9,
    NUM_CLASSES,
    TISSUE_LABELS,
    colors,
    short_names,
    write_dseg_tsv,
)


def test_table_matches_the_dhcp_drawem9_definition():
    assert NUM_CLASSES == 10
    assert DRAWEM9[5].name == "Ventricles" and DRAWEM9[9].name == "Hippocampi and amygdala"
    assert BACKGROUND_LABELS == (0, 4)
    assert TISSUE_LABELS == (1, 2, 3, 5, 6, 7, 8, 9)
    assert short_names(TISSUE_LABELS) == [
        "CSF",
        "cGM",
        "WM",
        "Ventr.",
        "Cereb.",
        "dGM",
        "BS",
        "Hippoc.",
    ]


def test_colours_are_distinct_hex():
    palette = colors()
    assert len(set(palette)) == NUM_CLASSES
    assert all(c.startswith("#") and len(c) == 7 for c in palette)


def test_dseg_tsv_is_a_bids_lookup_table(tmp_path):
    path = write_dseg_tsv(tmp_path / "dseg.tsv")
    table = pd.read_csv(path, sep="\t")
    assert list(table.columns[:3]) == ["index", "name", "abbreviation"]
    assert table["index"].tolist() == list(range(10))
    assert [p.name for p in tmp_path.iterdir()] == ["dseg.tsv"]  # no temporary file left
