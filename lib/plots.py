"""Charts people would rather look at than read: the loss curve and base vs adapter metrics."""

from __future__ import annotations

from pathlib import Path

from lib.tasks import TASKS, get_task


def _figure(width: float = 6.4, height: float = 3.6):
    """A figure that needs no GUI backend (pyplot is never imported); notebooks display it when returned."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    return figure, figure.add_subplot()


def _finish(figure, path: str | Path | None):
    figure.tight_layout()
    if path is not None:
        figure.savefig(path)
    return figure


def loss_curve(loss_history: list[dict], path: str | Path | None = None, title: str = "training loss",
               others: dict[str, list[dict]] | None = None):
    """Training loss per optimizer step; `others` adds more labelled curves for comparison."""
    figure, axes = _figure()
    curves = {"this run": loss_history, **(others or {})} if others else {"": loss_history}
    for label, history in curves.items():
        axes.plot([p["step"] for p in history], [p["loss"] for p in history], marker=".", label=label or None)
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no 1.5 on a 3-step run
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (answer tokens)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if others:
        axes.legend()
    return _finish(figure, path)


def metrics_chart(report: dict, path: str | Path | None = None):
    """Grouped bars, one per scored system (base, adapters, baselines), for every metric (chrF is shown
    divided by 100 to share the axis)."""
    import numpy as np

    from lib.evaluation import report_scores

    scores = report_scores(report)
    metrics = list(report["base"])
    chart_scale = get_task(report["task"]).chart_scale if report.get("task") in TASKS else {}
    scale = [chart_scale.get(metric, 1.0) for metric in metrics]
    labels = [f"{m}/100" if s != 1.0 else m for m, s in zip(metrics, scale)]
    names = {"base": "base model", "adapter": "with adapter"}
    figure, axes = _figure()
    positions = np.arange(len(metrics))
    width = 0.8 / len(scores)
    for index, (label, values) in enumerate(scores.items()):
        offset = (index - (len(scores) - 1) / 2) * width
        bars = axes.bar(positions + offset, [values[m] / s for m, s in zip(metrics, scale)], width=width,
                        label=names.get(label, label))
        axes.bar_label(bars, fmt="%.2f", fontsize=7)
    axes.set_xticks(positions, labels)
    axes.set_ylim(0, 1.3)  # headroom above the bars for the legend
    axes.set_title(f"{report['task']}: base vs adapter on {report['rows']} held-out rows")
    axes.legend(loc="upper left", ncols=min(len(scores), 4), fontsize=8)
    return _finish(figure, path)
