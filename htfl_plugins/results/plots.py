"""Figures (matplotlib, Agg) from the DataFrame of :func:`htfl_plugins.results.load`.

They show the groups of :func:`htfl_plugins.results.tables.groups` (runs that
differ only in their seed), each method in one colour and marker throughout a
figure, one panel per scenario where the runs cover several.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from htfl_plugins.errors import HtflError
from htfl_plugins.results.load import summarize
from htfl_plugins.results.tables import groups, is_percent, round_column, shared_scenario

MARKERS = "osD^v<>pPX*h"
NAMES = {"test_acc": "test accuracy", "test_auc": "test AUC", "train_loss": "training loss",
         "local_loss": "local training loss"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    except (OSError, ValueError) as exc:  # an unwritable folder, an unknown image format
        raise HtflError(f"cannot write the figure {path}: {exc}") from None
    return path


def _styles(gs) -> dict:
    """(colour, marker) of each method, the same in every panel."""
    plt = _pyplot()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = list(dict.fromkeys(g.method for g in gs))
    return {m: (colours[i % len(colours)], MARKERS[i % len(MARKERS)]) for i, m in enumerate(methods)}


def _panels(gs) -> list[tuple[str, list]]:
    """(scenario, its groups) in the scenarios' order."""
    scen = {}
    for g in sorted(gs, key=lambda g: g.rank):
        scen.setdefault(g.scenario, []).append(g)
    return list(scen.items())


def _grid(plt, n: int, width: float = 5.2, height: float = 3.8):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def plot_curves(df: pd.DataFrame, path, title: str = "", metric: str = "test_acc", ddof: int = 1) -> Path:
    """``metric`` (by default test accuracy) against round: the mean over seeds with a
    ±std band, one line per method, one panel per scenario."""
    from matplotlib.ticker import MaxNLocator

    column = round_column(metric)
    if column not in df.columns:
        raise HtflError(f"--metric {metric!r}: no per-round column {column!r} in these results")
    plt = _pyplot()
    gs = groups(df)
    style = _styles(gs)
    panels = _panels(gs)
    fig, axes = _grid(plt, len(panels))
    scale = 100.0 if is_percent(column) else 1.0
    for ax, (_, members) in zip(axes, panels):
        low, high = math.inf, -math.inf
        for g in members:
            rows = df[df["run"].isin(g.runs["run"])].dropna(subset=[column])
            if rows.empty:
                continue
            per_round = rows.groupby("round")[column]
            stats = pd.DataFrame({"mean": per_round.mean(), "std": per_round.std(ddof=ddof)})
            stats = stats.fillna({"std": 0.0}) * scale
            colour, marker = style[g.method]
            every = max(1, len(stats) // 10)
            ax.plot(stats.index, stats["mean"], color=colour, marker=marker, markevery=every, markersize=4,
                    label=g.method, linewidth=1.4)
            ax.fill_between(stats.index, stats["mean"] - stats["std"], stats["mean"] + stats["std"],
                            color=colour, alpha=0.15, linewidth=0)
            later = stats[stats.index > 0] if len(stats) > 1 else stats  # round 0 (untrained) flattens curves
            low = min(low, float((later["mean"] - later["std"]).min()))
            high = max(high, float((later["mean"] + later["std"]).max()))
        if math.isfinite(low) and math.isfinite(high):
            pad = max((high - low) * 0.05, 0.5 if scale == 100 else abs(high) * 0.01 + 1e-12)
            top = min(high + pad, 100.5) if scale == 100 else high + pad
            ax.set_ylim(low - pad, top)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel(NAMES.get(column, column.replace("_", " ")) + (" (%)" if scale == 100 else ""))
        ax.grid(alpha=0.3)
    _titles(fig, axes, panels, title or shared_scenario(pd.concat([g.runs for g in gs])))
    _legend(fig, axes, style)
    out = _save(fig, path)
    plt.close(fig)
    return out


def _titles(fig, axes, panels, shared: str) -> None:
    """Each panel named by its own scenario settings, the figure by the shared ones."""
    if len(axes) == 1:
        axes[0].set_title(" ".join(t for t in (shared, panels[0][0]) if t) or "all runs", fontsize=10)
        return
    for ax, (scenario, _) in zip(axes, panels):
        ax.set_title(scenario, fontsize=10)
    if shared:
        fig.suptitle(shared)


def _legend(fig, axes, style) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, marker=m, label=name) for name, (c, m) in style.items()]
    if len(axes) == 1:
        axes[0].legend(handles=handles, fontsize=8)
    else:
        fig.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
        fig.tight_layout()


def plot_acc_vs_upload(df: pd.DataFrame, path, title: str = "", ddof: int = 1) -> Path:
    """Best accuracy (mean ± std over seeds) against bytes uploaded per round (log
    scale), one point per method, one panel per scenario."""
    plt = _pyplot()
    gs = groups(summarize(df))
    style = _styles(gs)
    panels = _panels(gs)
    fig, axes = _grid(plt, len(panels))
    for ax, (_, members) in zip(axes, panels):
        for g in members:
            up = max(g.runs["upload_bytes"].mean(), 1.0)
            acc = g.runs["best_acc"] * 100
            colour, marker = style[g.method]
            err = acc.std(ddof=ddof) if len(acc) > ddof else 0.0
            ax.errorbar(up, acc.mean(), yerr=err, fmt=marker, color=colour, capsize=3)
            ax.annotate(g.method, (up, acc.mean()), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("bytes uploaded per round (all clients; 1 = nothing)")
        ax.set_ylabel("best test accuracy (%)")
        ax.grid(alpha=0.3)
    _titles(fig, axes, panels, title or shared_scenario(pd.concat([g.runs for g in gs])))
    _legend(fig, axes, style)
    out = _save(fig, path)
    plt.close(fig)
    return out
