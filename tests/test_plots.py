"""Figures are built (never shown) with the traces a reader expects."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.io as pio
import pytest

from neonb import plots
from neonb.metrics import class_column


@pytest.fixture
def volume():
    rng = np.random.default_rng(0)
    image = np.zeros((12, 14, 10), np.float32)
    image[2:10, 3:12, 2:8] = rng.uniform(1, 2, (8, 9, 6))
    labels = (image > 1.5).astype(np.uint8) * 3
    return image, labels


def test_triplanar_has_image_and_overlay_per_view(volume):
    image, labels = volume
    fig = plots.triplanar(image, labels, voxel_size=(1.0, 1.0, 2.0))
    assert len(fig.data) == 6
    axial = fig.data[0].z
    assert np.shape(axial) == (14, 12)  # rows run along y (anterior up), columns along x
    with pytest.raises(ValueError, match="shape"):
        plots.triplanar(image, labels[:-1])


def test_compare_segmentations_stacks_prediction_over_reference(volume):
    image, labels = volume
    fig = plots.compare_segmentations(image, labels, np.zeros_like(labels))
    assert len(fig.data) == 12
    assert fig.layout.annotations[0].text == "axial: neonb"


def test_age_histogram_splits_preterm_and_term():
    manifest = pd.DataFrame({"scan_age": [30.0, 40.0, 41.0], "preterm": [True, False, False]})
    fig = plots.age_histogram(manifest)
    assert [len(trace.x) for trace in fig.data] == [1, 2]


def test_dice_curves_one_line_per_tissue_and_run():
    log = pd.DataFrame({"epoch": [1, 2, 1, 2], "run": [0, 0, 1, 1]})
    for index in range(10):
        log[class_column(index)] = [0.1, 0.2, 0.3, 0.4]
    fig = plots.dice_curves(log)
    assert len(fig.data) == 8 * 3  # eight tissues: two runs and their mean
    assert list(fig.data[2].y) == pytest.approx([0.2, 0.3])


def test_book_renderer_emits_html_without_plotly_js():
    assert plots.use_book_renderer() == "neonb"
    bundle = pio.renderers["neonb"].to_mimebundle(
        plots.age_histogram(pd.DataFrame({"scan_age": [40.0], "preterm": [False]})).to_dict()
    )
    assert "application/vnd.plotly.v1+json" in bundle
    assert "plotly-graph-div" in bundle["text/html"]
    assert "cdn.plot.ly" not in bundle["text/html"] and len(bundle["text/html"]) < 100_000


def test_paper_vs_neonb_has_one_trace_per_table_and_the_diagonal():
    pairs = pd.DataFrame(
        {
            "table": ["Table 2", "Table 2", "Table 4"],
            "group": ["test", "test", "full"],
            "quantity": ["CSF", "WM", "CSF"],
            "paper": [0.9, 0.8, 0.7],
            "neonb": [0.85, 0.82, 0.6],
        }
    )
    fig = plots.paper_vs_neonb(pairs)
    assert [trace.name for trace in fig.data] == ["Table 2", "Table 4", "equal"]
    assert list(fig.data[0].y) == [0.85, 0.82]
