"""Tests of neonb.metrics against values worked out by hand on tiny label maps."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from monai.metrics import compute_dice
from monai.networks.utils import one_hot

from neonb.errors import ConfigError
from neonb.labels import NUM_CLASSES
from neonb.metrics import (
    ClassDiceMetric,
    case_summary,
    class_column,
    dice_per_class,
    dice_scores,
    evaluate_case,
    format_mean_std,
    hd95_per_class,
    paper_table,
    summarize_runs,
    volumes_ml,
)


def _halves() -> tuple[np.ndarray, np.ndarray]:
    """A 4×4×4 case: label is class 1 for x < 2 and class 2 for x ≥ 2 (32 voxels each).

    The prediction has class 1 for x = 0 (16 voxels), class 2 elsewhere except one
    voxel of class 3 (a false positive), so
    Dice_1 = 2·16 / (32 + 16) = 2/3, Dice_2 = 2·31 / (32 + 47) = 62/79, Dice_3 = 0.
    """
    label = np.zeros((4, 4, 4), np.uint8)
    label[:2], label[2:] = 1, 2
    pred = np.full((4, 4, 4), 2, np.uint8)
    pred[:1] = 1
    pred[3, 3, 3] = 3
    return pred, label


def _slabs(axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Two 2-voxel-thick 3×3 slabs of class 1, 5 voxels apart (start to start) along ``axis``.

    Every voxel of a 2-thick slab is on its surface; half the surface voxels are 4 voxels
    from the other slab, half 5, so HD95 = HD = 5 voxels along ``axis``.
    """
    a = np.zeros((12, 12, 12), np.uint8)
    b = np.zeros_like(a)
    near, far = [slice(2, 5)] * 3, [slice(2, 5)] * 3
    near[axis], far[axis] = slice(0, 2), slice(5, 7)
    a[tuple(near)] = 1
    b[tuple(far)] = 1
    return a, b


def test_dice_per_class_hand_computed():
    pred, label = _halves()
    dice = dice_per_class(pred, label)
    assert dice.shape == (NUM_CLASSES,)
    np.testing.assert_allclose(dice[[1, 2, 3]], [2 / 3, 62 / 79, 0.0], rtol=1e-6)
    # classes absent from both prediction and label are NaN, not 1 or 0
    assert np.isnan(dice[[0, *range(4, 10)]]).all()


def test_dice_present_only_in_label_is_zero():
    label = np.zeros((4, 4, 4), np.uint8)
    label[0, 0, 0] = 5
    dice = dice_per_class(np.zeros_like(label), label)
    assert dice[5] == 0.0
    assert dice[0] == pytest.approx(2 * 63 / (63 + 64))


def test_dice_scores_match_monai_on_one_hot():
    pred, label = _halves()
    p = torch.as_tensor(pred)[None, None].long()
    t = torch.as_tensor(label)[None, None].long()
    ours = dice_scores(p, t, NUM_CLASSES)
    monai = compute_dice(one_hot(p, NUM_CLASSES), one_hot(t, NUM_CLASSES), ignore_empty=False)
    present = ~torch.isnan(ours)
    assert torch.allclose(ours[present], monai[present].float())


def test_class_dice_metric_skips_absent_classes_in_the_mean():
    _, label = _halves()
    t = torch.as_tensor(label)[None, None]
    metric = ClassDiceMetric(NUM_CLASSES)
    metric(y_pred=t, y=t)  # perfect on a patch holding classes 1 and 2
    other = torch.zeros_like(t)  # a patch of class 0 only, predicted as class 1
    metric(y_pred=other + 1, y=other)
    per_class = metric.per_class()
    assert per_class[0] == 0.0  # missed entirely in patch 2
    assert per_class[1] == pytest.approx(0.5)  # 1.0 in patch 1, 0.0 (false positive) in patch 2
    assert per_class[2] == 1.0  # patch 2 has no class 2: skipped, not counted as 0 or 1
    assert torch.isnan(per_class[3:]).all()


def test_hd95_on_offset_slabs_uses_anisotropic_spacing():
    spacing = (1.0, 1.0, 2.5)
    for axis, mm in ((2, 2.5), (0, 1.0)):
        a, b = _slabs(axis)
        hd = hd95_per_class(a, b, spacing, num_classes=2)
        assert hd[1] == pytest.approx(5 * mm)
        # class 0 is the complement of the slabs: it touches the slabs' surfaces
        assert np.isfinite(hd[0])


def test_hd95_ignores_a_five_percent_outlier():
    label = np.zeros((20, 20, 20), np.uint8)
    label[2:8, 2:8, 2:8] = 1
    pred = label.copy()
    pred[18, 18, 18] = 1  # one stray voxel among 152 surface voxels
    hd = hd95_per_class(pred, label, (1.0, 1.0, 1.0), num_classes=2)
    assert hd[1] == 0.0


def test_hd95_is_nan_when_a_class_is_missing_from_either_image():
    pred, label = _halves()
    hd = hd95_per_class(pred, label, (1.0, 1.0, 1.0))
    assert np.isfinite(hd[[1, 2]]).all()
    assert np.isnan(hd[3])  # only in the prediction
    assert np.isnan(hd[0])  # in neither


def test_volumes_in_ml_from_spacing():
    pred, label = _halves()
    vol = volumes_ml(label, (0.5, 0.5, 2.0))
    assert vol[1] == pytest.approx(32 * 0.5 / 1000)
    assert vol.sum() == pytest.approx(64 * 0.5 / 1000)


def test_evaluate_case_rows():
    pred, label = _halves()
    rows = evaluate_case(pred, label, (0.5, 0.5, 2.0), {"participant_id": "A", "session_id": "1"})
    assert len(rows) == NUM_CLASSES
    assert list(rows.columns[:4]) == ["participant_id", "session_id", "label", "short_name"]
    assert rows.loc[5, "short_name"] == "Ventr."
    assert rows["is_background"].tolist() == [i in (0, 4) for i in range(10)]
    assert rows.loc[2, "dice"] == pytest.approx(62 / 79)
    assert rows.loc[3, "volume_pred_ml"] == pytest.approx(0.5 / 1000)
    assert rows.loc[3, "volume_true_ml"] == 0.0


def test_case_summary_means_skip_nan_and_background():
    pred, label = _halves()
    rows = evaluate_case(pred, label, (1.0, 1.0, 1.0), {"participant_id": "A", "session_id": "1"})
    label[0, 0, 0] = 0  # case B: a perfect prediction of classes 0, 1 and 2
    rows2 = evaluate_case(label, label, (1.0, 1.0, 1.0), {"participant_id": "B", "session_id": "1"})
    summary = case_summary(pd.concat([rows, rows2]))
    assert summary["participant_id"].tolist() == ["A", "B"]
    # case A: classes 1, 2, 3 are scored (none of them background)
    expected = (2 / 3 + 62 / 79 + 0.0) / 3
    assert summary.loc[0, "dice_mean"] == pytest.approx(expected)
    assert summary.loc[0, "dice_mean_nobg"] == pytest.approx(expected)
    # case B: perfect on classes 0, 1, 2; the no-BG mean leaves out class 0
    assert summary.loc[1, "dice_mean"] == 1.0
    assert summary.loc[1, "dice_mean_nobg"] == 1.0
    assert summary.loc[1, "hd95_mean_mm"] == 0.0


def test_evaluate_case_without_spacing_scores_dice_only():
    pred, label = _halves()
    ids = {"participant_id": "A", "session_id": "1", "scan_age": 40.5}
    full = evaluate_case(pred, label, (1.0, 1.0, 1.0), ids)
    dice_only = evaluate_case(pred, label, None, ids)
    assert list(dice_only.columns) == [
        "participant_id", "session_id", "scan_age", "label", "short_name", "is_background", "dice"
    ]  # fmt: skip
    pd.testing.assert_frame_equal(dice_only, full[dice_only.columns])


def test_case_summary_groups_by_the_given_columns_with_or_without_hd95():
    pred, label = _halves()
    rows = [
        evaluate_case(p, label, None, {"participant_id": "A", "session_id": "1"}).assign(
            strategy=s, run=r
        )
        for s, r, p in [("none", 0, pred), ("deep", 0, label), ("deep", 1, pred)]
    ]
    by = ("strategy", "run", "participant_id", "session_id")
    summary = case_summary(pd.concat(rows, ignore_index=True), by=by)
    assert list(summary.columns) == [*by, "dice_mean", "dice_mean_nobg"]  # no HD95 columns
    assert summary[["strategy", "run"]].values.tolist() == [["none", 0], ["deep", 0], ["deep", 1]]
    assert summary["dice_mean_nobg"].tolist() == pytest.approx(
        [(2 / 3 + 62 / 79 + 0.0) / 3, 1.0, (2 / 3 + 62 / 79 + 0.0) / 3]
    )
    with pytest.raises(ConfigError, match=r"lacks the column\(s\) \['condition'\]"):
        case_summary(rows[0], by=("condition", "participant_id"))


def test_summarize_runs_mean_std_and_format():
    per_run = pd.DataFrame(
        {
            "run": [0, 0, 1, 1, 0, 1],
            "split": ["val", "val", "val", "val", "test", "test"],
            "label": [1, 1, 1, 1, 1, 1],
            "short_name": ["CSF"] * 6,
            "dice": [0.90, 0.94, 0.93, 0.93, 0.90, np.nan],  # two cases per validation run
        }
    )
    summary = summarize_runs(per_run)
    val = summary[summary["split"] == "val"].iloc[0]
    assert val["mean"] == pytest.approx(0.925)  # run means 0.92 and 0.93
    assert val["std"] == pytest.approx(np.std([0.92, 0.93], ddof=1))
    assert val["n_runs"] == 2
    assert val["formatted"] == "0.925 ± 0.007"
    test = summary[summary["split"] == "test"].iloc[0]
    assert test["n_runs"] == 1  # the NaN run does not count
    assert test["formatted"] == "0.900"
    table = paper_table(summary)
    assert table.loc["CSF", "val"] == "0.925 ± 0.007"
    assert list(table.columns) == ["val", "test"]


def test_format_mean_std_like_the_paper():
    assert format_mean_std(0.93412, 0.00041) == "0.934 ± 0.0004"
    assert format_mean_std(0.913, 0.0031) == "0.913 ± 0.003"


def test_class_column_names_are_safe():
    assert class_column(5) == "dice_Ventr"
    assert class_column(0) == "dice_BG_outer"
    assert class_column(12) == "dice_12"


@pytest.mark.parametrize(
    ("pred", "label", "spacing"),
    [
        (np.zeros((4, 4, 4), int), np.zeros((4, 4, 5), int), (1, 1, 1)),  # shapes differ
        (np.full((4, 4, 4), 10), np.zeros((4, 4, 4), int), (1, 1, 1)),  # not a class
        (np.zeros((4, 4, 4), int), np.zeros((4, 4, 4), int), (1, 1)),  # spacing too short
        (np.zeros((4, 4, 4), int), np.zeros((4, 4, 4), int), (1, 0, 1)),  # zero spacing
    ],
)
def test_bad_inputs_raise(pred, label, spacing):
    with pytest.raises(ConfigError):
        hd95_per_class(pred, label, spacing)


def test_summarize_runs_names_missing_columns():
    with pytest.raises(ConfigError, match="run"):
        summarize_runs(pd.DataFrame({"dice": [0.9]}), by=())
