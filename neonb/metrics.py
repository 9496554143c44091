"""Segmentation metrics per class, as tidy tables: Dice, HD95 and volumes.

Richter & Fetit (2022) report the Dice similarity coefficient (DSC) per drawem9 class
and its mean over all ten classes and over the eight tissues alone ("no BG", without
the background labels 0 and 4; see :data:`neonb.labels.BACKGROUND_LABELS`), each
averaged over repeated runs as mean ± standard deviation (Tables 1 and 2). This module
computes those numbers with :mod:`monai.metrics` and returns them as
:class:`pandas.DataFrame` rows, one per case and class, that are easy to average,
plot and test.

**Empty classes.** A class can be absent from a case (or, during validation, from a
patch). Its Dice score is then:

* ``NaN`` when the class is absent from *both* prediction and label (nothing to score;
  the same convention as nnU-Net), and ``NaN`` is skipped by every mean below;
* ``0`` when the class is absent from the label but predicted (false positives only),
  or present in the label but never predicted.

MONAI's ``ignore_empty`` cannot express this on its own: ``ignore_empty=True`` gives
``NaN`` whenever the label is empty, hiding false positives, and ``ignore_empty=False``
scores an absent-from-both class as a perfect 1.0, inflating the mean. neonb therefore
calls MONAI with ``ignore_empty=False`` and then sets the absent-from-both entries to
``NaN`` (:func:`dice_scores`). HD95 is ``NaN`` when the class is absent from either
image, since a distance to nothing is undefined.

Example:
    >>> rows = evaluate_case(pred, label, spacing=(0.5, 0.5, 0.5),
    ...                      ids={"participant_id": "CC001", "session_id": "1"})
    >>> case_summary(rows)[["dice_mean", "dice_mean_nobg"]]
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from monai.metrics import DiceMetric, compute_dice, compute_hausdorff_distance
from monai.metrics.utils import do_metric_reduction

from neonb.errors import ConfigError
from neonb.labels import BACKGROUND_LABELS, DRAWEM9, NUM_CLASSES

ArrayLike = np.ndarray | torch.Tensor

HD_PERCENTILE: float = 95.0
"""Percentile of the surface distances reported as the robust Hausdorff distance."""

MM3_PER_ML: float = 1000.0
"""Cubic millimetres in one millilitre."""

CASE_COLUMNS: list[str] = [
    "label",
    "short_name",
    "is_background",
    "dice",
    "hd95_mm",
    "volume_pred_ml",
    "volume_true_ml",
]
"""Columns of :func:`evaluate_case` after the case identifiers."""


def class_column(index: int, prefix: str = "dice_") -> str:
    """A safe column name for class ``index``, built from its paper short name.

    Non-alphanumeric characters become ``_`` and are trimmed, so ``Ventr.`` gives
    ``dice_Ventr`` and ``BG (outer)`` gives ``dice_BG_outer``. Indices outside drawem9
    give ``dice_<index>``.

    Example:
        >>> class_column(5)
        'dice_Ventr'
    """
    if index not in DRAWEM9:
        return f"{prefix}{index}"
    safe = re.sub(r"[^0-9A-Za-z]+", "_", DRAWEM9[index].short_name).strip("_")
    return f"{prefix}{safe}"


def tissue_indices(num_classes: int = NUM_CLASSES) -> list[int]:
    """Class indices below ``num_classes`` that are not background (not 0 or 4)."""
    return [i for i in range(num_classes) if i not in BACKGROUND_LABELS]


def _as_label_tensor(x: ArrayLike) -> torch.Tensor:
    """A label map as an integer tensor on the CPU (no metadata)."""
    tensor = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if tensor.is_floating_point():
        tensor = tensor.round()
    return tensor.detach().cpu().as_subclass(torch.Tensor).long()


def _check_pair(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> None:
    """Raise :class:`ConfigError` unless ``pred`` and ``label`` are matching label maps."""
    if pred.shape != label.shape:
        raise ConfigError(
            f"pred and label must have the same shape, got {tuple(pred.shape)} "
            f"and {tuple(label.shape)}"
        )
    for name, x in (("pred", pred), ("label", label)):
        if x.numel() and (x.min() < 0 or x.max() >= num_classes):
            raise ConfigError(
                f"{name} must hold class indices 0-{num_classes - 1}, "
                f"found values {int(x.min())}-{int(x.max())}"
            )


def class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Voxels per class of each item of a batch of label maps.

    Args:
        labels: integer label maps, shape ``(B, 1, X, Y, Z)``.
        num_classes: number of classes ``C``.

    Returns:
        Counts, shape ``(B, C)``.
    """
    flat = labels.reshape(labels.shape[0], -1).long()
    return torch.stack([torch.bincount(row, minlength=num_classes) for row in flat])


def dice_scores(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dice per item and class of a batch of label maps, ``NaN`` where a class is absent.

    Uses :func:`monai.metrics.compute_dice` with ``include_background=True`` and
    ``ignore_empty=False`` on label maps (MONAI one-hot encodes them internally, class
    by class, which is the same as passing one-hot tensors but uses less memory), then
    sets to ``NaN`` every class absent from both prediction and label.

    Args:
        pred: predicted label maps, shape ``(B, 1, X, Y, Z)``, values ``0..C-1``.
        label: reference label maps, same shape.
        num_classes: number of classes ``C``.

    Returns:
        Dice scores in ``[0, 1]`` or ``NaN``, shape ``(B, C)``, float32.
    """
    scores = compute_dice(
        pred, label, include_background=True, ignore_empty=False, num_classes=num_classes
    )
    absent = (class_counts(pred, num_classes) + class_counts(label, num_classes)) == 0
    return scores.float().masked_fill(absent.to(scores.device), float("nan"))


class ClassDiceMetric(DiceMetric):
    """MONAI's :class:`~monai.metrics.DiceMetric` with neonb's empty-class rule.

    Accumulates Dice per item and class over batches of label maps (``include_background=True``);
    a class absent from both prediction and label of an item is ``NaN`` and does not
    count towards that class's mean (see the module docstring). Used for the per-epoch
    validation on patches (§4.1.1).

    Args:
        num_classes: number of classes ``C`` (10 for drawem9).

    Example:
        >>> metric = ClassDiceMetric(10)
        >>> metric(y_pred=pred_labels, y=true_labels)   # both (B, 1, X, Y, Z)
        >>> metric.per_class()                          # (10,), NaN for never-seen classes
    """

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__(
            include_background=True,
            reduction="mean_batch",
            get_not_nans=True,
            ignore_empty=False,
            num_classes=num_classes,
        )

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Dice of one batch, shape ``(B, C)``; see :func:`dice_scores`."""
        return dice_scores(y_pred, y, self.num_classes)

    def per_class(self) -> torch.Tensor:
        """Mean Dice per class over all accumulated items, shape ``(C,)``.

        A class that was absent from every item (prediction and label) is ``NaN``.
        """
        buffer = self.get_buffer()
        if not isinstance(buffer, torch.Tensor):
            return torch.full((self.num_classes,), float("nan"))
        mean, not_nans = do_metric_reduction(buffer.clone(), "mean_batch")
        return mean.float().masked_fill(not_nans == 0, float("nan")).cpu()


def dice_per_class(pred: ArrayLike, label: ArrayLike, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Dice similarity coefficient of each class of one case.

    Args:
        pred: predicted label map, shape ``(X, Y, Z)``, values ``0..C-1``.
        label: reference label map, same shape.
        num_classes: number of classes ``C``.

    Returns:
        Dice per class, shape ``(C,)``, float64: ``NaN`` for a class absent from both
        images, 0 for a class present in only one of them.

    Raises:
        ConfigError: if the shapes differ or a value is not a class index.
    """
    p, t = _as_label_tensor(pred), _as_label_tensor(label)
    _check_pair(p, t, num_classes)
    return dice_scores(p[None, None], t[None, None], num_classes)[0].double().numpy()


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    """Voxel spacing as plain floats, one per spatial axis, all positive."""
    values = tuple(float(s) for s in spacing)
    if len(values) != ndim or not all(s > 0 for s in values):
        raise ConfigError(
            f"spacing must be {ndim} positive voxel sizes in mm, got {tuple(spacing)}"
        )
    return values


def hd95_per_class(
    pred: ArrayLike,
    label: ArrayLike,
    spacing: Sequence[float],
    num_classes: int = NUM_CLASSES,
) -> np.ndarray:
    """95th-percentile Hausdorff distance of each class of one case, in mm.

    :func:`monai.metrics.compute_hausdorff_distance` with ``percentile=95``, symmetric:
    for each direction (prediction → label surface and back) it takes the 95th
    percentile of the Euclidean distances between surface voxels, scaled by the voxel
    spacing, and reports the larger of the two.

    Args:
        pred: predicted label map, shape ``(X, Y, Z)``.
        label: reference label map, same shape.
        spacing: voxel size along ``X, Y, Z`` in mm, e.g. the NIfTI header's
            ``get_zooms()[:3]``.
        num_classes: number of classes ``C``.

    Returns:
        HD95 per class in mm, shape ``(C,)``, float64; ``NaN`` where the class is absent
        from the prediction or the label.

    Raises:
        ConfigError: if the shapes differ, a value is not a class index, or the spacing
            is not one positive number per axis.
    """
    p, t = _as_label_tensor(pred), _as_label_tensor(label)
    _check_pair(p, t, num_classes)
    mm = _check_spacing(spacing, p.ndim)
    result = np.full(num_classes, np.nan)
    counts = class_counts(torch.stack([p, t])[:, None], num_classes)  # (2, C)
    present = torch.nonzero((counts > 0).all(dim=0)).flatten().tolist()
    for c in present:  # one class at a time: MONAI works on float copies of the masks
        with warnings.catch_warnings():  # MONAI 1.5+ warns about its own internal call
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
            hd = compute_hausdorff_distance(
                (p == c)[None, None],
                (t == c)[None, None],
                include_background=True,
                percentile=HD_PERCENTILE,
                spacing=list(mm),
            )
        result[c] = float(hd[0, 0])
    return result


def volumes_ml(
    labels: ArrayLike, spacing: Sequence[float], num_classes: int = NUM_CLASSES
) -> np.ndarray:
    """Volume of each class in mL: voxel count × voxel volume (mm³) / 1000.

    Args:
        labels: label map, shape ``(X, Y, Z)``.
        spacing: voxel size along ``X, Y, Z`` in mm.
        num_classes: number of classes ``C``.

    Returns:
        Volumes in mL, shape ``(C,)``, float64.
    """
    t = _as_label_tensor(labels)
    mm = _check_spacing(spacing, t.ndim)
    counts = class_counts(t[None], num_classes)[0].double().numpy()
    return counts * float(np.prod(mm)) / MM3_PER_ML


def evaluate_case(
    pred: ArrayLike,
    label: ArrayLike,
    spacing: Sequence[float] | None,
    ids: Mapping[str, object],
    num_classes: int = NUM_CLASSES,
) -> pd.DataFrame:
    """Dice, and with a voxel size HD95 and volumes, of every class of one case, as tidy rows.

    Args:
        pred: predicted label map, shape ``(X, Y, Z)``.
        label: reference label map, same shape.
        spacing: voxel size along ``X, Y, Z`` in mm; ``None``: Dice only (the distances
            and volumes need it, and HD95 costs about as much as a CPU segmentation).
        ids: identifiers copied into every row, in order, as the first columns,
            typically ``{"participant_id": ..., "session_id": ...}``.
        num_classes: number of classes ``C``.

    Returns:
        ``C`` rows with the ``ids`` columns, then ``label`` (class index),
        ``short_name`` (as in the paper), ``is_background`` (labels 0 and 4) and
        ``dice``; with a ``spacing`` also ``hd95_mm``, ``volume_pred_ml`` and
        ``volume_true_ml``.
    """
    rows = {key: [value] * num_classes for key, value in ids.items()}
    rows |= {
        "label": list(range(num_classes)),
        "short_name": [
            DRAWEM9[c].short_name if c in DRAWEM9 else str(c) for c in range(num_classes)
        ],
        "is_background": [c in BACKGROUND_LABELS for c in range(num_classes)],
        "dice": dice_per_class(pred, label, num_classes),
    }
    if spacing is not None:
        rows |= {
            "hd95_mm": hd95_per_class(pred, label, spacing, num_classes),
            "volume_pred_ml": volumes_ml(pred, spacing, num_classes),
            "volume_true_ml": volumes_ml(label, spacing, num_classes),
        }
    return pd.DataFrame(rows)


def case_summary(
    per_class: pd.DataFrame, by: Sequence[str] = ("participant_id", "session_id")
) -> pd.DataFrame:
    """Per-case means of per-class rows (``NaN`` entries skipped): the per-subject table.

    Args:
        per_class: rows of :func:`evaluate_case` or :func:`neonb.experiment.evaluate`, for
            one or more cases, models and runs.
        by: the columns that identify a case's result, e.g. ``("strategy", "run",
            "participant_id", "session_id", "scan_age")``.

    Returns:
        One row per case: the ``by`` columns, ``dice_mean`` (all classes) and
        ``dice_mean_nobg`` (tissues only: labels 0 and 4 excluded); when the rows have
        ``hd95_mm``, also ``hd95_mean_mm`` and ``hd95_mean_nobg_mm``.

    Raises:
        ConfigError: naming the columns of ``by`` (or ``dice``, ``is_background``) that
            ``per_class`` lacks.
    """
    keys = list(by)
    missing = [c for c in [*keys, "dice", "is_background"] if c not in per_class.columns]
    if missing:
        raise ConfigError(
            f"per_class lacks the column(s) {missing}; it has {list(per_class.columns)}"
        )
    tissue = per_class[~per_class["is_background"]]
    groups = {"all": per_class.groupby(keys, sort=False), "nobg": tissue.groupby(keys, sort=False)}
    columns = {
        "dice_mean": groups["all"]["dice"].mean(),
        "dice_mean_nobg": groups["nobg"]["dice"].mean(),
    }
    if "hd95_mm" in per_class.columns:
        columns["hd95_mean_mm"] = groups["all"]["hd95_mm"].mean()
        columns["hd95_mean_nobg_mm"] = groups["nobg"]["hd95_mm"].mean()
    return pd.DataFrame(columns).reset_index()


def format_mean_std(mean: float, std: float, decimals: int = 3) -> str:
    """``"0.934 ± 0.0004"``: the mean to ``decimals`` places, the std to one significant digit.

    A missing std (a single run) gives the mean alone.
    """
    if np.isnan(mean):
        return "nan"
    text = f"{mean:.{decimals}f}"
    if np.isnan(std):
        return text
    if std < 0.5 * 10.0 ** -(decimals + 2):  # rounding noise of identical runs
        return f"{text} ± 0"
    spread = np.format_float_positional(std, precision=1, unique=False, fractional=False, trim="-")
    return f"{text} ± {spread}"


def summarize_runs(
    per_run: pd.DataFrame,
    by: Sequence[str] = ("split", "label", "short_name"),
    value: str | Sequence[str] = "dice",
    run_col: str = "run",
    decimals: int = 3,
) -> pd.DataFrame:
    """Mean ± standard deviation over repeated runs, as in the paper's Tables 1 and 2.

    Rows are first averaged within each run (over cases, skipping ``NaN``), then across
    runs: ``mean`` and ``std`` (sample standard deviation, ``ddof=1``) of the run means.

    Args:
        per_run: tidy rows with a ``run_col`` column, the ``by`` columns and the
            ``value`` columns; e.g. :func:`evaluate_case` rows of every run with
            ``run`` and ``split`` added, or :func:`case_summary` rows.
        by: columns to keep apart (e.g. ``("split", "label", "short_name")`` for
            Table 2, ``("split",)`` with ``value=["dice_mean", "dice_mean_nobg"]``
            for Table 1).
        value: the column or columns to summarise.
        run_col: the column that numbers the runs.
        decimals: decimal places of the mean in ``formatted``.

    Returns:
        Tidy rows: the ``by`` columns, ``metric`` (the value column's name), ``mean``,
        ``std``, ``n_runs`` and ``formatted`` (``"0.934 ± 0.0004"``).

    Raises:
        ConfigError: if a named column is missing.
    """
    values = [value] if isinstance(value, str) else list(value)
    keys = list(by)
    missing = [c for c in [run_col, *keys, *values] if c not in per_run.columns]
    if missing:
        raise ConfigError(f"per_run lacks the column(s) {missing}; it has {list(per_run.columns)}")
    long = per_run.melt(id_vars=[run_col, *keys], value_vars=values, var_name="metric")
    run_means = long.groupby([*keys, "metric", run_col], sort=False)["value"].mean()
    stats = run_means.groupby(level=[*keys, "metric"], sort=False).agg(
        mean="mean", std="std", n_runs="count"
    )
    stats = stats.reset_index()
    stats["formatted"] = [
        format_mean_std(m, s, decimals) for m, s in zip(stats["mean"], stats["std"], strict=True)
    ]
    return stats


def paper_table(
    summary: pd.DataFrame, index: str = "short_name", columns: str = "split"
) -> pd.DataFrame:
    """Pivot :func:`summarize_runs` output into the paper's layout of formatted strings.

    Args:
        summary: rows from :func:`summarize_runs`, one metric.
        index: the column giving the table's rows (classes, by default).
        columns: the column giving its columns (``val``/``test``, by default).

    Returns:
        A wide table of ``"mean ± std"`` strings, rows and columns in order of appearance.
    """
    table = summary.pivot(index=index, columns=columns, values="formatted")
    return table.reindex(index=summary[index].unique(), columns=summary[columns].unique())
