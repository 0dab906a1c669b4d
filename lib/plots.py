"""Charts people would rather look at than read: the loss curve and base vs adapter metrics."""

from __future__ import annotations

from pathlib import Path


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
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (answer tokens)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if others:
        axes.legend()
    return _finish(figure, path)


def metrics_chart(report: dict, path: str | Path | None = None):
    """Grouped bars, base vs adapter, for every metric (chrF is shown divided by 100 to share the axis)."""
    import numpy as np

    metrics = list(report["base"])
    scale = [100.0 if metric == "chrf" else 1.0 for metric in metrics]
    base = [report["base"][m] / s for m, s in zip(metrics, scale)]
    adapter = [report["adapter"][m] / s for m, s in zip(metrics, scale)]
    labels = [f"{m}/100" if s != 1.0 else m for m, s in zip(metrics, scale)]
    figure, axes = _figure()
    positions = np.arange(len(metrics))
    for offset, values, label in ((-0.2, base, "base model"), (0.2, adapter, "with adapter")):
        bars = axes.bar(positions + offset, values, width=0.4, label=label)
        axes.bar_label(bars, fmt="%.2f", fontsize=8)
    axes.set_xticks(positions, labels)
    axes.set_ylim(0, 1.3)  # headroom above the bars for the legend
    axes.set_title(f"{report['task']}: base vs adapter on {report['rows']} held-out rows")
    axes.legend(loc="upper left", ncols=2)
    return _finish(figure, path)
