"""Interactive figures for the study notebooks and the book.

Every function returns a :class:`plotly.graph_objects.Figure` and never shows it; the
notebook displays it by leaving it as the cell's last expression. Call
:func:`use_book_renderer` once per notebook so figures render offline: the executed
notebook then holds each figure as an HTML ``<div>`` that draws with the plotly.js the
book ships in ``_static/`` (no CDN), beside the plotly JSON that JupyterLab renders.

Brain views follow the neurological convention of RAS images: the subject's left on the
left of axial and coronal views, anterior at the top of axial views and to the right of
sagittal views.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.io._base_renderers import MimetypeRenderer
from plotly.subplots import make_subplots

from neonb.labels import DRAWEM9, NUM_CLASSES

PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}
PRETERM_COLORS = {"preterm-born": "#d95f02", "term-born": "#1b9e77"}
VIEWS = ("axial", "coronal", "sagittal")


class _BookRenderer(MimetypeRenderer):
    """HTML that relies on a page-level plotly.js, plus the JSON JupyterLab renders."""

    def to_mimebundle(self, fig_dict):
        html = pio.to_html(
            fig_dict,
            include_plotlyjs=False,
            include_mathjax=False,
            full_html=False,
            config=PLOTLY_CONFIG,
        )
        return {"application/vnd.plotly.v1+json": fig_dict, "text/html": html}


def use_book_renderer() -> str:
    """Make figures render offline in the book, in JupyterLab and on Colab.

    Returns:
        The name of the renderer now in use (``"neonb"``, or ``"colab"`` on Colab).
    """
    try:
        import google.colab  # noqa: F401
    except ImportError:
        pio.renderers["neonb"] = _BookRenderer()
        pio.renderers.default = "neonb"
    else:
        pio.renderers.default = "colab"
    return pio.renderers.default


def age_histogram(manifest: pd.DataFrame, *, bin_width: float = 1.0) -> go.Figure:
    """Histogram of scan age, stacked by preterm/term birth (the paper's Figure 1).

    Args:
        manifest: sessions with ``scan_age`` (weeks) and ``preterm`` columns.
        bin_width: bin width in weeks.
    """
    frame = manifest.dropna(subset=["scan_age"]).copy()
    frame["birth"] = np.where(frame["preterm"].fillna(False).astype(bool), *PRETERM_COLORS)
    fig = go.Figure()
    for group, color in PRETERM_COLORS.items():
        ages = frame.loc[frame["birth"] == group, "scan_age"]
        fig.add_histogram(
            x=ages,
            name=f"{group} (n={len(ages)})",
            marker_color=color,
            xbins={"size": bin_width},
            hovertemplate="%{x} weeks: %{y} scans<extra></extra>",
        )
    median, mean = frame["scan_age"].median(), frame["scan_age"].mean()
    fig.add_vline(x=median, line_dash="dash", annotation_text=f"median {median:.1f}")
    fig.update_layout(
        barmode="stack",
        xaxis_title="scan age (weeks post-menstrual age)",
        yaxis_title="scans",
        title=f"Scan age of {len(frame)} sessions (mean {mean:.1f}, median {median:.1f} weeks)",
        legend={"orientation": "h", "y": -0.2},
    )
    return fig


def _label_colorscale() -> list[list]:
    """A discrete plotly colour scale mapping 0..NUM_CLASSES-1 to the drawem9 colours."""
    scale = []
    for index, label in DRAWEM9.items():
        scale += [[index / NUM_CLASSES, label.color], [(index + 1) / NUM_CLASSES, label.color]]
    return scale


def _image_axes(fig: go.Figure, n: int) -> None:
    """Hide the axes of subplot ``n`` (1-based) and give its pixels a 1:1 aspect ratio."""
    axis = "" if n == 1 else str(n)
    fig.update_layout(
        {
            f"yaxis{axis}": {"scaleanchor": f"x{axis}", "visible": False},
            f"xaxis{axis}": {"visible": False},
        }
    )


def _slices(volume: np.ndarray, index: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """Axial, coronal and sagittal slices, transposed so rows run up the screen."""
    i, j, k = index
    return {"axial": volume[:, :, k].T, "coronal": volume[:, j, :].T, "sagittal": volume[i, :, :].T}


def triplanar(
    image: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    index: tuple[int, int, int] | None = None,
    voxel_size: tuple[float, float, float] = (1.0, 1.0, 1.0),
    opacity: float = 0.45,
    title: str = "",
) -> go.Figure:
    """Axial, coronal and sagittal views of a RAS volume with an optional label overlay.

    Args:
        image: intensities, shape (X, Y, Z).
        labels: drawem9 labels 0-9 of the same shape; 0 is left transparent.
        index: the voxel the three planes cross at (default: centre of the non-zero box).
        voxel_size: voxel edge lengths in mm, for the axes' aspect ratio.
        opacity: overlay opacity.
        title: figure title.
    """
    if labels is not None and labels.shape != image.shape:
        raise ValueError(f"image shape {image.shape} and label shape {labels.shape} differ")
    if index is None:
        nonzero = np.argwhere(image != 0)
        box = (nonzero.min(0) + nonzero.max(0)) // 2 if len(nonzero) else np.array(image.shape) // 2
        index = tuple(int(v) for v in box)
    fig = make_subplots(rows=1, cols=3, subplot_titles=VIEWS, horizontal_spacing=0.03)
    spacing = {"axial": voxel_size[:2], "coronal": voxel_size[::2], "sagittal": voxel_size[1:]}
    image_slices = _slices(image, index)
    label_slices = _slices(labels, index) if labels is not None else None
    low, high = np.percentile(image[image != 0], [0.5, 99.5]) if image.any() else (0.0, 1.0)
    names = np.array([label.name for label in DRAWEM9.values()])
    for col, view in enumerate(VIEWS, start=1):
        dx, dy = spacing[view]
        fig.add_heatmap(
            z=image_slices[view],
            dx=dx,
            dy=dy,
            colorscale="gray",
            zmin=low,
            zmax=high,
            showscale=False,
            hovertemplate="intensity %{z:.3g}<extra></extra>",
            row=1,
            col=col,
        )
        if label_slices is not None:
            overlay = label_slices[view].astype(float)
            overlay[overlay == 0] = np.nan
            fig.add_heatmap(
                z=overlay,
                dx=dx,
                dy=dy,
                colorscale=_label_colorscale(),
                zmin=0,
                zmax=NUM_CLASSES,
                opacity=opacity,
                showscale=False,
                customdata=names[label_slices[view].astype(int)],
                hovertemplate="%{customdata}<extra></extra>",
                row=1,
                col=col,
            )
        _image_axes(fig, col)
    fig.update_layout(
        title=title, margin={"l": 10, "r": 10, "t": 60, "b": 10}, plot_bgcolor="black", height=380
    )
    return fig


def volumes_by_age(volumes: pd.DataFrame) -> go.Figure:
    """Tissue volume (mL) against scan age, one panel per tissue.

    Args:
        volumes: tidy rows with ``scan_age``, ``tissue`` (short name), ``volume_ml``
            and ``preterm``.
    """
    tissues = list(dict.fromkeys(volumes["tissue"]))
    cols = 4
    rows = int(np.ceil(len(tissues) / cols))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=tissues, vertical_spacing=0.12)
    for n, tissue in enumerate(tissues):
        part = volumes[volumes["tissue"] == tissue]
        for group, color in PRETERM_COLORS.items():
            preterm = group == "preterm-born"
            sub = part[part["preterm"].fillna(False).astype(bool) == preterm]
            fig.add_scatter(
                x=sub["scan_age"],
                y=sub["volume_ml"],
                mode="markers",
                name=group,
                marker={"color": color, "size": 5},
                legendgroup=group,
                showlegend=n == 0,
                text=sub.get("participant_id"),
                hovertemplate="%{text}<br>%{x:.1f} w: %{y:.1f} mL<extra></extra>",
                row=n // cols + 1,
                col=n % cols + 1,
            )
    fig.update_xaxes(title_text="scan age (weeks)", row=rows)
    fig.update_yaxes(title_text="mL", col=1)
    fig.update_layout(
        height=300 * rows,
        title="Tissue volume against scan age",
        legend={"orientation": "h", "y": -0.12},
    )
    return fig


def dice_curves(log: pd.DataFrame, *, title: str = "Validation Dice per tissue") -> go.Figure:
    """Validation Dice of each tissue over the epochs (the paper's Figures 6 and 9).

    Args:
        log: an epoch log (``log.tsv``) with ``epoch`` and ``dice_<short name>`` columns;
            a ``run`` column, if present, gives one line per run (thin) and their mean.
    """
    from neonb.metrics import class_column

    fig = go.Figure()
    runs = log.groupby("run") if "run" in log else [(None, log)]
    mean = log.groupby("epoch").mean(numeric_only=True).reset_index()
    for index in (i for i, label in DRAWEM9.items() if not label.is_background):
        column, label = class_column(index), DRAWEM9[index]
        for run, part in runs:
            if run is not None:
                fig.add_scatter(
                    x=part["epoch"],
                    y=part[column],
                    mode="lines",
                    legendgroup=label.short_name,
                    line={"color": label.color, "width": 1},
                    opacity=0.35,
                    showlegend=False,
                    hovertemplate=f"{label.short_name}, run {run}: %{{y:.3f}}<extra></extra>",
                )
        fig.add_scatter(
            x=mean["epoch"],
            y=mean[column],
            mode="lines+markers",
            name=label.short_name,
            legendgroup=label.short_name,
            line={"color": label.color, "width": 2.5},
            hovertemplate=f"{label.short_name}, epoch %{{x}}: %{{y:.3f}}<extra></extra>",
        )
    fig.update_layout(
        title=title,
        xaxis_title="epoch",
        yaxis_title="Dice (validation patches)",
        yaxis_range=[0, 1],
        hovermode="x unified",
    )
    return fig


def compare_segmentations(
    image: np.ndarray,
    reference: np.ndarray,
    predicted: np.ndarray,
    *,
    voxel_size: tuple[float, float, float] = (1.0, 1.0, 1.0),
    title: str = "",
) -> go.Figure:
    """Prediction above reference labels in three views (the paper's Figures 7 and 8).

    Args:
        image: T2w intensities, shape (X, Y, Z).
        reference: reference labels 0-9, same shape.
        predicted: predicted labels 0-9, same shape.
        voxel_size: voxel edge lengths in mm.
        title: figure title.
    """
    top = triplanar(image, predicted, voxel_size=voxel_size)
    bottom = triplanar(image, reference, voxel_size=voxel_size)
    fig = make_subplots(
        rows=2,
        cols=3,
        vertical_spacing=0.06,
        horizontal_spacing=0.03,
        subplot_titles=[f"{view}: neonb" for view in VIEWS]
        + [f"{view}: reference" for view in VIEWS],
    )
    for row, source in ((1, top), (2, bottom)):
        for trace in source.data:
            col = int((trace.xaxis or "x")[1:] or 1)
            fig.add_trace(trace, row=row, col=col)
    for n in range(1, 7):
        _image_axes(fig, n)
    fig.update_layout(
        title=title, height=700, plot_bgcolor="black", margin={"l": 10, "r": 10, "t": 70, "b": 10}
    )
    return fig


def augmentation_pair(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> go.Figure:
    """A training patch before and after augmentation (the paper's Figure 2).

    Args:
        before: ``image`` (2, X, Y, Z) and ``label`` (1, X, Y, Z) of the patch, as
            returned by :func:`neonb.transforms.augmented_example`.
        after: the same patch after the random augmentations.
    """
    k = before["image"].shape[-1] // 2
    panels = {
        "T2w, original": before["image"][1, :, :, k],
        "T2w, augmented": after["image"][1, :, :, k],
        "labels, original": before["label"][0, :, :, k],
        "labels, augmented": after["label"][0, :, :, k],
    }
    return _patch_panels(panels, f"Axial slice {k} of a training patch", height=330)


def _patch_panels(panels: dict[str, np.ndarray], title: str, *, height: int) -> go.Figure:
    """Slices side by side: grey images, and label maps (a name starting with ``labels``) in
    the label colours with the class names on hover."""
    fig = make_subplots(
        rows=1, cols=len(panels), subplot_titles=list(panels), horizontal_spacing=0.02
    )
    names = np.array([label.name for label in DRAWEM9.values()])
    for col, (name, panel) in enumerate(panels.items(), start=1):
        if name.startswith("labels"):
            fig.add_heatmap(
                z=panel.T,
                colorscale=_label_colorscale(),
                zmin=0,
                zmax=NUM_CLASSES,
                showscale=False,
                customdata=names[panel.T.astype(int)],
                hovertemplate="%{customdata}<extra></extra>",
                row=1,
                col=col,
            )
        else:
            fig.add_heatmap(
                z=panel.T,
                colorscale="gray",
                showscale=False,
                hovertemplate="%{z:.2f}<extra></extra>",
                row=1,
                col=col,
            )
        _image_axes(fig, col)
    fig.update_layout(title=title, height=height, margin={"l": 10, "r": 10, "t": 70, "b": 10})
    return fig


def dice_by_age(cases: pd.DataFrame, *, value: str = "dice_mean_nobg") -> go.Figure:
    """Per-session test Dice against scan age.

    Args:
        cases: one row per session and run (:func:`neonb.metrics.case_summary`) with
            ``scan_age``, ``participant_id``, ``session_id`` and ``value``.
        value: the column to plot (default: mean Dice over the eight tissues).
    """
    fig = go.Figure()
    fig.add_scatter(
        x=cases["scan_age"],
        y=cases[value],
        mode="markers",
        marker={"size": 8, "color": "#1b9e77"},
        text="sub-"
        + cases["participant_id"].astype(str)
        + " ses-"
        + cases["session_id"].astype(str),
        hovertemplate="%{text}<br>%{x:.1f} weeks: Dice %{y:.3f}<extra></extra>",
    )
    fig.update_layout(
        title="Test Dice (no background) against scan age",
        xaxis_title="scan age (weeks post-menstrual age)",
        yaxis_title="mean Dice, 8 tissues",
    )
    return fig


def age_scatter(
    ages: pd.DataFrame,
    *,
    predicted: str = "age_mean",
    facet: str = "variant",
    title: str = "Predicted against true age at scan (test set)",
) -> go.Figure:
    """Predicted against true scan age, one panel per model, coloured by preterm/term birth.

    Args:
        ages: one row per session (and model) with ``scan_age``, ``predicted``, ``preterm``
            (bool or NA), ``participant_id``, ``session_id`` and, if present, ``facet``.
        predicted: the column of predicted ages in weeks.
        facet: the column naming the model of each row (one panel each).
        title: the figure title.
    """
    names = list(dict.fromkeys(ages[facet])) if facet in ages else [None]
    fig = make_subplots(
        rows=1, cols=len(names), shared_yaxes=True, subplot_titles=[str(n) for n in names]
    )
    low = float(min(ages["scan_age"].min(), ages[predicted].min())) - 1
    high = float(max(ages["scan_age"].max(), ages[predicted].max())) + 1
    group = np.where(ages["preterm"].fillna(False).astype(bool), "preterm-born", "term-born")
    for col, name in enumerate(names, start=1):
        part = ages if name is None else ages[ages[facet] == name]
        part_group = group if name is None else group[(ages[facet] == name).to_numpy()]
        for label, color in PRETERM_COLORS.items():
            rows = part[part_group == label]
            fig.add_scatter(
                x=rows["scan_age"],
                y=rows[predicted],
                mode="markers",
                name=label,
                legendgroup=label,
                showlegend=col == 1,
                marker={"size": 8, "color": color},
                text="sub-" + rows["participant_id"].astype(str),
                hovertemplate="%{text}: true %{x:.1f}, predicted %{y:.1f} weeks<extra></extra>",
                row=1,
                col=col,
            )
        fig.add_scatter(
            x=[low, high],
            y=[low, high],
            mode="lines",
            line={"color": "grey", "dash": "dot"},
            showlegend=False,
            hoverinfo="skip",
            row=1,
            col=col,
        )
        fig.update_xaxes(title_text="true age (weeks PMA)", range=[low, high], row=1, col=col)
    fig.update_yaxes(title_text="predicted age (weeks PMA)", range=[low, high], row=1, col=1)
    fig.update_layout(title=title)
    return fig


def age_distributions(
    table: pd.DataFrame,
    *,
    by: str = "dataset",
    bin_width: float = 0.5,
    title: str = "Scan age of the source and target sets",
) -> go.Figure:
    """Overlaid histograms of scan age, one per group (the paper's Figure 10).

    Args:
        table: one row per session with ``scan_age`` (weeks) and ``by``.
        by: the column naming each row's group (e.g. source, target train, target test).
        bin_width: bin width in weeks.
        title: the figure title.
    """
    fig = go.Figure()
    for group, part in table.groupby(by, sort=False):
        ages = part["scan_age"]
        fig.add_histogram(
            x=ages,
            name=f"{group} (n={len(ages)}, {ages.mean():.1f} ± {ages.std():.1f} w)",
            xbins={"size": bin_width},
            opacity=0.75,
            hovertemplate=f"{group}<br>%{{x}} weeks: %{{y}} scans<extra></extra>",
        )
    fig.update_layout(
        barmode="overlay",
        title=title,
        xaxis_title="scan age (weeks post-menstrual age)",
        yaxis_title="scans",
        legend={"orientation": "h", "y": -0.2},
    )
    return fig


def strategy_boxplots(
    cases: pd.DataFrame,
    *,
    by: str = "strategy",
    values: dict[str, str] | None = None,
    title: str = "Test Dice per subject and strategy",
) -> go.Figure:
    """Box plots of per-subject Dice, one box per strategy, every subject shown (Figure 11).

    Args:
        cases: one row per subject and strategy (:func:`neonb.metrics.case_summary`)
            with ``by``, the ``values`` columns, ``participant_id`` and ``scan_age``.
        by: the column naming the strategy; boxes follow its order of appearance.
        values: columns to plot, one panel each, mapped to panel titles (default:
            mean Dice without and with the background classes).
        title: the figure title.
    """
    values = values or {"dice_mean_nobg": "8 tissues (no BG)", "dice_mean": "all 10 classes"}
    fig = make_subplots(rows=1, cols=len(values), subplot_titles=list(values.values()))
    text = (
        "sub-"
        + cases["participant_id"].astype(str)
        + ", "
        + cases["scan_age"].map("{:.1f} w".format)
    )
    for col, column in enumerate(values, start=1):
        fig.add_box(
            x=cases[by],
            y=cases[column],
            boxpoints="all",
            jitter=0.4,
            pointpos=0,
            marker={"size": 5, "color": "#1b9e77"},
            line={"color": "#555555"},
            text=text,
            hovertemplate="%{x}, %{text}: %{y:.3f}<extra></extra>",
            showlegend=False,
            row=1,
            col=col,
        )
    fig.update_yaxes(title_text="mean Dice per subject", col=1)
    fig.update_layout(title=title, height=450)
    return fig


def replicate_intervals(
    summary: pd.DataFrame,
    *,
    by: str = "strategy",
    title: str = "Mean test Dice with 95 % intervals",
    yaxis: str = "mean Dice, 8 tissues (test)",
) -> go.Figure:
    """Each group's mean with its interval over runs and over test subjects.

    Args:
        summary: rows of :func:`neonb.statistics.replicate_summary` (``by``, ``mean``,
            ``run_low``/``run_high``, ``subject_low``/``subject_high``, ``n_runs``,
            ``n_subjects``).
        by: the group column; groups follow its order.
        title: the figure title.
        yaxis: the y axis title.
    """
    fig = go.Figure()
    for kind, name, color, shift in (
        ("run", "over runs", "#d95f02", -0.12),
        ("subject", "over test subjects", "#7570b3", 0.12),
    ):
        x = np.arange(len(summary)) + shift
        low, high = summary[f"{kind}_low"], summary[f"{kind}_high"]
        fig.add_scatter(
            x=x,
            y=summary["mean"],
            mode="markers",
            name=f"95 % interval {name}",
            marker={"size": 9, "color": color},
            error_y={
                "type": "data",
                "symmetric": False,
                "array": high - summary["mean"],
                "arrayminus": summary["mean"] - low,
            },
            customdata=np.stack([low, high, summary["n_runs"], summary["n_subjects"]], axis=1),
            text=summary[by],
            hovertemplate="%{text}: %{y:.3f} [%{customdata[0]:.3f}, %{customdata[1]:.3f}] "
            "(%{customdata[2]} runs, %{customdata[3]} subjects)<extra>" + name + "</extra>",
        )
    fig.update_layout(
        title=title,
        yaxis_title=yaxis,
        xaxis={
            "tickmode": "array",
            "tickvals": list(range(len(summary))),
            "ticktext": list(summary[by]),
        },
        height=420,
    )
    return fig


def paper_vs_neonb(pairs: pd.DataFrame, *, title: str = "neonb against the paper") -> go.Figure:
    """Each value neonb computed against the paper's value for the same cell of a table.

    Points on the diagonal agree with the paper; above it neonb scored higher. One trace
    per table, so the legend hides or shows a table.

    Args:
        pairs: columns ``table``, ``group``, ``quantity``, ``paper``, ``neonb``
            (:func:`neonb.results.pair_with_paper`).
        title: the figure title (say which data neonb's values come from).
    """
    fig = go.Figure()
    for name, rows in pairs.groupby("table", sort=False):
        fig.add_scatter(
            x=rows["paper"],
            y=rows["neonb"],
            mode="markers",
            name=str(name),
            marker={"size": 8, "opacity": 0.8},
            text=rows["group"].astype(str) + ", " + rows["quantity"].astype(str),
            hovertemplate=f"{name}: %{{text}}<br>paper %{{x:.3f}}, neonb %{{y:.3f}}<extra></extra>",
        )
    fig.add_scatter(
        x=[0, 1],
        y=[0, 1],
        mode="lines",
        line={"color": "#999999", "dash": "dot"},
        name="equal",
        hoverinfo="skip",
    )
    fig.update_layout(
        title=title,
        xaxis={"title": "paper (dHCP)", "range": [-0.02, 1.02]},
        yaxis={"title": "neonb", "range": [-0.02, 1.02], "scaleanchor": "x"},
        height=520,
    )
    return fig


def annotation_masks(
    image: np.ndarray,
    labels: np.ndarray,
    masks: dict[str, np.ndarray],
    *,
    voxel_size: tuple[float, float, float] = (1.0, 1.0, 1.0),
    title: str = "",
) -> go.Figure:
    """The labels a budgeting condition keeps: one row per mask, three views each.

    Labels are drawn only on annotated voxels, over the image, so slices chosen along one
    plane show as stripes in the two other views (the paper's Figure 4).

    Args:
        image: T2w intensities, shape (X, Y, Z), RAS.
        labels: drawem9 labels 0-9, same shape.
        masks: annotation masks (1 = annotated) of the same shape, by condition name.
        voxel_size: voxel edge lengths in mm.
        title: figure title.
    """
    names = list(masks)
    fig = make_subplots(
        rows=len(names),
        cols=3,
        vertical_spacing=0.04,
        horizontal_spacing=0.03,
        subplot_titles=[f"{name}: {view}" for name in names for view in VIEWS],
    )
    for row, name in enumerate(names, start=1):
        kept = np.where(masks[name] > 0, labels, 0)
        for trace in triplanar(image, kept, voxel_size=voxel_size).data:
            fig.add_trace(trace, row=row, col=int((trace.xaxis or "x")[1:] or 1))
    for n in range(1, 3 * len(names) + 1):
        _image_axes(fig, n)
    fig.update_layout(
        title=title,
        height=260 * len(names) + 80,
        plot_bgcolor="black",
        margin={"l": 10, "r": 10, "t": 80, "b": 10},
    )
    return fig


def budget_curves(logs: pd.DataFrame, *, value: str = "val_dice_nobg") -> go.Figure:
    """Validation Dice over the epochs, one line per label-budgeting condition.

    Args:
        logs: epoch logs (``log.tsv``) with a ``condition`` column; the replicates of a
            condition (a ``run`` column) are averaged epoch by epoch.
        value: the log column to plot.
    """
    fig = go.Figure()
    mean = logs.groupby(["condition", "epoch"], sort=False)[value].mean().reset_index()
    for condition, log in mean.groupby("condition", sort=False):
        fig.add_scatter(
            x=log["epoch"],
            y=log[value],
            mode="lines+markers",
            name=str(condition),
            hovertemplate=f"{condition}, epoch %{{x}}: %{{y:.3f}}<extra></extra>",
        )
    fig.update_layout(
        title="Validation Dice (no background) per condition",
        xaxis_title="epoch",
        yaxis_title="mean Dice, 8 tissues (validation patches)",
        hovermode="x unified",
    )
    return fig


def dispersion_sweep(results: pd.DataFrame, *, title: str = "") -> go.Figure:
    """Dice of the dispersion sweep: one tick per condition, least dispersed first.

    Args:
        results: one row per condition with ``condition``, ``n_sessions``,
            ``annotated_slices``, ``slices_per_session``, ``val_dice_nobg`` and
            ``test_dice_nobg``, in sweep order.
        title: figure title.
    """
    ticks = [
        f"{r.condition}<br>{r.n_sessions} scans x {r.slices_per_session:.3g}<br>"
        f"= {r.annotated_slices} slices"
        for r in results.itertuples()
    ]
    custom = results[["n_sessions", "annotated_slices", "slices_per_session"]].to_numpy()
    fig = go.Figure()
    for column, name, color in (
        ("val_dice_nobg", "validation (patches)", "#7570b3"),
        ("test_dice_nobg", "test (whole volumes)", "#d95f02"),
    ):
        fig.add_scatter(
            x=ticks,
            y=results[column],
            mode="lines+markers",
            name=name,
            marker={"size": 10, "color": color},
            customdata=custom,
            hovertemplate="%{customdata[0]} scans, %{customdata[1]} slices "
            "(%{customdata[2]:.3g} per scan): Dice %{y:.3f}<extra>" + name + "</extra>",
        )
    fig.update_layout(
        title=title or "Dice against label dispersion, at an equal budget of annotated slices",
        xaxis_title="condition: scans x slices per scan = annotated slices",
        yaxis_title="mean Dice, 8 tissues",
        legend={"orientation": "h", "y": -0.35},
    )
    return fig


def shift_gallery(
    table: pd.DataFrame,
    *,
    participant_id: str | None = None,
    session_id: str | None = None,
    modality: str = "t2w",
    view: str = "axial",
) -> go.Figure:
    """One session's slice under every shift and severity: a row per shift, clean first.

    Every panel uses the clean slice's grey levels (0.5-99.5th percentiles), so a change of
    brightness or contrast shows as such.

    Args:
        table: ``shifted.tsv`` as :func:`neonb.robustness.write_shifted_sessions` returns it.
        participant_id: the session to show (default: the table's first).
        session_id: its ``source_session_id`` (default: the participant's first).
        modality: ``"t2w"`` or ``"t1w"``.
        view: ``"axial"``, ``"coronal"`` or ``"sagittal"``, through the centre of the head.

    Raises:
        ValueError: when the table has no such session or no such view.
    """
    import nibabel as nib

    if view not in VIEWS:
        raise ValueError(f"view must be one of {list(VIEWS)}, but found {view!r}")
    rows = table
    if participant_id is not None:
        rows = rows[rows["participant_id"].astype(str) == str(participant_id)]
    if session_id is not None:
        rows = rows[rows["source_session_id"].astype(str) == str(session_id)]
    if rows.empty:
        raise ValueError(f"no session sub-{participant_id} ses-{session_id} in the table")
    first = rows.iloc[0]
    rows = rows[
        (rows["participant_id"] == first["participant_id"])
        & (rows["source_session_id"] == first["source_session_id"])
    ]
    clean = rows[rows["shift"] == "none"]
    shifted = rows[rows["shift"] != "none"].sort_values(["level"], kind="stable")
    kinds = list(dict.fromkeys(shifted["shift"]))
    n_rows = max(len(kinds), 1)
    n_cols = 1 + int(shifted["level"].max()) if len(shifted) else 1
    volume = np.asarray(nib.load(clean.iloc[0][modality]).dataobj, dtype=np.float32)
    nonzero = np.argwhere(volume != 0)
    centre = (nonzero.min(0) + nonzero.max(0)) // 2 if len(nonzero) else np.array(volume.shape) // 2
    index = tuple(int(v) for v in centre)
    low, high = np.percentile(volume[volume != 0], [0.5, 99.5]) if volume.any() else (0.0, 1.0)
    panels = {(r, 1): ("clean", _slices(volume, index)[view]) for r in range(n_rows)}
    for _, row in shifted.iterrows():
        image = np.asarray(nib.load(row[modality]).dataobj, dtype=np.float32)
        cell = (kinds.index(row["shift"]), 1 + int(row["level"]))
        panels[cell] = (f"{row['shift']} {float(row['severity']):g}", _slices(image, index)[view])
    titles = [
        panels.get((r, c), ("", None))[0] for r in range(n_rows) for c in range(1, n_cols + 1)
    ]
    fig = make_subplots(
        rows=n_rows,
        cols=n_cols,
        subplot_titles=titles,
        horizontal_spacing=0.01,
        vertical_spacing=0.04,
    )
    for (r, c), (name, panel) in panels.items():
        fig.add_heatmap(
            z=panel,
            colorscale="gray",
            zmin=low,
            zmax=high,
            showscale=False,
            name=name,
            hovertemplate="intensity %{z:.3g}<extra></extra>",
            row=r + 1,
            col=c,
        )
    for n in range(1, n_rows * n_cols + 1):
        _image_axes(fig, n)
    fig.update_layout(
        title=f"sub-{first['participant_id']} ses-{first['source_session_id']}, "
        f"{modality.upper().replace('W', 'w')} {view}, under each shift",
        height=170 * n_rows + 80,
        plot_bgcolor="black",
        margin={"l": 10, "r": 10, "t": 80, "b": 10},
    )
    return fig


MODEL_COLORS = {"paper": "#1b9e77", "t2w": "#7570b3", "randomized": "#d95f02"}
"""Colours of the robustness chapter's networks."""


def dice_against_severity(
    table: pd.DataFrame, *, title: str = "Dice (no BG) against severity"
) -> go.Figure:
    """Each network's mean Dice against the severity of each shift, with 95 % intervals.

    Args:
        table: rows of :func:`neonb.robustness.severity_table` (``model``, ``shift``,
            ``severity``, ``mean``, ``low``, ``high``, ``sessions``); severity 0 is clean.
        title: the figure title.
    """
    shifts = list(dict.fromkeys(table["shift"]))
    cols = min(3, len(shifts))
    rows = math.ceil(len(shifts) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=shifts, shared_yaxes=True)
    for i, shift in enumerate(shifts):
        for model, group in table[table["shift"] == shift].groupby("model", sort=False):
            fig.add_scatter(
                x=group["severity"],
                y=group["mean"],
                mode="lines+markers",
                name=model,
                legendgroup=model,
                showlegend=i == 0,
                line={"color": MODEL_COLORS.get(model)},
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": group["high"] - group["mean"],
                    "arrayminus": group["mean"] - group["low"],
                },
                customdata=group["sessions"],
                hovertemplate=f"{model}, {shift} " + "%{x}: %{y:.3f} (%{customdata} sessions)"
                "<extra></extra>",
                row=i // cols + 1,
                col=i % cols + 1,
            )
    fig.update_yaxes(title_text="mean Dice, 8 tissues", col=1)
    fig.update_xaxes(title_text="severity")
    fig.update_layout(title=title, height=300 * rows + 80)
    return fig


def qc_against_dice(
    qc: pd.DataFrame, *, dice_threshold: float, threshold: float | None = None, title: str = ""
) -> go.Figure:
    """Each segmentation's QC score against its Dice, one colour per shift.

    Args:
        qc: rows of :func:`neonb.robustness.qc_study` (``qc_uncertainty``,
            ``dice_mean_nobg``, ``shift``, ``severity``, ``participant_id``).
        dice_threshold: the Dice below which a segmentation counts as bad (a dashed line).
        threshold: the model folder's QC threshold (a dotted line), if any.
        title: the figure title.
    """
    fig = go.Figure()
    for shift, group in qc.groupby("shift", sort=False):
        fig.add_scatter(
            x=group["qc_uncertainty"],
            y=group["dice_mean_nobg"],
            mode="markers",
            name=shift,
            marker={"size": 8},
            customdata=np.stack([group["severity"], group["participant_id"]], axis=1),
            hovertemplate=f"{shift} " + "%{customdata[0]} (sub-%{customdata[1]}): QC "
            "%{x:.4f}, Dice %{y:.3f}<extra></extra>",
        )
    fig.add_hline(y=dice_threshold, line_dash="dash", annotation_text=f"Dice {dice_threshold:g}")
    if threshold is not None:
        fig.add_vline(x=threshold, line_dash="dot", annotation_text="QC threshold")
    fig.update_layout(
        title=title,
        xaxis_title="QC score: mean uncertainty in the brain",
        yaxis_title="Dice, 8 tissues (TTA segmentation)",
        height=450,
    )
    return fig


def synthesis_examples(
    before: dict[str, np.ndarray], synthesized: list[dict[str, np.ndarray]]
) -> go.Figure:
    """A training patch's real T2w and labels beside images synthesised from the labels.

    Args:
        before: ``image`` (C, X, Y, Z), T2w last, and ``label`` (1, X, Y, Z) of the patch
            (:func:`neonb.transforms.augmented_example`).
        synthesized: the same patch after domain randomisation, one dict per draw.
    """
    k = before["image"].shape[-1] // 2
    panels = {"T2w, real": before["image"][-1, :, :, k], "labels": before["label"][0, :, :, k]}
    panels |= {f"synthetic {i + 1}": s["image"][-1, :, :, k] for i, s in enumerate(synthesized)}
    title = f"Axial slice {k} of a training patch and images drawn from its labels"
    return _patch_panels(panels, title, height=300)
