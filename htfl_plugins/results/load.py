"""The one results reader: HDF5 run files → a long pandas DataFrame, and the
tables built from it."""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from htfl_plugins import config as config_mod
from htfl_plugins.config import RunConfig
from htfl_plugins.errors import HtflError
from htfl_plugins.results.store import CHECKPOINT_SUFFIX, SCALARS, read_run

#: The run settings that are columns of :func:`load`'s frame: every setting that makes
#: a run the run it is (``config.compared_settings``), in RunConfig's order, then the seed.
SETTINGS = [f.name for f in config_mod.fields_of(RunConfig) if f.name not in config_mod.NOT_COMPARED
            and f.name != "options"]
META = [*SETTINGS, "seed"]
DONE = ("finished", "stopped_early", "diverged")  # statuses of runs that ran to their end


@functools.cache
def options_class(algo: str | None):
    """The options dataclass of an installed algorithm (None where it is not
    installed: its stored options are then compared as they are)."""
    from htfl_plugins.errors import PluginError
    from htfl_plugins.plugins import get_plugins

    try:
        return get_plugins().algorithm(algo).options
    except (HtflError, PluginError):
        return None


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
    """One row per run and round: metrics, traffic, time, the per-round ``extra/``
    accuracies and ``metrics/`` scalars (``local_loss``, ``server_*``, ``client_*``),
    and the run's settings as columns: every setting of :data:`SETTINGS` (a file
    written before a setting existed shows what it ran with), ``seed``,
    ``options`` (text), ``settings`` (JSON of everything but the seed that makes
    the run what it is: two runs with the same ``settings`` differ only in their
    seed), ``status`` and ``error`` (``run`` is the file's stem, or its path where
    two files share a stem). ``until`` keeps rounds 0..until only, as if every
    longer run had stopped there (its ``rounds`` becomes ``until``): a budget of
    rounds read from longer runs.

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
        for group in ("extra", "metrics"):
            for k, v in run[group].items():
                df[k] = v
        df.insert(0, "run", str(path) if clash else path.stem)  # two folders' a.h5 stay two runs
        df["path"] = str(path)
        df["status"] = run["attrs"].get("status", "")
        df["error"] = run["attrs"].get("error", "")
        settings = config_mod.compared_settings(cfg, options_class(cfg.get("algo")))
        if until is not None:
            df = df[df["round"] <= until].copy()
            settings["rounds"] = min(settings["rounds"], until)
        for k in SETTINGS:
            df[k] = settings[k]
        df["seed"] = cfg.get("seed")
        df["options"] = ", ".join(f"{k[len('options.'):]}={v}" for k, v in settings.items()
                                  if k.startswith("options."))
        df["settings"] = json.dumps(settings, sort_keys=True, default=str)
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


#: Per-round columns that every result file has; any other numeric per-round column
#: (``acc_*``, ``local_loss``, ``server_*``, ``client_*``) is a metric :func:`summarize`
#: reduces to its last finite value.
FIXED = {*SCALARS, "run", "path", "status", "error", "options", "settings", *META}


def round_metrics(df: pd.DataFrame) -> list[str]:
    """The per-round metric columns of ``df`` beyond the fixed ones (``acc_head``,
    ``local_loss``, ``server_align_mmd``, ...), in the order they appear."""
    return [c for c in df.columns if c not in FIXED and pd.api.types.is_numeric_dtype(df[c])]


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run: its settings, best and last accuracy, traffic and time per
    training round, and each per-round metric of :func:`round_metrics` at its
    last finite value."""
    extra = round_metrics(df)
    rows = []
    for run, g in df.groupby("run", sort=False):
        evald = g.dropna(subset=["test_acc"])
        trained = g[g["round"] > 0]
        first = g.iloc[0]
        row = {"run": run, "path": first["path"], **{k: first[k] for k in META}, "options": first["options"],
               "settings": first["settings"], "status": first["status"], "error": first["error"],
               "rounds_done": int(g["round"].max()),
               "best_acc": evald["test_acc"].max(),
               "best_round": int(evald.loc[evald["test_acc"].idxmax(), "round"]) if len(evald) else -1,
               "last_acc": evald["test_acc"].iloc[-1] if len(evald) else np.nan,
               "best_auc": evald["test_auc"].max(),
               "upload_bytes": trained["upload_bytes"].mean() if len(trained) else 0.0,
               "download_bytes": trained["download_bytes"].mean() if len(trained) else 0.0,
               "round_seconds": trained["round_seconds"].mean() if len(trained) else np.nan}
        for k in extra:
            finite = g[k].dropna()
            row[k] = finite.iloc[-1] if len(finite) else np.nan
        rows.append(row)
    return pd.DataFrame(rows)
