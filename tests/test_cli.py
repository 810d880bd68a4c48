"""The command line: one clear line and exit code 2 for every bad input."""

from __future__ import annotations

import pytest

from htfl_plugins.cli import main
from tests.helpers import htfl

QUICK = ["--dataset", "digits", "--clients", "3", "--rounds", "1", "--executor", "sequential", "-q"]


@pytest.mark.parametrize("args, message", [
    (["--algo", "nope"], "unknown algorithm 'nope'"),
    (["--dataset", "nope"], "unknown dataset 'nope'"),
    (["--partition", "nope"], "unknown partitioner 'nope'"),
    (["--models", "NoNet"], "unknown model or group 'NoNet'"),
    (["--rounds", "-1"], "--rounds must be at least 0"),
    (["--join-ratio", "1.5"], "--join-ratio must be at most 1.0"),
    (["--lr", "abc"], "invalid float value"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--algo", "fedktl", "--mu", "-1"], "--mu must be at least 0.0"),
    (["--algo", "local", "--mu", "1"], "unrecognized arguments: --mu"),
    (["--clients", "200", "--partition", "pat", "--classes-per-client", "2"], "pat partition impossible"),
    (["--dataset", "cifar10", "--data-root", "/nonexistent/data"], "cifar10 not found (looked in /nonexistent/data"),
    (["--dataset", "pfl:/nonexistent/folder"], "not a PFLlib scenario folder"),
    (["--config", "/nonexistent.toml"], "config file /nonexistent.toml not found"),
    (["--algo", "fedktl", "--generator", "nope"], "unknown generator 'nope'"),
    (["--algo", "fedktl", "--generator", "stylegan"], "needs --generator-path"),
    (["--algo", "fedktl", "--generator-path", "/nonexistent/w.tar"], "/nonexistent/w.tar not found"),
    (["--device", "cuda:0"], "no CUDA device"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--train-ratio", "1.5"], "--train-ratio must be at most 0.99"),
    (["--alpha", "nan"], "--alpha must be a finite number"),
    (["--seed", "-3"], "--seed must be at least 0"),
    (["--balance", "maybe"], "expected true or false"),
    (["--partition", "exdir", "--classes-per-client", "11"], "between 1 and 10"),
    (["--algo", "lg_fedavg", "--models", "FedAvgCNN,ViT-B/32"], "heads"),
    (["--algo", "fedkd", "--t-start", "0.99", "--t-end", "0.9"], "--t-end (0.9) must not be below --t-start"),
    (["--algo", "fedktl", "--proj", "sometimes"], "invalid choice: 'sometimes'"),
    (["--out", "/proc/htfl-cannot-write-here"], "cannot write results to /proc/htfl-cannot-write-here"),
    (["--client-state", "cloud"], "invalid choice: 'cloud'"),
    (["--executor", "ray", "--ray-address", "127.0.0.1:1"], "no Ray cluster answers at --ray-address 127.0.0.1:1"),
])
def test_bad_input_is_one_line_exit_2_and_no_file(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    argv = ["run", *QUICK, "--out", str(out), *args]
    if "--dataset" in args:  # the case's own dataset replaces digits
        i = argv.index("--dataset")
        del argv[i:i + 2]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("htfl: error:") and err.count("\n") == 1, err
    assert message in err
    assert not out.exists() or not any(out.iterdir())


def test_toml_config_and_flags_override(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('algo = "fedktl"\ndataset = "digits"\nclients = 3\nrounds = 1\n'
                   f'out = "{tmp_path / "out"}"\nname = "from-toml"\n'
                   '[options]\nserver_epochs = 2\nsave_images = 0\nmu = 5.0\n')
    done = htfl("run", "--config", cfg, "--mu", "7", "-q")
    assert done.returncode == 0, done.stderr
    from htfl_plugins.results import read_run

    r = read_run(tmp_path / "out" / "from-toml.h5")
    assert r["config"]["clients"] == 3 and r["config"]["options"]["server_epochs"] == 2
    assert r["config"]["options"]["mu"] == 7.0


def test_toml_unknown_key_is_refused(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text('algo = "local"\nrondos = 3\n')
    assert main(["run", "--config", str(cfg)]) == 2
    assert "unknown setting(s) in" in capsys.readouterr().err


def test_algorithm_help_lists_its_options():
    done = htfl("run", "--algo", "fedktl", "--help")
    assert done.returncode == 0
    for flag in ["--mu", "--lamda", "--server-epochs", "--generator", "--join-ratio"]:
        assert flag in done.stdout


def test_compare_over_two_seeds_prints_mean_and_std(tmp_path, capsys):
    out = tmp_path / "out"
    for seed in (0, 1):
        assert main(["run", *QUICK, "--algo", "local", "--seed", str(seed), "--out", str(out)]) == 0
    capsys.readouterr()
    plot = tmp_path / "curves.png"
    assert main(["compare", str(out), "--format", "csv", "-o", str(tmp_path / "t.csv"), "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    assert "best_acc mean (%),best_acc std (%) (ddof 1)" in text and "\nlocal," in text
    assert plot.stat().st_size > 1000 and (tmp_path / "t.csv").read_text().count("\n") == 2


def test_compare_refuses_foreign_files(tmp_path, capsys):
    (tmp_path / "x.h5").write_bytes(b"not hdf5 at all")
    assert main(["compare", str(tmp_path / "x.h5")]) == 2
    assert "not a readable HDF5 result file" in capsys.readouterr().err


def test_data_show_prints_histogram(capsys):
    assert main(["data", "show", "--dataset", "digits", "--clients", "3", "--partition", "pat"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("digits: 3 clients, 10 classes")
    assert len(lines) == 2 + 3
