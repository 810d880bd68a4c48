"""The one results reader: HDF5 run files → a long pandas DataFrame, and the
tables built from it."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from htfl_plugins.errors import HtflError
from htfl_plugins.results.store import CHECKPOINT_SUFFIX, SCALARS, read_run

META = ["tag", "algo", "dataset", "partition", "alpha", "clients", "join_ratio", "models", "few_shot",
        "rounds", "local_epochs", "batch_size", "lr", "seed"]
DONE = ("finished", "stopped_early", "diverged")  # statuses of runs that ran to their end


def _expand(paths) -> list[Path]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out, checkpoints = [], []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out.extend(sorted(p.rglob("*.h5")))
        elif p.suffix == CHECKPOINT_SUFFIX and p.is_file():  # a shell glob such as DIR/*fmnist* matches them
            checkpoints.append(p.name)
        elif p.is_file():
            out.append(p)
        else:
            raise HtflError(f"{p} does not exist")
    if checkpoints:
        warnings.warn(f"skipped {len(checkpoints)} checkpoint file(s) of runs in progress: {', '.join(checkpoints)}",
                      stacklevel=3)
    if not out:
        raise HtflError(f"no .h5 result files in {', '.join(map(str, paths))}")
    return out


def load(paths: str | Path | Iterable, until: int | None = None, unfinished: bool = False) -> pd.DataFrame:
    """One row per run and round: metrics, traffic, time, and the run's settings
    (``algo``, ``dataset``, ``seed``, ...), ``options``, ``status`` and ``error`` as columns
    (``run`` is the file's stem, or its path where two files share a stem). ``until``
    keeps rounds 0..until only, as if every longer run had stopped there (its
    ``rounds`` becomes ``until``): a budget of rounds read from longer runs.

    Runs that have not run to their end (a status outside ``DONE``: running,
    interrupted, failed) are left out with a warning naming them, and an error if
    no run is left; ``unfinished=True`` reads them as far as they got."""
    frames = []
    files = _expand(paths)
    stems = pd.Series([f.stem for f in files])
    for path, clash in zip(files, stems.duplicated(keep=False)):
        run = read_run(path)
        cfg = run["config"]
        df = pd.DataFrame({k: run[k] for k in SCALARS if k in run})
        for k, v in run["extra"].items():
            df[k] = v
        df.insert(0, "run", str(path) if clash else path.stem)  # two folders' a.h5 stay two runs
        df["path"] = str(path)
        df["status"] = run["attrs"].get("status", "")
        df["error"] = run["attrs"].get("error", "")
        for k in META:
            df[k] = cfg.get(k)
        opts = cfg.get("options") or {}
        df["options"] = ", ".join(f"{k}={v}" for k, v in sorted(opts.items()))
        if until is not None:
            df = df[df["round"] <= until].copy()
            df["rounds"] = min(cfg["rounds"], until)
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    if unfinished:
        return df
    left = df[~df["status"].isin(DONE)].groupby("run", sort=False)["status"].first()
    if len(left) == df["run"].nunique():
        raise HtflError(f"no run read has finished ({', '.join(sorted(set(left)))}); "
                        "--unfinished (unfinished=True) reads them as far as they got")
    if len(left):
        warnings.warn(f"left out {len(left)} unfinished run(s) (--unfinished keeps them): "
                      + ", ".join(f"{r} ({s})" for r, s in left.items()), stacklevel=2)
    return df[df["status"].isin(DONE)].reset_index(drop=True)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run: best and last accuracy, traffic and time per training round."""
    rows = []
    for run, g in df.groupby("run", sort=False):
        evald = g.dropna(subset=["test_acc"])
        trained = g[g["round"] > 0]
        first = g.iloc[0]
        rows.append({
            "run": run, **{k: first[k] for k in META}, "options": first["options"],
            "status": first["status"], "error": first["error"], "rounds_done": int(g["round"].max()),
            "best_acc": evald["test_acc"].max(),
            "best_round": int(evald.loc[evald["test_acc"].idxmax(), "round"]) if len(evald) else -1,
            "last_acc": evald["test_acc"].iloc[-1] if len(evald) else np.nan, "best_auc": evald["test_auc"].max(),
            "upload_bytes": trained["upload_bytes"].mean() if len(trained) else 0.0,
            "download_bytes": trained["download_bytes"].mean() if len(trained) else 0.0,
            "round_seconds": trained["round_seconds"].mean() if len(trained) else np.nan,
        })
    return pd.DataFrame(rows)
