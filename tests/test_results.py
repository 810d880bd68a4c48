"""Tables and figures from result files, through the one pandas reader."""

from __future__ import annotations

import json
import re
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
from htfl_plugins.results.tables import Stat, groups, render


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
    md = render(table, "markdown")
    for col, alpha in zip(table.columns, (0.5, 5.0)):
        means = runs[runs["alpha"] == alpha].groupby("algo")["best_acc"].mean()
        best = means.idxmax()
        assert table.loc[best, col].best and table.loc[best, col].n == 2
        other = next(a for a in means.index if a != best)
        assert not table.loc[other, col].best
        assert table.loc[best, col].mean == pytest.approx(means[best])
        assert f"**{table.loc[best, col].mean * 100:.2f} ± " in md
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
    lines = [(g.method, g.scenario) for g in groups(df)]  # curves too: one per method and scenario
    assert lines == [(m, f"alpha={a}") for m in methods for a in (0.5, 5.0)]
    assert [(g.method, g.scenario) for g in groups(swapped)] == [(m, f"alpha={a}") for m in methods
                                                                for a in (5.0, 50.0)]


def test_rounds_table_gives_mean_and_std_after_each_round(grid, capsys):
    df = load(grid)
    table = rounds_table(df[df["alpha"] == 0.5], [1, 2, 7])
    assert list(table.columns) == ["round 1", "round 2", "round 7"]
    acc = df[(df["alpha"] == 0.5) & (df["algo"] == "local") & (df["round"] == 2)]["test_acc"] * 100
    assert str(table.loc["local", "round 2"]) == f"{acc.mean():.2f} ± {acc.std(ddof=1):.2f}"
    assert str(table.loc["local", "round 7"]) == "–"  # no run went that far
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
    assert isinstance(Stat.of([0.5]), Stat)
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


# ------------------------------------------------------------------ grouping: only the seed may differ
@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """local on digits: lr 0.01 with seeds 0, 1, 2 and lr 0.1 with seed 0, all untagged."""
    out = tmp_path_factory.mktemp("sweep")
    for lr, seeds in ((0.01, (0, 1, 2)), (0.1, (0,))):
        for seed in seeds:
            run(build(RunConfig, dict(algo="local", dataset="digits", clients=3, rounds=1, lr=lr, seed=seed,
                                      out=str(out), name=f"lr{lr}-s{seed}", executor="sequential"), "s"),
                quiet=True)
    return out


def test_runs_that_differ_in_a_setting_are_never_averaged(sweep, capsys):
    files = [sweep / "lr0.01-s0.h5", sweep / "lr0.1-s0.h5"]
    table = compare_table(load(files))
    assert len(table) == 2 and list(table["lr"]) == [0.01, 0.1] and (table["seeds"] == 1).all()
    assert table["best_acc"].iloc[0].mean != table["best_acc"].iloc[1].mean
    assert list(pivot_table(load(files)).columns) == ["lr=0.01", "lr=0.1"]
    three = compare_table(load([sweep / f"lr0.01-s{s}.h5" for s in range(3)]))
    assert len(three) == 1 and three["seeds"].iloc[0] == 3 and three["best_acc"].iloc[0].n == 3
    assert main(["compare", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\|\s+lr\s+\|", out.splitlines()[0])
    assert len([ln for ln in out.splitlines() if ln.startswith("| local")]) == 2
    assert "mean ± sample standard deviation (ddof 1) over seeds" in out


def test_a_second_run_of_one_seed_is_refused_naming_both_files(sweep, tmp_path, capsys):
    shutil.copy(sweep / "lr0.01-s1.h5", tmp_path / "again.h5")
    files = [sweep / "lr0.01-s0.h5", sweep / "lr0.01-s1.h5", tmp_path / "again.h5"]
    with pytest.raises(HtflError, match=r"lr0.01-s1.h5 and .*again.h5 are two runs of one setting with the "
                                        r"same seed 1"):
        compare_table(load(files))
    assert main(["compare", *map(str, files), "--table", "pivot"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_tag_over_several_option_sets_or_a_by_that_mixes_settings_splits_or_refuses(sweep):
    df = load([sweep / "lr0.01-s0.h5", sweep / "lr0.01-s1.h5"])
    df.loc[df["run"] == "lr0.01-s1", "options"] = "mix=0.5"  # as if the second had another option
    df.loc[df["run"] == "lr0.01-s1", "settings"] = df.loc[df["run"] == "lr0.01-s1", "settings"].str.replace(
        "}", ', "options.mix": 0.5}')
    assert sorted(compare_table(df)["method"]) == ["local (mix=0.5)", "local (mix=–)"]
    with pytest.raises(HtflError, match=r"grouping by algo would average runs that differ in lr"):
        compare_table(load([sweep / "lr0.01-s0.h5", sweep / "lr0.1-s0.h5"]), by=["algo"])
    assert len(compare_table(load([sweep / "lr0.01-s0.h5", sweep / "lr0.1-s0.h5"]), by=["algo", "lr"])) == 2


def test_a_file_from_before_the_evaluation_point_setting_counts_as_after_update(sweep, tmp_path):
    old = tmp_path / "old.h5"
    shutil.copy(sweep / "lr0.01-s1.h5", old)
    with h5py.File(old, "r+") as f:
        cfg = json.loads(f.attrs["config"])
        del cfg["eval_point"]
        f.attrs["config"] = json.dumps(cfg)
    table = compare_table(load([sweep / "lr0.01-s0.h5", old]))
    assert list(table["eval_point"]) == ["after-broadcast", "after-update"] and (table["seeds"] == 1).all()


def test_sample_or_population_std_and_csv_numbers(sweep, capsys):
    df = load([sweep / f"lr0.01-s{s}.h5" for s in range(3)])
    best = summarize(df)["best_acc"] * 100
    sample, population = compare_table(df)["best_acc"].iloc[0], compare_table(df, ddof=0)["best_acc"].iloc[0]
    assert sample.scaled()[1] == pytest.approx(best.std(ddof=1)) and population.scaled()[1] == pytest.approx(
        best.std(ddof=0))
    assert main(["compare", *[str(sweep / f"lr0.01-s{s}.h5") for s in range(3)], "--format", "csv",
                 "--std", "population"]) == 0
    import io

    out = capsys.readouterr()
    csv = pd_read_csv(io.StringIO(out.out))
    assert csv["best_acc mean (%)"].iloc[0] == pytest.approx(best.mean())
    assert csv["best_acc std (%) (ddof 0)"].iloc[0] == pytest.approx(best.std(ddof=0))
    assert csv["best_acc mean (%)"].dtype.kind == "f" and "population standard deviation" in out.err


def pd_read_csv(buf):
    import pandas as pd

    return pd.read_csv(buf)


def test_latex_escapes_headers_index_and_cells(sweep, tmp_path):
    import subprocess

    table = pivot_table(load([sweep / "lr0.01-s0.h5", sweep / "lr0.1-s0.h5"]))
    table.index = ["my_method & 50%"]
    table.columns = ["fmnist dir alpha=0.1 join_ratio=0.5", "x#2 {y}"]
    tex = render(table, "latex")
    body = tex.split(r"\midrule")[0]
    assert r"join\_ratio" in body and r"x\#2 \{y\}" in tex and r"my\_method \& 50\%" in tex
    # by rule: outside math and commands, no special character is left bare
    for line in tex.splitlines():
        if line.startswith("%"):
            continue
        bare = re.sub(r"\\[A-Za-z]+(\{[^}]*\})?|\\[_&%#${}]|\$[^$]*\$|\{|\}", "", line)
        assert not re.search(r"[_#%^~]", bare), line
    engine = shutil.which("pdflatex")
    if engine is None:
        pytest.skip("no TeX engine here; the escaping was checked by rule")
    doc = tmp_path / "t.tex"
    rules = "".join(f"\\providecommand{{\\{r}}}{{\\hline}}" for r in ("toprule", "midrule", "bottomrule"))
    doc.write_text(f"\\documentclass{{article}}{rules}\\begin{{document}}\n{tex}\\end{{document}}\n")
    done = subprocess.run([engine, "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]


def test_curves_have_one_panel_per_scenario_and_one_style_per_method(grid, monkeypatch, tmp_path):
    from htfl_plugins.results import plots

    seen = {}
    original = plots._save

    def spy(fig, path):
        axes = [ax for ax in fig.axes if ax.get_visible()]
        seen["titles"] = [ax.get_title() for ax in axes]
        seen["styles"] = [[(ln.get_color(), ln.get_marker(), ln.get_label()) for ln in ax.get_lines()]
                          for ax in axes]
        seen["ticks"] = [ax.get_xticks().tolist() for ax in axes]
        seen["suptitle"] = fig._suptitle.get_text() if fig._suptitle else ""
        return original(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    plots.plot_curves(load(grid), tmp_path / "c.png")
    assert seen["titles"] == ["alpha=0.5", "alpha=5.0"] and seen["suptitle"].startswith("digits dir clients=3")
    first, second = seen["styles"]
    assert first == second and len({(c, m) for c, m, _ in first}) == 2  # two methods, two styles, same in both
    assert all(float(t).is_integer() for ticks in seen["ticks"] for t in ticks)
    plots.plot_acc_vs_upload(load(grid), tmp_path / "u.png")
    assert seen["titles"] == ["alpha=0.5", "alpha=5.0"] and seen["suptitle"].startswith("digits dir clients=3")
    with pytest.raises(HtflError, match="cannot write the figure"):
        plots.plot_curves(load(grid), tmp_path / "c.nosuchformat")


def test_an_unwritable_table_target_is_one_line(grid, capsys):
    assert main(["compare", str(grid), "-o", "/proc/htfl-no/t.md"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write the table to /proc/htfl-no/t.md" in err


def test_an_option_a_file_predates_counts_as_what_it_ran_with_and_cosmetic_options_are_not_compared():
    from fedktl_plugin.fedktl import FedKTLOptions
    from htfl_plugins.config import compared_settings, to_dict

    today = to_dict(FedKTLOptions())
    old = {k: v for k, v in today.items() if k not in ("arcface_monotone", "centroid_stats")}
    a = compared_settings({"options": {**old, "save_images": 10}}, FedKTLOptions)
    b = compared_settings({"options": {**today, "arcface_monotone": False, "centroid_stats": "eval",
                                       "save_images": 0, "gen_batch_size": 16}}, FedKTLOptions)
    assert a == b  # the authors' target and centroid rule ran before these options existed
    assert "options.save_images" not in a and a["options.arcface_monotone"] is False
    assert compared_settings({"options": old}, None)["options.mu"] == today["mu"]  # not installed: as stored
    assert "options.arcface_monotone" not in compared_settings({"options": old}, None)
