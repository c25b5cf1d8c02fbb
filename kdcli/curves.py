"""Learning curves of a run's stages from their ``history.csv``: top-1, loss terms and learning rate per epoch.

One figure per (run, stage), three panels side by side: test (solid) and validation (dashed) top-1 in percent,
each loss term (log scale: the terms differ by orders of magnitude), and the learning rate. With several seeds,
each seed is a thin line and their mean a bold one. The format follows the file name: PNG, PDF or SVG.
Needs matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from kdcli import figures

NOT_LOSSES = {"epoch", "lr", "seconds", "images_per_s", "train_top1", "test_top1", "val_top1", "test_nll", "val_nll",
              "test_top5", "val_top5"}


def plot_stage(histories: dict[int, pd.DataFrame], title: str, path: Path) -> Path:
    """Draw one stage's curves (``histories``: seed -> history table) to ``path``."""
    figures.check_path(path)
    plt = figures.pyplot()
    with plt.rc_context({"font.size": 9, "axes.titlesize": 10, "legend.fontsize": 8}):
        figure, (accuracy, losses, rates) = plt.subplots(1, 3, figsize=(11, 3.4), constrained_layout=True)
        for column, style, label in (("test_top1", "-", "test"), ("val_top1", "--", "val"),
                                     ("train_top1", ":", "train")):
            _lines(accuracy, histories, column, style, label)
        accuracy.set(xlabel="epoch", ylabel="top-1 (%)", title="accuracy")
        terms = sorted({c for h in histories.values() for c in h.columns if c not in NOT_LOSSES})
        for term in terms:
            _lines(losses, histories, term, "-", "total (weighted)" if term == "loss" else term)
        if terms:
            losses.set_yscale("log")
        losses.set(xlabel="epoch", ylabel="loss (log scale)", title="loss terms (epoch mean)")
        _lines(rates, histories, "lr", "-", "lr")
        rates.set(xlabel="epoch", ylabel="learning rate", title="schedule")
        for axes in (accuracy, losses):
            if axes.get_legend_handles_labels()[0]:
                axes.legend(loc="best", frameon=False)
        seeds = len(histories)
        legend = f"{seeds} seeds: thin per seed, bold mean" if seeds > 1 else "1 seed"
        figure.suptitle(f"{title} ({legend})")
        return figures.save(figure, path)


def _lines(axes, histories: dict[int, pd.DataFrame], column: str, style: str, label: str) -> None:
    series = [h.set_index("epoch")[column] for h in histories.values() if column in h.columns and h[column].notna().any()]
    if not series:
        return
    if len(series) == 1:
        axes.plot(series[0].index, series[0].values, style, linewidth=1.6, label=label)
        return
    line = None
    for one in series:
        line = axes.plot(one.index, one.values, style, linewidth=0.7, alpha=0.45,
                         color=line[0].get_color() if line else None)
    mean = pd.concat(series, axis=1).mean(axis=1)
    axes.plot(mean.index, mean.values, style, linewidth=2.0, color=line[0].get_color(), label=f"{label} (mean)")
