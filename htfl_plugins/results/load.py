"""The one results reader: HDF5 run files → a long pandas DataFrame, and the
tables built from it."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from htfl_plugins.errors import HtflError
from htfl_plugins.results.store import SCALARS, read_run

META = ["tag", "algo", "dataset", "partition", "alpha", "clients", "join_ratio", "models", "rounds",
        "local_epochs", "batch_size", "lr", "seed"]


def _expand(paths) -> list[Path]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out.extend(sorted(p.rglob("*.h5")))
        elif p.is_file():
            out.append(p)
        else:
            raise HtflError(f"{p} does not exist")
    if not out:
        raise HtflError(f"no .h5 result files in {', '.join(map(str, paths))}")
    return out


def load(paths: str | Path | Iterable) -> pd.DataFrame:
    """One row per run and round: metrics, traffic, time, and the run's settings
    (``algo``, ``dataset``, ``seed``, ...) and ``options`` as columns."""
    frames = []
    for path in _expand(paths):
        run = read_run(path)
        cfg = run["config"]
        df = pd.DataFrame({k: run[k] for k in SCALARS if k in run})
        for k, v in run["extra"].items():
            df[k] = v
        df.insert(0, "run", path.stem)
        df["path"] = str(path)
        df["status"] = run["attrs"].get("status", "")
        for k in META:
            df[k] = cfg.get(k)
        opts = cfg.get("options") or {}
        df["options"] = ", ".join(f"{k}={v}" for k, v in sorted(opts.items()))
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run: best and last accuracy, traffic and time per training round."""
    rows = []
    for run, g in df.groupby("run", sort=False):
        evald = g.dropna(subset=["test_acc"])
        trained = g[g["round"] > 0]
        first = g.iloc[0]
        rows.append({
            "run": run, **{k: first[k] for k in META}, "options": first["options"],
            "status": first["status"], "rounds_done": int(g["round"].max()),
            "best_acc": evald["test_acc"].max(), "best_round": int(evald.loc[evald["test_acc"].idxmax(), "round"]),
            "last_acc": evald["test_acc"].iloc[-1], "best_auc": evald["test_auc"].max(),
            "upload_bytes": trained["upload_bytes"].mean() if len(trained) else 0.0,
            "download_bytes": trained["download_bytes"].mean() if len(trained) else 0.0,
            "round_seconds": trained["round_seconds"].mean() if len(trained) else np.nan,
        })
    return pd.DataFrame(rows)


def _pm(values: pd.Series, scale: float = 100.0, digits: int = 2) -> str:
    v = values.dropna() * scale
    if len(v) == 0:
        return "–"
    if len(v) == 1:
        return f"{v.iloc[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def compare_table(df: pd.DataFrame, by: list[str] | None = None) -> pd.DataFrame:
    """Mean ± std over seeds of best and last accuracy (in %), with bytes and seconds
    per round, grouped by algorithm, options and scenario."""
    runs = summarize(df)
    by = by or ["tag", "algo", "options", "dataset", "partition", "clients", "models"]
    out = []
    for key, g in runs.groupby(by, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        out.append({**dict(zip(by, key)), "seeds": len(g),
                    "best_acc": _pm(g["best_acc"]), "last_acc": _pm(g["last_acc"]),
                    "best_acc_mean": g["best_acc"].mean() * 100,
                    "upload_bytes/round": g["upload_bytes"].mean(),
                    "download_bytes/round": g["download_bytes"].mean(),
                    "s/round": g["round_seconds"].mean()})
    table = pd.DataFrame(out)
    for col in ("tag", "options"):
        if col in table and (table[col].fillna("") == "").all():
            table = table.drop(columns=col)
    return table


def plot_curves(df: pd.DataFrame, path: str | Path, by: list[str] | None = None) -> Path:
    """Accuracy against round, mean over seeds with a ±std band, one line per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = by or ["tag", "algo", "options"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, g in df.dropna(subset=["test_acc"]).groupby(by, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        label = " ".join(str(k) for k in key if k)
        stats = g.groupby("round")["test_acc"].agg(["mean", "std"]).fillna(0.0) * 100
        ax.plot(stats.index, stats["mean"], label=label)
        ax.fill_between(stats.index, stats["mean"] - stats["std"], stats["mean"] + stats["std"], alpha=0.2)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
