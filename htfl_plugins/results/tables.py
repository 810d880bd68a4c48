"""Tables from the DataFrame of :func:`htfl_plugins.results.load` (nothing is parsed
from logs): a summary, the paper-style pivot, accuracy after given rounds, traffic and
time tables.

Every table averages only runs that differ in nothing but their seed. Runs are
grouped by method (the tag, else the algorithm, with its options where one label
covers several option sets) and by every other setting on which the runs read
differ; those settings name the table's scenarios (``digits dir clients=10
lr=0.1``), so a sweep over ``--lr`` gives one row per learning rate. Two runs of
one group with the same seed are an error naming both files. Cells are
:class:`Stat` values (mean, standard deviation over seeds, count), rendered as
``mean ± std`` (markdown, LaTeX) or as separate mean and std columns (CSV).
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from htfl_plugins.errors import HtflError
from htfl_plugins.results.load import SETTINGS, round_metrics, summarize

#: The settings that describe a scenario, first in a scenario's label; any other
#: setting on which runs differ (``lr``, ``rounds``, ``eval_point``, ...) follows.
SCENARIO_KEYS = ["dataset", "partition", "alpha", "classes_per_client", "clients", "join_ratio", "models",
                 "few_shot"]
BARE = ("dataset", "partition", "models")  # shown by value alone in a label; others as key=value
METHOD_KEYS = ("algo", "tag")  # the method label covers these (and the options)
SUMMARY_KEYS = ["dataset", "partition", "clients", "models"]  # columns of every summary table
DIVERGED_NOTE = ("† a run of this cell diverged (more than --failure-tolerance of a round's clients "
                 "failed); its accuracy is what it had reached by then")
RUN_METRICS = ("best_acc", "last_acc", "best_auc")  # one value per run; the per-round ones are listed by load
MB = 1e6


def std_note(ddof: int) -> str:
    kind = "sample standard deviation (ddof 1)" if ddof == 1 else "population standard deviation (ddof 0, PFLlib's)"
    return f"mean ± {kind} over seeds"


# ------------------------------------------------------------------ cells
@dataclass(frozen=True)
class Stat:
    """One table cell: mean and standard deviation of a metric over a group's runs."""

    mean: float
    std: float  # NaN for a single run
    n: int
    percent: bool = True  # shown ×100
    diverged: bool = False  # one of the runs diverged (marked †, never bold)
    best: bool = False  # the best mean of its column (bold)

    @classmethod
    def of(cls, values, ddof: int = 1, percent: bool = True, diverged: bool = False) -> Stat:
        v = pd.Series(values, dtype=float).dropna()
        if len(v) == 0:
            return cls(math.nan, math.nan, 0, percent, diverged)
        std = float(v.std(ddof=ddof)) if len(v) > ddof else math.nan
        return cls(float(v.mean()), std, len(v), percent, diverged)

    def scaled(self) -> tuple[float, float]:
        k = 100.0 if self.percent else 1.0
        return self.mean * k, self.std * k

    def text(self, pm: str = "±") -> str:
        if self.n == 0:
            return "–"
        mean, std = self.scaled()
        fmt = (lambda x: f"{x:.2f}") if self.percent else (lambda x: f"{x:.4g}")
        out = fmt(mean) if self.n == 1 or math.isnan(std) else f"{fmt(mean)} {pm} {fmt(std)}"
        return out + (" †" if self.diverged else "")

    def __str__(self) -> str:
        return self.text()


def round_column(metric: str) -> str:
    """The per-round column behind ``metric``: test accuracy for best and last
    accuracy, test AUC for best AUC, the metric itself otherwise."""
    return {"best_acc": "test_acc", "last_acc": "test_acc", "best_auc": "test_auc"}.get(metric, metric)


def is_percent(metric: str) -> bool:
    """Accuracies and AUCs are shown in percent; other metrics as they are."""
    return metric in RUN_METRICS or "acc" in metric or "auc" in metric


def _stat(g: pd.DataFrame, metric: str, ddof: int) -> Stat:
    return Stat.of(g[metric], ddof, is_percent(metric), bool((g["status"] == "diverged").any()))


# ------------------------------------------------------------------ grouping
def with_method(runs: pd.DataFrame) -> pd.DataFrame:
    """Add a ``method`` column: the run's tag, else its algorithm; where one label
    covers several algorithms or option sets, each run's label gets its algorithm
    and the options on which they differ appended (``FedKTL (mu=0.0)``)."""
    out = runs.copy()
    out["method"] = [t if t else a for t, a in zip(out["tag"].fillna(""), out["algo"])]
    labels = out["method"].copy()
    for base, g in out.groupby("method", sort=False):
        several_algos = g["algo"].nunique() > 1
        opts = [json.loads(s) for s in g["settings"]]
        keys = sorted({k for o in opts for k in o if k.startswith("options.")})
        differ = [k for k in keys if len({json.dumps(o.get(k), default=str) for o in opts}) > 1]
        for idx, algo, o in zip(g.index, g["algo"], opts):
            parts = ([algo] if several_algos and algo != base else [])
            parts += [f"{k[len('options.'):]}={o.get(k, '–')}" for k in differ]
            if parts:
                labels[idx] = f"{base} ({', '.join(parts)})"
    out["method"] = labels
    return out


def differing_settings(runs: pd.DataFrame) -> list[str]:
    """The settings (besides algorithm, tag and options) on which the runs differ:
    scenario keys first, then the others in RunConfig's order."""
    keys = SCENARIO_KEYS + [k for k in SETTINGS if k not in SCENARIO_KEYS and k not in METHOD_KEYS]
    return [k for k in keys if k in runs and runs[k].astype(str).nunique() > 1]


def shared_scenario(runs: pd.DataFrame) -> str:
    """The label of the scenario settings all ``runs`` share (``digits dir clients=10``)."""
    keys = [k for k in ("dataset", "partition", "clients", "models")
            if k in runs and runs[k].astype(str).nunique() == 1]
    return _label({k: runs[k].iloc[0] for k in keys})


def _label(values: dict) -> str:
    parts = [str(v) if k in BARE else f"{k}={v}" for k, v in values.items()]
    return " ".join(parts) or "default"


def _column_order(keys: list) -> list:
    """Keys (tuples of setting values) with numeric parts ascending (``clients=50``
    before ``clients=100``, whatever the file names' order) and named parts in the
    order they first appear."""
    tuples = [k if isinstance(k, tuple) else (k,) for k in keys]
    seen: list[dict] = [{} for _ in tuples[0]] if tuples else []

    def part(i, v):
        if isinstance(v, numbers.Real) and not isinstance(v, bool) and pd.notna(v):
            return (0, v)
        return (1, seen[i].setdefault("nan" if pd.isna(v) else v, len(seen[i])))

    ranks = [tuple(part(i, v) for i, v in enumerate(t)) for t in tuples]
    return [k for _, k in sorted(zip(ranks, keys), key=lambda rk: rk[0])]


@dataclass
class Group:
    """Runs that differ only in their seed."""

    method: str
    scenario: str  # label of the differing settings' values ("" where the runs share one scenario)
    rank: int  # the scenario's place among the scenarios shown
    runs: pd.DataFrame  # one row per run (summarize's columns)


def groups(df: pd.DataFrame, by: list[str] | None = None) -> list[Group]:
    """The groups of runs that a table's rows (and a figure's lines) show: methods in
    the order they first appear, each one's scenarios in :func:`_column_order`.
    With ``by``, groups are the distinct values of those columns instead (ordered
    alike), which must still never put runs of different settings together. Two
    runs of a group with the same seed are an error naming both files."""
    runs = with_method(summarize(df) if "round" in df.columns else df)
    diff = differing_settings(runs)
    values = list(runs[diff].itertuples(index=False, name=None)) if diff else [()] * len(runs)
    labels = [_label(dict(zip(diff, v))) if diff else "" for v in values]
    runs["scenario"] = labels
    rank = {_label(dict(zip(diff, v))) if diff else "": i
            for i, v in enumerate(_column_order(list(dict.fromkeys(values))))}
    keys = by or ["method", "scenario"]
    unknown = [c for c in keys if c not in runs.columns]
    if unknown:
        raise HtflError(f"cannot group by {', '.join(unknown)}: not a column of the runs read "
                        f"(columns: {', '.join(runs.columns)})")
    found = {}
    for key, g in runs.groupby(keys, sort=False, dropna=False):
        _check_one_setting(g, keys)
        _check_seeds(g)
        first = g.iloc[0]
        found[key] = Group(str(first["method"]), str(first["scenario"]), rank[first["scenario"]], g)
    if by:
        return [found[k] for k in _column_order(list(found))]
    methods = {m: i for i, m in enumerate(dict.fromkeys(runs["method"]))}
    return sorted(found.values(), key=lambda gr: (methods[gr.method], gr.rank))


def _check_one_setting(g: pd.DataFrame, keys: list[str]) -> None:
    if g["settings"].nunique() <= 1:
        return
    a, b = (json.loads(s) for s in g["settings"].unique()[:2])
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    raise HtflError(f"grouping by {','.join(keys)} would average runs that differ in "
                    f"{', '.join(differ)} (e.g. {Path(g['path'].iloc[0]).name}); add "
                    f"{differ[0].removeprefix('options.')} to --by, or leave --by out")


def _check_seeds(g: pd.DataFrame) -> None:
    dup = g[g["seed"].duplicated(keep=False)]
    if len(dup):
        seed = dup["seed"].iloc[0]
        files = dup[dup["seed"] == seed]["path"].tolist()
        raise HtflError(f"{files[0]} and {files[1]} are two runs of one setting with the same seed {seed}; "
                        "a table averages over seeds, so keep one (or give them different --tag)")


# ------------------------------------------------------------------ tables
def _metric_column(df: pd.DataFrame, metric: str) -> str:
    """Check that ``metric`` is one a table can show: a per-run one or a per-round one."""
    known = [*RUN_METRICS, *round_metrics(df)]
    if metric not in known:
        raise HtflError(f"--metric {metric!r} is not in these results (known: {', '.join(known)})")
    return metric


def compare_table(df: pd.DataFrame, by: list[str] | None = None, ddof: int = 1,
                  metric: str | None = None) -> pd.DataFrame:
    """One row per group of :func:`groups`: method, the scenario keys of
    :data:`SUMMARY_KEYS`, every other setting on which the rows differ, the number
    of distinct seeds, mean ± std of best and last accuracy (%), MB up/down and
    seconds per training round; ``metric`` adds that metric's column (a per-round
    metric at its last finite value)."""
    gs = groups(df, by)
    runs = pd.concat([g.runs for g in gs])
    cols = by or ["method", *dict.fromkeys([*SUMMARY_KEYS, *differing_settings(runs)])]
    if metric and metric not in ("best_acc", "last_acc"):
        _metric_column(df, metric)
    rows = []
    for g in gs:
        r = g.runs
        row = {**{c: r.iloc[0][c] for c in cols}, "seeds": r["seed"].nunique(),
               "best_acc": _stat(r, "best_acc", ddof), "last_acc": _stat(r, "last_acc", ddof)}
        if metric and metric not in row:
            row[metric] = _stat(r, metric, ddof)
        row.update({"upload MB/round": r["upload_bytes"].mean() / MB,
                    "download MB/round": r["download_bytes"].mean() / MB,
                    "s/round": r["round_seconds"].mean()})
        rows.append(row)
    return pd.DataFrame(rows)


def pivot_table(df: pd.DataFrame, metric: str = "best_acc", ddof: int = 1) -> pd.DataFrame:
    """The paper's layout: rows are methods, columns scenarios (every setting on which
    the runs differ), cells mean ± std over seeds of ``metric``; the best mean of each
    column is marked bold (cells with a diverged run are marked † and never bold;
    for a loss-like per-round metric the lowest mean is best)."""
    metric = _metric_column(df, metric)
    gs = groups(df)
    rows = list(dict.fromkeys(g.method for g in gs))
    cols = list(dict.fromkeys(g.scenario or "all" for g in sorted(gs, key=lambda g: g.rank)))
    table = pd.DataFrame(Stat(math.nan, math.nan, 0), index=rows, columns=cols, dtype=object)
    for g in gs:
        table.loc[g.method, g.scenario or "all"] = _stat(g.runs, metric, ddof)
    lower = "loss" in metric or "mmd" in metric or "mse" in metric
    for c in cols:
        cands = {r: s.mean for r, s in table[c].items() if s.n and not s.diverged and not math.isnan(s.mean)}
        if cands:
            best = (min if lower else max)(cands, key=cands.get)
            table.loc[best, c] = replace(table.loc[best, c], best=True)
    table.index.name = "method"
    return table


def _per_group(df: pd.DataFrame, row) -> pd.DataFrame:
    """One row per group of :func:`groups` (with a ``scenario`` column where they
    cover several scenarios) of the dict ``row(that group's per-round rows)``."""
    gs = groups(df)
    several = len({g.scenario for g in gs}) > 1
    out = []
    for g in gs:
        rows = df[df["run"].isin(g.runs["run"])]
        out.append({"method": g.method, **({"scenario": g.scenario} if several else {}), **row(rows)})
    return pd.DataFrame(out).set_index("method")


def traffic_table(df: pd.DataFrame) -> pd.DataFrame:
    """Elements (floats and int labels) sent per training round by all clients, in
    millions, as in the FedKTL paper's Table 5; and MB."""
    def row(g):
        t = g[g["round"] > 0]
        return {"upload (M)": t["upload_elements"].mean() / 1e6, "download (M)": t["download_elements"].mean() / 1e6,
                "upload MB": t["upload_bytes"].mean() / MB, "download MB": t["download_bytes"].mean() / MB}
    return _per_group(df, row)


def time_table(df: pd.DataFrame) -> pd.DataFrame:
    """Seconds per training round (local work + server) and per evaluation."""
    def row(g):
        t = g[g["round"] > 0]
        return {"train s/round": t["train_seconds"].mean(), "eval s/round": t["eval_seconds"].dropna().mean(),
                "total s/round": t["round_seconds"].mean()}
    return _per_group(df, row)


def rounds_table(df: pd.DataFrame, rounds: list[int], metric: str = "test_acc", ddof: int = 1) -> pd.DataFrame:
    """Rows are methods (and scenarios), columns the given rounds, cells mean ± std
    over seeds of the per-round ``metric`` after that many training rounds (– where
    a run has no such row)."""
    if metric not in ("test_acc", "test_auc", "train_loss"):
        metric = _metric_column(df, metric)

    def row(g):
        return {f"round {r}": Stat.of(g.loc[g["round"] == r, metric], ddof, is_percent(metric),
                                      bool((g["status"] == "diverged").any())) for r in rounds}
    return _per_group(df, row)


# ------------------------------------------------------------------ rendering
LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "±": r"$\pm$", "†": r"$^\dagger$", "–": "--", "×": r"$\times$", "²": r"$^2$"}


def latex_escape(text) -> str:
    """``text`` with every character LaTeX treats specially spelt out."""
    return "".join(LATEX_SPECIALS.get(ch, ch) for ch in str(text))


def _csv_frame(table: pd.DataFrame, ddof: int) -> pd.DataFrame:
    """Each column of :class:`Stat` cells as a mean and a std column of numbers."""
    out = {}
    for c in table.columns:
        col = table[c]
        if len(col) and all(isinstance(v, Stat) for v in col):
            unit = " (%)" if any(v.percent for v in col) else ""
            out[f"{c} mean{unit}"] = [v.scaled()[0] for v in col]
            out[f"{c} std{unit} (ddof {ddof})"] = [v.scaled()[1] for v in col]
            if any(v.diverged for v in col):
                out[f"{c} diverged"] = [v.diverged for v in col]
        else:
            out[c] = col.tolist()
    return pd.DataFrame(out, index=table.index)


def render(table: pd.DataFrame, fmt: str, index: bool = True, ddof: int = 1) -> str:
    """markdown, csv or latex text of a table (a markdown or LaTeX table of
    mean ± std cells is followed by a line saying which std)."""
    has_stats = any(isinstance(v, Stat) for v in np.ravel(table.to_numpy()))
    if fmt == "csv":
        return _csv_frame(table, ddof).to_csv(index=index)
    if fmt == "latex":
        def cell(v):
            if isinstance(v, Stat):
                text = v.text(pm="±")
                return r"\textbf{" + latex_escape(text) + "}" if v.best else latex_escape(text)
            if isinstance(v, float):
                return f"{v:.4g}"
            return latex_escape(v)
        body = table.map(cell)
        body.columns = [latex_escape(c) for c in body.columns]
        body.index = [latex_escape(i) for i in body.index]
        body.index.name = latex_escape(table.index.name) if table.index.name else None
        text = body.to_latex(index=index, escape=False)
        return text + (f"% {std_note(ddof).replace('±', '+/-')}\n" if has_stats else "")

    def md(v):
        if isinstance(v, Stat):
            return f"**{v.text()}**" if v.best else v.text()
        return v
    text = table.map(md).to_markdown(index=index, floatfmt=".4g")
    return text + (f"\n\n{std_note(ddof)}" if has_stats else "")
