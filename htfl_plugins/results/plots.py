"""Figures (matplotlib, Agg) from the DataFrame of :func:`htfl_plugins.results.load`."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from htfl_plugins.results.tables import method_scenario_groups


def _by_label(df: pd.DataFrame) -> list:
    """(label, rows) per method, and per scenario where the runs cover several: the
    label is then "method (scenario)"; in the tables' row order."""
    return [(f"{m} ({s})" if s else m, g) for (m, s), g in method_scenario_groups(df)]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_curves(df: pd.DataFrame, path, title: str = "") -> Path:
    """Accuracy against round, mean over seeds with a ±std band, one line per method
    (and scenario)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    low = 100.0
    for method, g in _by_label(df.dropna(subset=["test_acc"])):
        stats = g.groupby("round")["test_acc"].agg(["mean", "std"]).fillna(0.0) * 100
        ax.plot(stats.index, stats["mean"], label=method)
        ax.fill_between(stats.index, stats["mean"] - stats["std"], stats["mean"] + stats["std"], alpha=0.2)
        later = stats[stats.index > 0]
        low = min(low, float((later["mean"] - later["std"]).min()) if len(later) else 0.0)
    ax.set_ylim(bottom=max(0.0, low - 1.0))  # round 0 (untrained) would flatten the curves
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_acc_vs_upload(df: pd.DataFrame, path, title: str = "") -> Path:
    """Best accuracy (mean ± std over seeds) against bytes uploaded per round (log)."""
    from htfl_plugins.results.load import summarize

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, g in _by_label(summarize(df)):
        up = max(g["upload_bytes"].mean(), 1.0)
        acc = g["best_acc"] * 100
        ax.errorbar(up, acc.mean(), yerr=acc.std(ddof=1) if len(acc) > 1 else 0, fmt="o", capsize=3)
        ax.annotate(method, (up, acc.mean()), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("bytes uploaded per round (all clients; 1 = nothing)")
    ax.set_ylabel("best test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    out = _save(fig, path)
    plt.close(fig)
    return out
