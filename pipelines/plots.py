"""Figures for runs and experiments: learning curves, metrics against K, NDCG by activity.

Each function builds a ``matplotlib.figure.Figure`` directly (no pyplot, so no GUI backend and no
global state; saving uses the Agg canvas), writes it when given a path, and returns it, so a
notebook can show it too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from recvae.evaluation import EvaluationResult


def _figure(n_panels: int) -> tuple[Figure, list[Any]]:
    from matplotlib.figure import Figure

    # Fixed margins: a layout engine costs seconds per figure on a busy machine.
    figure = Figure(figsize=(5.0 * n_panels, 4.0))
    axes = figure.subplots(1, n_panels, squeeze=False)[0]
    figure.subplots_adjust(left=0.25 / n_panels + 0.03, right=0.98, bottom=0.16, top=0.85)
    figure.subplots_adjust(wspace=0.3)
    return figure, list(axes)


def _grid_and_legend(axis: Any) -> None:
    """A light grid, and a legend when the axis has lines."""
    axis.grid(alpha=0.3)
    if axis.lines:
        axis.legend(fontsize="small")


def _finish(figure: Figure, path: str | Path | None, title: str | None) -> Figure:
    """Adds the title, writes a PNG when given a path, and returns the figure."""
    if title:
        figure.suptitle(title)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
    return figure


def learning_curves(
    histories: Mapping[str, Sequence[Mapping[str, float]]],
    path: str | Path | None = None,
    *,
    title: str | None = None,
) -> Figure:
    """Per-epoch training loss, KL weight and validation NDCG@100 of one or more models.

    Args:
        histories: Label -> the trainer's per-epoch records (``epoch``, ``loss``, ``nll``,
            ``beta``, ``val_ndcg@100``, ...); records without a key are skipped for that panel.
        path: Write a PNG here.
        title: The figure's title.

    Returns:
        The figure.

    Raises:
        ValueError: No history has any epoch.
    """
    if not any(histories.values()):
        raise ValueError("no epochs to plot")
    figure, (loss_axis, beta_axis, val_axis) = _figure(3)
    for label, history in histories.items():
        for axis, key in (
            (loss_axis, "nll"),
            (beta_axis, "beta"),
            (val_axis, "val_ndcg@100"),
        ):
            points = [
                (record["epoch"], record[key])
                for record in history
                if key in record and math.isfinite(record[key])
            ]
            if points:
                epochs, values = zip(*points, strict=True)
                axis.plot(epochs, values, label=label)
    loss_axis.set(xlabel="epoch", ylabel="reconstruction NLL (train)", title="training loss")
    beta_axis.set(xlabel="epoch", ylabel="beta", title="KL weight")
    val_axis.set(xlabel="epoch", ylabel="NDCG@100", title="validation NDCG@100")
    for axis in (loss_axis, beta_axis, val_axis):
        _grid_and_legend(axis)
    return _finish(figure, path, title)


def metrics_vs_k(
    results: Mapping[str, EvaluationResult],
    path: str | Path | None = None,
    *,
    title: str | None = None,
) -> Figure:
    """Recall@K and NDCG@K (means with standard-error bars) against K for each model.

    Args:
        results: Label -> evaluation (the ``K`` values are those it holds).
        path: Write a PNG here.
        title: The figure's title.

    Returns:
        The figure.

    Raises:
        ValueError: ``results`` is empty.
    """
    if not results:
        raise ValueError("no results to plot")
    figure, axes = _figure(2)
    for axis, metric, label_text in zip(
        axes, ("recall", "ndcg"), ("Recall@K", "NDCG@K"), strict=True
    ):
        for label, result in results.items():
            ks = sorted(
                int(name.split("@")[1]) for name in result.per_user if name.split("@")[0] == metric
            )
            if not ks:
                continue
            means = [result.mean(f"{metric}@{k}") for k in ks]
            errors = [result.stderr(f"{metric}@{k}") for k in ks]
            axis.errorbar(ks, means, yerr=errors, marker="o", markersize=3, capsize=2, label=label)
        axis.set(xlabel="K", ylabel=label_text, xscale="log", title=label_text)
        _grid_and_legend(axis)
    return _finish(figure, path, title)


def ndcg_by_activity(
    segments: Mapping[str, Sequence[Mapping[str, float]]],
    path: str | Path | None = None,
    *,
    title: str | None = None,
) -> Figure:
    """NDCG@100 by quartile of fold-in history length, one group of bars per quartile.

    Args:
        segments: Label -> ``EvaluationResult.by_segment(...)`` rows.
        path: Write a PNG here.
        title: The figure's title.

    Returns:
        The figure.

    Raises:
        ValueError: ``segments`` is empty.
    """
    if not segments:
        raise ValueError("no segments to plot")
    figure, (axis,) = _figure(1)
    labels = list(segments)
    width = 0.8 / len(labels)
    ticks: list[str] = []
    for position, label in enumerate(labels):
        rows = segments[label]
        xs = [i + (position - (len(labels) - 1) / 2) * width for i in range(len(rows))]
        axis.bar(
            xs,
            [row["mean"] for row in rows],
            width=width,
            yerr=[0.0 if math.isnan(row["se"]) else row["se"] for row in rows],
            capsize=2,
            label=label,
        )
        if not ticks:
            ticks = [
                f"Q{i + 1}\n{row['lower']:.0f}-{row['upper']:.0f}" for i, row in enumerate(rows)
            ]
    axis.set_xticks(range(len(ticks)), ticks)
    axis.set(xlabel="fold-in history length (quartile)", ylabel="NDCG@100")
    axis.grid(alpha=0.3, axis="y")
    axis.legend(fontsize="small")
    return _finish(figure, path, title)
