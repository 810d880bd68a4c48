"""The paper-layout tables of benchmarks/RESULTS.md are what `htfl compare` makes
of the committed result files, digit for digit."""

from functools import cache
from pathlib import Path

import pytest

from htfl_plugins.results import load
from htfl_plugins.results.tables import pivot_table, render

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DIGITS_DIR = sorted((RESULTS / "cpu-table1").glob("*digits_partition=dir*.h5"))

TABLES = {
    "cpu-table1": [RESULTS / "cpu-table1", RESULTS / "cpu-table1-fmnist", RESULTS / "baselines-fmnist"],
    "cpu-models": [RESULTS / "cpu-models", *DIGITS_DIR],
}


@cache
def _runs(suite):
    """The suite's committed files, read once for both metrics."""
    return load(TABLES[suite])


@pytest.mark.parametrize("metric", ["best_acc", "last_acc"])
@pytest.mark.parametrize("suite", sorted(TABLES))
def test_results_md_pivot_matches_the_committed_files(suite, metric):
    text = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    table = render(pivot_table(_runs(suite), metric=metric), "markdown")
    assert table.count("\n") >= 10  # a method per row, not an empty frame
    assert table in text, f"RESULTS.md lacks the {suite} {metric} table that htfl compare makes:\n{table}"
