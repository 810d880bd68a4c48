"""Shared test fixtures: an isolated scenario cache and a quick digits config."""

from __future__ import annotations

import pytest
import torch

from htfl_plugins.config import RunConfig, build

# One torch thread: small test models gain nothing from more, and a loaded
# machine makes several threads per process very slow.
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _htfl_home(tmp_path_factory):
    """Scenarios are cached in a temporary HTFL_HOME shared by the whole session."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HTFL_HOME", str(tmp_path_factory.mktemp("htfl_home")))
    yield
    mp.undo()


@pytest.fixture
def digits_config(tmp_path):
    """``digits_config(**overrides)`` → a validated RunConfig: digits, 4 clients,
    2 rounds, the fast CPU model group, results under tmp_path."""

    def make(**overrides) -> RunConfig:
        values = dict(algo="local", dataset="digits", partition="dir", alpha=0.5, clients=4,
                      rounds=2, models="HtFE-cpu-3", out=str(tmp_path / "results"), seed=0,
                      executor="sequential")
        values.update(overrides)
        return build(RunConfig, values, "setting(s)")

    return make
