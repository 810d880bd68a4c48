"""Tables from the DataFrame of :func:`htfl_plugins.results.load` (nothing is parsed
from logs): a summary, the paper-style pivot, accuracy after given rounds, traffic and
time tables."""

from __future__ import annotations

import numbers

import pandas as pd

from htfl_plugins.errors import HtflError
from htfl_plugins.results.load import summarize

SCENARIO_KEYS = ["dataset", "partition", "alpha", "clients", "join_ratio", "models", "few_shot"]
DIVERGED_NOTE = ("† a run of this cell diverged (more than --failure-tolerance of a round's clients "
                 "failed); its accuracy is what it had reached by then")


def _pm(values: pd.Series, scale: float = 100.0, digits: int = 2) -> str:
    v = values.dropna() * scale
    if len(v) == 0:
        return "–"
    if len(v) == 1:
        return f"{v.iloc[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def _diverged(g: pd.DataFrame) -> bool:
    """Whether one of these runs diverged."""
    return bool((g["status"] == "diverged").any())


def _cell(g: pd.DataFrame, metric: str) -> str:
    """mean ± std (%) of one table cell's runs, marked † if one of them diverged."""
    return _pm(g[metric]) + (" †" if _diverged(g) else "")


def with_method(df: pd.DataFrame) -> pd.DataFrame:
    """Add a ``method`` column: the run's tag, else its algorithm, followed by its
    options only where one algorithm appears with several option sets."""
    out = df.copy()
    variants = out.groupby("algo")["options"].nunique()
    out["method"] = [t if t else (f"{a} ({o})" if variants[a] > 1 and o else a)
                     for t, a, o in zip(out["tag"].fillna(""), out["algo"], out["options"].fillna(""))]
    return out


def _scenario_label(key, names) -> str:
    key = key if isinstance(key, tuple) else (key,)
    parts = [f"{n}={v}" if n in ("alpha", "clients", "join_ratio", "few_shot") else str(v) for n, v in zip(names, key)]
    return " ".join(parts) or "default"


def _column_order(keys: list) -> list:
    """Scenario keys with numeric parts ascending (``clients=50`` before
    ``clients=100``, whatever the file names' order) and named parts in the order
    they first appear."""
    tuples = [k if isinstance(k, tuple) else (k,) for k in keys]
    seen: list[dict] = [{} for _ in tuples[0]] if tuples else []

    def part(i, v):
        if isinstance(v, numbers.Real) and not isinstance(v, bool) and pd.notna(v):
            return (0, v)
        return (1, seen[i].setdefault("nan" if pd.isna(v) else v, len(seen[i])))

    ranks = [tuple(part(i, v) for i, v in enumerate(t)) for t in tuples]
    return [k for _, k in sorted(zip(ranks, keys), key=lambda rk: rk[0])]


def scenario_columns(df: pd.DataFrame) -> list[str]:
    """The scenario keys on which the runs in ``df`` differ."""
    return [c for c in SCENARIO_KEYS if df[c].nunique(dropna=False) > 1]


def with_scenario(df: pd.DataFrame) -> pd.DataFrame:
    """:func:`with_method` plus a ``scenario`` column that names each row's scenario by
    the keys on which the runs differ ("" where they all share one), so that nothing
    averages runs of different scenarios together."""
    out = with_method(df)
    cols = scenario_columns(out)
    out["scenario"] = [_scenario_label(k, cols) for k in out[cols].itertuples(index=False, name=None)] if cols else ""
    return out


def method_scenario_groups(df: pd.DataFrame) -> list:
    """``((method, scenario), rows)`` of :func:`with_scenario`'s rows: methods in the
    order they first appear, each one's scenarios in the pivot's column order
    (numeric keys ascending). The rows of every per-method table and figure."""
    runs = with_scenario(df)
    cols = scenario_columns(runs)
    keys = list(dict.fromkeys(runs[cols].itertuples(index=False, name=None))) if cols else []
    rank = {_scenario_label(k, cols): i for i, k in enumerate(_column_order(keys))} if cols else {"": 0}
    order = {m: i for i, m in enumerate(dict.fromkeys(runs["method"]))}
    return sorted(runs.groupby(["method", "scenario"], sort=False), key=lambda kg: (order[kg[0][0]], rank[kg[0][1]]))


def _per_method(df: pd.DataFrame, row) -> pd.DataFrame:
    """One row per method, and per scenario where the runs cover several (then with a
    ``scenario`` column), of the dict ``row(rows of that group)``."""
    groups = method_scenario_groups(df)
    several = len({s for (_, s), _ in groups}) > 1
    out = [{"method": m, **({"scenario": s} if several else {}), **row(g)} for (m, s), g in groups]
    return pd.DataFrame(out).set_index("method")


def compare_table(df: pd.DataFrame, by: list[str] | None = None) -> pd.DataFrame:
    """One row per group (default: method and scenario, that is dataset, partition,
    clients, models and any other scenario key on which the runs differ, in the order
    of :func:`method_scenario_groups`; with ``by``, numeric keys ascending): mean ± std
    over seeds of best and last accuracy (%), bytes up/down and seconds per training
    round."""
    runs = with_method(summarize(df))
    if by:
        unknown = [c for c in by if c not in runs.columns]
        if unknown:
            raise HtflError(f"cannot group by {', '.join(unknown)}: not a column of the runs read "
                            f"(columns: {', '.join(runs.columns)})")
        grouped = dict(list(runs.groupby(by, sort=False, dropna=False)))
        groups = [grouped[k] for k in _column_order(list(grouped))]
    else:
        by = ["method", *dict.fromkeys(["dataset", "partition", "clients", "models", *scenario_columns(runs)])]
        groups = [g for _, g in method_scenario_groups(runs)]
    return pd.DataFrame([{**g.iloc[0][by].to_dict(), "seeds": len(g),
                          "best_acc": _cell(g, "best_acc"), "last_acc": _cell(g, "last_acc"),
                          "upload_bytes/round": g["upload_bytes"].mean(),
                          "download_bytes/round": g["download_bytes"].mean(),
                          "s/round": g["round_seconds"].mean()} for g in groups])


def pivot_table(df: pd.DataFrame, metric: str = "best_acc", cols=None,
                bold: str = "**{}**") -> pd.DataFrame:
    """The paper's layout: rows are methods, columns scenarios, cells mean ± std (%)
    over seeds of ``metric``; the best mean of each column is wrapped in ``bold``
    (cells with a diverged run are marked † and never bold)."""
    runs = with_method(summarize(df))
    cols = cols or scenario_columns(runs) or ["dataset"]
    cells, means, keys = {}, {}, {}
    for rlabel, rg in runs.groupby("method", sort=False):
        for ckey, g in rg.groupby(cols, sort=False, dropna=False):
            clabel = _scenario_label(ckey, cols)
            keys.setdefault(ckey, clabel)
            cells[(rlabel, clabel)] = _cell(g, metric)
            if not _diverged(g):
                means[(rlabel, clabel)] = g[metric].mean()
    row_labels = list(dict.fromkeys(r for r, _ in cells))
    col_labels = [keys[k] for k in _column_order(list(keys))]
    table = pd.DataFrame("–", index=row_labels, columns=col_labels)
    for (r, c), text in cells.items():
        table.loc[r, c] = text
    for c in col_labels:
        col = {r: m for (r, cc), m in means.items() if cc == c and pd.notna(m)}
        if col and bold:
            best = max(col, key=col.get)
            table.loc[best, c] = bold.format(table.loc[best, c])
    table.index.name = "method"
    return table


def traffic_table(df: pd.DataFrame) -> pd.DataFrame:
    """Elements (floats and int labels) sent per training round by all clients, in
    millions, as in the FedKTL paper's Table 5; and bytes."""
    return _per_method(df[df["round"] > 0], lambda g: {
        "upload (M)": g["upload_elements"].mean() / 1e6, "download (M)": g["download_elements"].mean() / 1e6,
        "upload MB": g["upload_bytes"].mean() / 1e6, "download MB": g["download_bytes"].mean() / 1e6})


def time_table(df: pd.DataFrame) -> pd.DataFrame:
    """Seconds per training round (local work + server) and per evaluation."""
    return _per_method(df[df["round"] > 0], lambda g: {
        "train s/round": g["train_seconds"].mean(), "eval s/round": g["eval_seconds"].dropna().mean(),
        "total s/round": g["round_seconds"].mean()})


def rounds_table(df: pd.DataFrame, rounds: list[int], metric: str = "test_acc") -> pd.DataFrame:
    """Rows are methods, columns the given rounds, cells mean ± std (%) over seeds
    of ``metric`` after that many training rounds (– where a run has no such row)."""
    return _per_method(df, lambda g: {f"round {r}": _pm(g.loc[g["round"] == r, metric]) for r in rounds})


def render(table: pd.DataFrame, fmt: str, index: bool = True) -> str:
    """markdown, csv or latex text of a table."""
    if fmt == "csv":
        return table.to_csv(index=index)
    if fmt == "latex":
        def cell(v):
            if not isinstance(v, str):
                return v
            text = v.strip("*").replace("±", r"$\pm$")
            return r"\textbf{" + text + "}" if v.startswith("**") else text
        return table.map(cell).to_latex(index=index, float_format="%.4g", escape=False)
    return table.to_markdown(index=index, floatfmt=".4g")
