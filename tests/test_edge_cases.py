"""Inputs at the edges: clients whose local update sees only some of their classes,
seeds of any size a user may type, and docstrings that state the defaults."""

from __future__ import annotations

import re

import pytest

from htfl_plugins.cli import main
from htfl_plugins.engine import run
from htfl_plugins.engine.executors import Update, local_update
from htfl_plugins.engine.loop import check_upload
from htfl_plugins.results import read_run
from tests.helpers import parties

DURING = [("fedproto", {"proto_source": "during"}), ("feddistill", {"logit_source": "during"})]


@pytest.mark.parametrize("algo, options", DURING, ids=[a for a, _ in DURING])
def test_a_client_that_sees_only_some_of_its_classes_uploads_what_it_holds(digits_config, algo, options):
    _, clients, _ = parties(digits_config(algo=algo, options=options))
    client = max(clients, key=lambda c: c.num_local_classes())
    result = local_update(client, None, 1, 1)  # a straggler's budget: one batch of 10
    assert isinstance(result, Update)
    labels = next(v for k, v in result.upload.items() if k.endswith("labels"))
    assert len(labels) < client.num_local_classes()  # the case that used to stop the run
    check_upload(algo, client.cid, result.spec, result.upload)
    r = read_run(run(digits_config(algo=algo, options=options, straggler_rate=1.0, rounds=2), quiet=True))
    assert r["attrs"]["status"] == "finished" and list(r["failed_clients"]) == [0, 0, 0]


def test_any_seed_a_user_types_works_or_is_refused_in_one_line(tmp_path, capsys):
    quick = ["run", "--algo", "local", "--dataset", "digits", "--clients", "3", "--rounds", "1", "-q",
             "--out", str(tmp_path)]
    big = 2 ** 63 - 1
    assert main([*quick, "--data-seed", "20241201", "--seed", str(big), "--name", "a"]) == 0
    r = read_run(tmp_path / "a.h5")
    assert int(r["attrs"]["seed"]) == big and r["config"]["data_seed"] == 20241201
    capsys.readouterr()
    for flag in ("--seed", "--data-seed"):
        assert main([*quick, flag, str(big + 1), "--name", "b"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{flag} must be at most {big}" in err
    assert not (tmp_path / "b.h5").exists()


def test_docstrings_state_the_defaults_the_options_have():
    import baselines.fedgen as fedgen
    import baselines.fedproto as fedproto

    lam = re.search(r"λ \(``lam``\): ([\d.]+) here", fedproto.__doc__)
    assert lam and float(lam.group(1)) == fedproto.FedProtoOptions().lam
    tuned = re.search(r"Defaults: HtFLlib's tuned noise_dim (\d+) and generator_lr ([\d.]+)", fedgen.__doc__)
    opts = fedgen.FedGenOptions()
    assert tuned and (int(tuned.group(1)), float(tuned.group(2))) == (opts.noise_dim, opts.generator_lr)
    rest = re.search(r"its defaults hidden_dim (\d+) and server_epochs (\d+)", fedgen.__doc__)
    assert rest and (int(rest.group(1)), int(rest.group(2))) == (opts.hidden_dim, opts.server_epochs)
