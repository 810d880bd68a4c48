"""Benchmark suites: every shipped suite parses and lists its cells; a re-run
skips finished cells, continues cut-off ones from their checkpoint and redoes
the others."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from htfl_plugins.bench import cell_status, changed_settings, load_suite, resumable, run_suite
from htfl_plugins.cli import main
from htfl_plugins.engine import run
from htfl_plugins.plugins import get_plugins, load
from htfl_plugins.results import read_run
from tests.test_resume import StopAt, assert_same_curves

SUITES = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "suites").glob("*.toml"))
EXPECTED = {"paper-table1": 8 * 9 * 3, "paper-table2": (8 * 9 - 3) * 3, "cpu-table1": 2 * 10 * 3,
            "cpu-table1-fmnist": 10 * 3, "cpu-table1-after-update": 2 * 5 * 3,
            "cpu-clients": 3 * 10, "cpu-models": 3 * 10 * 3, "cpu-ktl-single": 3 * 3 * 3, "fedktl-centroids": 1,
            "fedktl-ablations": 2 * 3 + 7, "fedktl-default-ablations": 7, "baselines-fmnist": 11 * 3}


@pytest.mark.parametrize("suite", SUITES, ids=lambda p: p.stem)
def test_shipped_suites_parse_and_dry_run(suite, tmp_path, capsys):
    name, cells = load_suite(str(suite), str(tmp_path), get_plugins())
    assert name == suite.stem and len(cells) == EXPECTED[name]
    assert len({c.name for c in cells}) == len(cells)
    # the same numbers whatever --jobs is
    assert all(c.config.threads == 1 and c.config.executor == "sequential" for c in cells)
    assert main(["bench", str(suite), "--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{len(cells)} cells, ~" in out and "missing" in out and "local steps" in out


def test_only_selects_cells_by_name(tmp_path, capsys):
    suite = str(SUITES[[s.stem for s in SUITES].index("cpu-table1")])
    assert main(["bench", suite, "--dry-run", "--out", str(tmp_path), "--only", "*partition=dir*", "Local_*"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if " missing " in ln]
    assert len(lines) == 10 * 3 + 3  # Dirichlet cells, plus Local's pathological cells
    assert all("partition=dir" in ln or ln.startswith("Local_") for ln in lines)
    assert main(["bench", suite, "--dry-run", "--only", "nothing*"]) == 2
    assert "no cell of" in capsys.readouterr().err


def test_paper_table2_excludes_vit_heads_for_head_sharing_methods(tmp_path):
    _, cells = load_suite(str(SUITES[[s.stem for s in SUITES].index("paper-table2")]), str(tmp_path))
    pairs = {(c.config.algo, c.config.models) for c in cells}
    assert ("lg_fedavg", "HtM-img-10") not in pairs and ("fml", "HtM-img-10") in pairs


def test_rerun_skips_finished_and_redoes_unfinished(tmp_path):
    suite = tmp_path / "tiny.toml"
    suite.write_text('seeds = [0, 1]\n[settings]\ndataset = "digits"\nclients = 3\nrounds = 1\n'
                     '[[runs]]\nalgo = "local"\n[[runs]]\ntag = "KTL"\nalgo = "fedktl"\n'
                     'options = { server_epochs = 2, save_images = 0 }\n')
    _, cells = load_suite(str(suite), str(tmp_path / "out"))
    assert len(run_suite(cells, log=lambda *_: None)) == 4
    assert all(cell_status(c) == "finished" for c in cells)
    # a cell killed halfway: its file says "running"; another cell lost its file
    from htfl_plugins.results.store import RunRecord

    half = cells[1]
    r = read_run(half.path)
    rec = RunRecord(half.path, r["config"], 3)
    rec.rows = {k: list(r[k][:1]) for k in r if k not in ("attrs", "config", "extra", "metrics")}
    rec.write("running")
    cells[2].path.unlink()
    before = {c.name: c.path.stat().st_mtime_ns for c in (cells[0], cells[3])}
    redone = run_suite(cells, log=lambda *_: None)
    assert {c.name for c in redone} == {cells[1].name, cells[2].name}
    assert {c.name: c.path.stat().st_mtime_ns for c in (cells[0], cells[3])} == before
    assert all(cell_status(c) == "finished" for c in cells)


def test_a_finished_cell_under_changed_settings_stops_the_rerun(tmp_path):
    suite = tmp_path / "edit.toml"
    head = '[settings]\ndataset = "digits"\nclients = 3\nrounds = 1\n'
    suite.write_text(head + '[[runs]]\nalgo = "fedproto"\noptions = { lam = 1.0 }\n')
    _, (cell,) = load_suite(str(suite), str(tmp_path / "out"))
    run_suite([cell], log=lambda *_: None)
    stamp = cell.path.stat().st_mtime_ns
    # a setting the suite spells out as it was changes nothing
    suite.write_text(head + 'lr = 0.01\n[[runs]]\nalgo = "fedproto"\noptions = { lam = 1.0 }\n')
    _, (same,) = load_suite(str(suite), str(tmp_path / "out"))
    assert cell_status(same) == "finished" and run_suite([same], log=lambda *_: None) == []
    suite.write_text(head + 'lr = 0.05\n[[runs]]\nalgo = "fedproto"\noptions = { lam = 2.0 }\n')
    _, (edited,) = load_suite(str(suite), str(tmp_path / "out"))
    assert cell_status(edited) == "stale"
    from htfl_plugins.errors import HtflError

    with pytest.raises(HtflError, match=r"1 finished cell\(s\) .* lr 0.01 → 0.05, options.lam 1.0 → 2.0"):
        run_suite([edited], log=lambda *_: None)
    assert cell.path.stat().st_mtime_ns == stamp  # the finished result is kept as it was
    # a setting the stored run predates counts as what it ran with: today's default, or the
    # earlier rule where the default changed (the evaluation point)
    stored = read_run(cell.path)["config"]
    del stored["lr"], stored["eval_point"]
    assert changed_settings(edited, stored) == ["lr 0.01 → 0.05", "eval_point 'after-update' → 'after-broadcast'",
                                                "options.lam 1.0 → 2.0"]
    # so does a default that changed under a suite that does not spell the setting out
    suite.write_text(head + '[[runs]]\nalgo = "fedproto"\noptions = { lam = 1.0 }\n')
    _, (unchanged,) = load_suite(str(suite), str(tmp_path / "out"))
    assert changed_settings(unchanged, stored) == ["eval_point 'after-update' → 'after-broadcast'"]


def test_a_cut_off_cell_continues_from_its_checkpoint(tmp_path):
    suite = tmp_path / "cut.toml"
    text = ('[settings]\ndataset = "digits"\nclients = 3\nrounds = 4\ncheckpoint_every = 1\n'
            '[[runs]]\nalgo = "fedproto"\n')
    suite.write_text(text)
    _, (cell,) = load_suite(str(suite), str(tmp_path / "out"))
    with pytest.raises(KeyboardInterrupt):  # the session ends after round 2
        run(cell.config, plugins=load(extra=[StopAt(2)]), quiet=True)
    cut = read_run(cell.path)
    assert resumable(cell.config)
    assert run_suite([cell], log=lambda *_: None) == [cell]
    done = read_run(cell.path)
    assert done["attrs"]["status"] == "finished" and list(done["round"]) == [0, 1, 2, 3, 4]
    # rounds 0-2 were not run again: their timings are the cut-off run's own
    assert np.array_equal(done["round_seconds"][:3], cut["round_seconds"][:3], equal_nan=True)
    _, (straight,) = load_suite(str(suite), str(tmp_path / "straight"))
    run_suite([straight], log=lambda *_: None)
    assert_same_curves(read_run(straight.path), done)

    # changed settings (here: rounds) start the cell over instead
    with pytest.raises(KeyboardInterrupt):
        run(dataclasses.replace(straight.config, rounds=6), plugins=load(extra=[StopAt(1)]), quiet=True)
    assert not resumable(straight.config)


def test_a_failing_cell_does_not_stop_the_others(tmp_path):
    suite = tmp_path / "mixed.toml"
    suite.write_text('[settings]\ndataset = "digits"\nclients = 3\nrounds = 1\n'
                     '[[runs]]\nalgo = "lg_fedavg"\nmodels = "FedAvgCNN,ViT-B/32"\n'
                     '[[runs]]\nalgo = "local"\n')
    _, cells = load_suite(str(suite), str(tmp_path / "out"))
    from htfl_plugins.errors import HtflError

    with pytest.raises(HtflError, match="1 of 2 cells failed"):
        run_suite(cells, log=lambda *_: None)
    assert cell_status(cells[1]) == "finished" and cell_status(cells[0]) == "missing"


def test_a_diverged_cell_is_a_result_kept_and_marked(tmp_path, capsys):
    suite = tmp_path / "wild.toml"
    suite.write_text('[settings]\ndataset = "digits"\nclients = 3\nrounds = 2\n'
                     '[[runs]]\ntag = "wild"\nalgo = "local"\nlr = 1e12\n[[runs]]\nalgo = "local"\n')
    _, cells = load_suite(str(suite), str(tmp_path / "out"))
    assert len(run_suite(cells, log=lambda *_: None)) == 2  # no error: divergence is an outcome
    assert "cell wild_default_s0 diverged: round 1: 3 of 3 clients failed" in capsys.readouterr().out
    assert [cell_status(c) for c in cells] == ["diverged", "finished"]
    assert not list(cells[0].path.parent.glob("*.ckpt"))
    assert run_suite(cells, log=lambda *_: None) == []  # not redone
    from htfl_plugins.results import load
    from htfl_plugins.results.load import summarize

    errors = sorted(summarize(load(cells[0].path.parent))["error"])
    assert errors[0] == "" and errors[1].startswith("round 1: 3 of 3 clients failed")
    assert main(["compare", str(cells[0].path.parent), "--table", "pivot", "--metric", "last_acc"]) == 0
    out = capsys.readouterr().out
    wild, local = (next(ln for ln in out.splitlines() if ln.startswith(f"| {m} ")) for m in ("wild", "local"))
    assert "†" in wild and "**" not in wild and "**" in local and "†" not in local
    assert "† a run of this cell diverged" in out
