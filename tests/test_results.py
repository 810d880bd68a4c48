"""Tables and figures from result files, through the one pandas reader."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch

from htfl_plugins.cli import main
from htfl_plugins.config import RunConfig, build
from htfl_plugins.engine import run
from htfl_plugins.errors import HtflError
from htfl_plugins.results import compare_table, load, pivot_table, rounds_table, summarize, time_table, traffic_table
from htfl_plugins.results.plots import _by_label
from htfl_plugins.results.tables import render


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """local and feddistill, 2 seeds each, on two digits scenarios (alpha 0.5 and 5)."""
    out = tmp_path_factory.mktemp("grid")
    for algo in ("local", "feddistill"):
        for alpha in (0.5, 5.0):
            for seed in (0, 1):
                cfg = build(RunConfig, dict(algo=algo, dataset="digits", clients=3, rounds=2, alpha=alpha,
                                            seed=seed, out=str(out), name=f"{algo}-{alpha}-{seed}",
                                            executor="sequential"), "s")
                run(cfg, quiet=True)
    return out


def test_load_is_long_form_with_settings(grid):
    df = load(grid)
    assert len(df) == 8 * 3 and set(df["round"]) == {0, 1, 2}
    assert set(df["algo"]) == {"local", "feddistill"} and set(df["alpha"]) == {0.5, 5.0}
    runs = summarize(df)
    assert len(runs) == 8
    one = df[df["run"] == "local-0.5-0"]
    assert runs.set_index("run").loc["local-0.5-0", "best_acc"] == one["test_acc"].max()


def test_pivot_orders_numeric_scenarios_by_value_and_named_ones_as_they_come(grid):
    df = load(grid)
    df["alpha"] = df["alpha"].map({0.5: 50.0, 5.0: 5.0})
    assert df.drop_duplicates("run")["alpha"].iloc[0] == 50.0  # the files give alpha 50 first
    assert list(pivot_table(df).columns) == ["alpha=5.0", "alpha=50.0"]
    named = load(grid)
    named["partition"] = named["alpha"].map({0.5: "pat", 5.0: "dir"})
    named["alpha"] = 0.1
    assert list(pivot_table(named).columns) == ["pat", "dir"]


def test_pivot_bolds_the_best_mean_of_each_column(grid):
    df = load(grid)
    table = pivot_table(df)
    assert list(table.columns) == ["alpha=0.5", "alpha=5.0"]
    assert set(table.index) == {"local", "feddistill"}
    runs = summarize(df)
    for col, alpha in zip(table.columns, (0.5, 5.0)):
        means = runs[runs["alpha"] == alpha].groupby("algo")["best_acc"].mean()
        best = means.idxmax()
        assert table.loc[best, col].startswith("**") and "±" in table.loc[best, col]
        other = next(a for a in means.index if a != best)
        assert not table.loc[other, col].startswith("**")
        mean_text = table.loc[best, col].strip("*").split(" ± ")[0]
        assert float(mean_text) == pytest.approx(means[best] * 100, abs=0.006)
    latex = render(table, "latex")
    assert r"\textbf{" in latex and r"$\pm$" in latex and "**" not in latex


def test_the_default_summary_keeps_every_scenario_key_that_differs(grid):
    table = compare_table(load(grid))
    assert list(table.columns[:6]) == ["method", "dataset", "partition", "clients", "models", "alpha"]
    assert len(table) == 4 and (table["seeds"] == 2).all()  # 2 methods x 2 alphas, 2 seeds each
    assert set(zip(table["method"], table["alpha"])) == {(m, a) for m in ("local", "feddistill") for a in (0.5, 5.0)}
    swapped = load(grid)
    swapped["alpha"] = swapped["alpha"].map({0.5: 50.0, 5.0: 5.0})  # the files give alpha 50 first
    methods = list(dict.fromkeys(swapped["algo"]))
    rows = [(m, a) for m in methods for a in (5.0, 50.0)]  # the pivot's column order within each method
    ordered = compare_table(swapped)
    assert list(zip(ordered["method"], ordered["alpha"])) == rows
    by_alpha = compare_table(swapped, by=["alpha", "algo"])
    assert list(zip(by_alpha["alpha"], by_alpha["algo"])) == [(a, m) for a in (5.0, 50.0) for m in methods]
    assert (by_alpha["seeds"] == 2).all()
    with pytest.raises(HtflError, match="cannot group by nosuch: not a column of the runs read"):
        compare_table(swapped, by=["algo", "nosuch"])


def test_traffic_and_time_tables_keep_scenarios_apart(grid):
    df = load(grid)
    methods = list(dict.fromkeys(df["algo"]))  # rows: each method's scenarios together
    traffic = traffic_table(df).reset_index().set_index(["method", "scenario"])
    assert list(traffic.index) == [(m, s) for m in methods for s in ("alpha=0.5", "alpha=5.0")]
    assert (traffic.loc["local", "upload (M)"] == 0).all()
    fd = df[(df["algo"] == "feddistill") & (df["round"] > 0)]
    per_alpha = fd.groupby("alpha")["upload_elements"].mean() / 1e6
    assert per_alpha[0.5] != per_alpha[5.0]  # fewer classes per client at alpha 0.5: fewer logits up
    for alpha in (0.5, 5.0):
        assert traffic.loc[("feddistill", f"alpha={alpha}"), "upload (M)"] == pytest.approx(per_alpha[alpha])
    times = time_table(df)
    assert list(times.columns) == ["scenario", "train s/round", "eval s/round", "total s/round"]
    assert (times["total s/round"] > 0).all() and np.isfinite(times.drop(columns="scenario").values).all()
    one = time_table(df[df["alpha"] == 0.5])  # one scenario: one row per method, no scenario column
    assert list(one.index) == methods and "scenario" not in one.columns
    swapped = df.assign(alpha=df["alpha"].map({0.5: 50.0, 5.0: 5.0}))  # the files give alpha 50 first
    assert list(time_table(swapped)["scenario"]) == ["alpha=5.0", "alpha=50.0"] * 2  # the pivot's column order
    lines = [label for label, _ in _by_label(df)]  # curves too: one per method and scenario
    assert lines == [f"{m} (alpha={a})" for m in methods for a in (0.5, 5.0)]
    assert [label for label, _ in _by_label(swapped)] == [f"{m} (alpha={a})" for m in methods for a in (5.0, 50.0)]


def test_rounds_table_gives_mean_and_std_after_each_round(grid, capsys):
    df = load(grid)
    table = rounds_table(df[df["alpha"] == 0.5], [1, 2, 7])
    assert list(table.columns) == ["round 1", "round 2", "round 7"]
    acc = df[(df["alpha"] == 0.5) & (df["algo"] == "local") & (df["round"] == 2)]["test_acc"] * 100
    assert table.loc["local", "round 2"] == f"{acc.mean():.2f} ± {acc.std(ddof=1):.2f}"
    assert table.loc["local", "round 7"] == "–"  # no run went that far
    assert main(["compare", str(grid), "--table", "rounds", "--at", "1,x"]) == 2
    assert "--at wants comma-separated round numbers" in capsys.readouterr().err


def test_a_round_budget_reads_longer_runs_as_if_they_had_stopped(grid, capsys):
    full, cut = summarize(load(grid)), summarize(load(grid, until=1))
    df = load(grid)
    first = df[df["round"] <= 1].groupby("run")["test_acc"].max()
    assert (cut.set_index("run")["best_acc"] == first).all()
    assert (cut["rounds"] == 1).all() and (full["rounds"] == 2).all()
    assert (cut["last_acc"].values != full["last_acc"].values).any()  # round 2 is really left out
    assert main(["compare", str(grid), "--rounds", "-1"]) == 2
    assert "--rounds must be at least 0" in capsys.readouterr().err


def test_compare_cli_writes_tables_and_figures(grid, tmp_path, capsys):
    tex = tmp_path / "t.tex"
    assert main(["compare", str(grid), "--table", "pivot", "--format", "latex", "-o", str(tex),
                 "--plot", str(tmp_path / "c.png"), "--plot-upload", str(tmp_path / "u.png")]) == 0
    assert r"\textbf" in tex.read_text()
    assert (tmp_path / "c.png").stat().st_size > 1000 and (tmp_path / "u.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(["compare", str(grid), "--table", "traffic"]) == 0
    assert "upload (M)" in capsys.readouterr().out


def test_foreign_hdf5_is_refused_in_one_line(tmp_path, capsys):
    import h5py

    with h5py.File(tmp_path / "theirs.h5", "w") as f:
        f["rs_test_acc"] = np.zeros(3)
    assert main(["compare", str(tmp_path / "theirs.h5")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not an htfl result file" in err


def test_two_folders_with_the_same_file_names_stay_separate_runs(grid, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(grid / "local-0.5-0.h5", other / "local-0.5-0.h5")
    runs = summarize(load([grid / "local-0.5-0.h5", other / "local-0.5-0.h5"]))
    assert len(runs) == 2 and (runs["rounds_done"] == 2).all()  # not one run of 6 rows


def test_compare_leaves_out_unfinished_runs_unless_asked(grid, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("local-0.5-0", "local-0.5-1"):
        shutil.copy(grid / f"{name}.h5", folder / f"{name}.h5")
    with h5py.File(folder / "local-0.5-1.h5", "r+") as f:
        f.attrs["status"] = "running"
    capsys.readouterr()
    assert main(["compare", str(folder)]) == 0
    out = capsys.readouterr()
    assert "left out 1 unfinished run(s)" in out.err and "local-0.5-1 (running)" in out.err
    assert main(["compare", str(folder), "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split(",")[5] == "1"  # seeds: the finished one only
    assert main(["compare", str(folder), "--format", "csv", "--unfinished"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split(",")[5] == "2"
    assert main(["compare", str(folder / "local-0.5-1.h5")]) == 2
    assert "no run read has finished (running); --unfinished (unfinished=True) reads them" in capsys.readouterr().err
    with pytest.warns(UserWarning, match=r"left out 1 unfinished run\(s\).*local-0.5-1 \(running\)"):
        assert set(load(folder)["run"]) == {"local-0.5-0"}  # the Python reader leaves it out too
    assert set(load(folder, unfinished=True)["run"]) == {"local-0.5-0", "local-0.5-1"}
    (folder / "local-0.5-1.ckpt").write_bytes(b"not hdf5")  # what a shell glob over a running cell also names
    assert main(["compare", str(folder / "local-0.5-0.h5"), str(folder / "local-0.5-1.ckpt")]) == 0
    assert "skipped 1 checkpoint file(s) of runs in progress: local-0.5-1.ckpt" in capsys.readouterr().err


def test_a_run_cut_off_before_its_first_evaluation_summarizes_without_error(grid):
    df = load(grid / "local-0.5-0.h5")
    df["test_acc"] = np.nan  # as read with --unfinished from a run killed during round 0
    row = summarize(df).iloc[0]
    assert np.isnan(row["best_acc"]) and np.isnan(row["last_acc"]) and row["best_round"] == -1


def test_a_result_file_records_the_versions_that_made_it(grid):
    with h5py.File(next(grid.glob("*.h5"))) as f:
        env = json.loads(f.attrs["environment"])
    assert env["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert env["numpy"] == np.__version__
    assert env["python"].count(".") == 2
