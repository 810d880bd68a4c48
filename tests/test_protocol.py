"""The evaluation protocol (HtFLlib's evaluation point, and the old one as an option)
and the metrics channel from the server and the clients into the result file."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from htfl_plugins import hookimpl
from htfl_plugins.cli import main
from htfl_plugins.engine import Client, Server, run
from htfl_plugins.engine.executors import SequentialExecutor
from htfl_plugins.engine.loop import RoundStats, deliver, evaluate, train_round
from htfl_plugins.errors import HtflError
from htfl_plugins.plugins import load
from htfl_plugins.results import load as load_results
from htfl_plugins.results import read_run
from tests.helpers import parties

AFFECTED = ["lg_fedavg", "fedgh", "fedgen", "fedproto", "fedtgp"]  # they score with what the server sends
UNAFFECTED = ["local", "fedktl", "fml", "fedkd", "feddistill"]  # they score with what they trained
FAST = {"fedktl": {"server_epochs": 3, "save_images": 0}, "fedgh": {"server_epochs": 5},
        "fedtgp": {"server_epochs": 5}, "fedgen": {"server_epochs": 5}}


def stepped(cfg):
    """Round 1 of ``cfg`` done by hand with the loop's own steps: the client
    accuracies right after the server's update, and after its next broadcast has
    reached every client."""
    _, clients, server = parties(cfg)
    everyone = list(range(len(clients)))
    stats = RoundStats.empty(len(clients))
    deliver(server, clients, 1, stats)
    train_round(cfg.algo, server, clients, SequentialExecutor(), 1, everyone, downloads={}, stats=stats)
    after_update = evaluate(clients)["client_test_acc"]
    deliver(server, clients, 2, stats)
    return after_update, evaluate(clients)["client_test_acc"], clients, server


@pytest.mark.parametrize("algo", AFFECTED)
def test_round_r_is_scored_after_the_round_r_broadcast(digits_config, algo):
    cfg = digits_config(algo=algo, rounds=1, options=FAST.get(algo, {}))
    after_update, after_broadcast, clients, server = stepped(cfg)
    assert after_update != after_broadcast  # the two rules give different scores here
    default = read_run(run(cfg, quiet=True))
    assert default["client_test_acc"][1].tolist() == after_broadcast
    old = read_run(run(digits_config(algo=algo, rounds=1, options=FAST.get(algo, {}), name="old",
                                     eval_point="after-update"), quiet=True))
    assert old["client_test_acc"][1].tolist() == after_update
    assert default["train_loss"][0] == old["train_loss"][0]  # round 0 scores the untrained models under both
    # what the clients hold when they are scored is the server's newest artefact
    if algo in ("lg_fedavg", "fedgen"):
        for c in clients:
            assert all(torch.equal(p, server.params[f"head.{n}"]) for n, p in c.model.head.named_parameters())
    elif algo == "fedgh":
        for c in clients:
            assert all(torch.equal(p, q) for p, q in zip(c.model.head.parameters(), server.head.parameters()))
    elif algo == "fedproto":
        for c in clients:
            labels = sorted(server.vectors)
            assert torch.equal(c.global_vectors[labels], torch.stack([server.vectors[k] for k in labels]))
    else:
        for c in clients:
            assert torch.equal(c.global_protos, server.global_protos)


@pytest.mark.parametrize("algo", UNAFFECTED)
def test_methods_that_score_their_own_training_give_the_same_accuracy_under_both_rules(digits_config, algo):
    new = read_run(run(digits_config(algo=algo, options=FAST.get(algo, {})), quiet=True))
    old = read_run(run(digits_config(algo=algo, options=FAST.get(algo, {}), name="old",
                                     eval_point="after-update"), quiet=True))
    assert np.array_equal(new["test_acc"], old["test_acc"]) and np.array_equal(new["client_local_loss"][1:],
                                                                                 old["client_local_loss"][1:])


# ------------------------------------------------------------------ a toy algorithm that logs
@dataclass
class LogOptions:
    bad: str = ""


class LogClient(Client):
    def receive(self, payload):
        self.got = int(payload["round"])
        if self.options.bad == "receive" and self.cid == 2:
            raise RuntimeError("cannot take it")

    def train(self):
        loss = super().train()
        return {"loss": loss, "received": float(getattr(self, "got", -1))}

    def upload_spec(self):
        return {"n": ((), torch.int64)}

    def upload(self):
        return {"n": torch.tensor(self.data.n_train)}


class LogServer(Server):
    def broadcast(self, round, selected):
        return self.to_all(selected, {"round": torch.tensor(round)})

    def update(self, round, uploads):
        if self.options.bad == "metric":
            return {"loss": "high"}
        return {"clients": len(uploads), "round_sq": torch.tensor(float(round) ** 2)}


class LogPlugin:
    @hookimpl
    def register_algorithms(self, register):
        register("logtoy", server=LogServer, client=LogClient, options=LogOptions, summary="test")


@pytest.fixture(scope="module")
def log_plugins():
    return load(extra=[LogPlugin()])


def test_every_client_receives_the_broadcast_also_when_not_selected(digits_config, log_plugins):
    cfg = digits_config(algo="logtoy", clients=8, partition="iid", join_ratio=0.5, rounds=3)
    r = read_run(run(cfg, plugins=log_plugins, quiet=True))
    assert (r["client_download_bytes"] > 0).all()  # rows 0..3: broadcasts for rounds 1..4, to all 8
    assert list(r["selected_clients"]) == [0, 4, 4, 4]
    trained = np.isfinite(r["client_local_loss"])
    assert trained[1:].sum(1).tolist() == [4, 4, 4]
    # a client trains on the broadcast of its own round, received before it
    assert list(r["metrics"]["client_received"][1:]) == [1.0, 2.0, 3.0]
    old = read_run(run(digits_config(algo="logtoy", clients=8, partition="iid", join_ratio=0.5, rounds=3,
                                     name="old", eval_point="after-update"), plugins=log_plugins, quiet=True))
    assert (old["client_download_bytes"][1:] > 0).sum(1).tolist() == [4, 4, 4]  # only the selected
    assert list(old["metrics"]["client_received"][1:]) == [1.0, 2.0, 3.0]


def test_round_metrics_reach_the_file_and_the_reader(digits_config, log_plugins, tmp_path, capsys):
    path = run(digits_config(algo="logtoy", rounds=3), plugins=log_plugins, quiet=True)
    r = read_run(path)
    m = r["metrics"]
    assert np.isnan(m["server_clients"][0]) and list(m["server_clients"][1:]) == [4, 4, 4]
    assert list(m["server_round_sq"][1:]) == [1.0, 4.0, 9.0]
    losses = r["client_local_loss"][1:]
    assert np.isnan(r["client_local_loss"][0]).all() and np.isfinite(losses).all()
    df = load_results(path)
    assert {"local_loss", "server_clients", "client_received"} <= set(df.columns)
    assert main(["compare", str(path), "--table", "rounds", "--at", "1,3", "--metric", "server_round_sq"]) == 0
    out = capsys.readouterr().out
    assert "9" in out.split("\n")[2]
    assert main(["compare", str(path), "--metric", "nosuch"]) == 2
    assert "--metric 'nosuch' is not in these results" in capsys.readouterr().err


def test_local_loss_is_the_sample_weighted_mean_of_the_clients_losses(digits_config):
    cfg = digits_config(rounds=2)
    r = read_run(run(cfg, quiet=True))
    _, clients, _ = parties(cfg)
    n = np.array([c.data.n_train for c in clients], dtype=float)
    assert len(set(n)) > 1
    for row in (1, 2):
        expected = (r["client_local_loss"][row] * n).sum() / n.sum()
        assert r["metrics"]["local_loss"][row] == pytest.approx(expected)
        assert r["metrics"]["local_loss"][row] != pytest.approx(r["client_local_loss"][row].mean())


def test_a_metric_that_is_not_a_number_is_one_clear_error(digits_config, log_plugins):
    with pytest.raises(HtflError, match=r"LogServer.update\(\): metric 'loss' is a str, not a number"):
        run(digits_config(algo="logtoy", options={"bad": "metric"}), plugins=log_plugins, quiet=True)


def test_a_client_that_cannot_receive_is_put_back_and_tries_again_before_training(
        digits_config, log_plugins, caplog):
    r = read_run(run(digits_config(algo="logtoy", options={"bad": "receive"}, rounds=2), plugins=log_plugins,
                     quiet=True))
    assert "client 2 (MLP) could not receive the broadcast for round 1: RuntimeError: cannot take it" \
        in caplog.text
    # the retry inside its local update fails too: it is left out of the round, counted
    assert list(r["failed_clients"]) == [0, 1, 1] and r["attrs"]["status"] == "finished"
    assert np.isnan(r["client_local_loss"][1:, 2]).all() and np.isfinite(r["client_local_loss"][1:, :2]).all()


def test_builtin_server_metrics(digits_config):
    ktl = read_run(run(digits_config(algo="fedktl", options={"server_epochs": 3, "save_images": 0}),
                       quiet=True))["metrics"]
    for key in ("server_align_mmd", "server_align_mse", "server_align_loss", "server_centroid_norm",
                "local_loss"):
        assert np.isnan(ktl[key][0]) and np.isfinite(ktl[key][1:]).all(), key
    # total = MMD² + λ·MSE (λ = 1), each the mean over the last pass's steps
    assert ktl["server_align_loss"][1:] == pytest.approx(ktl["server_align_mmd"][1:] + ktl["server_align_mse"][1:])
    assert (ktl["server_centroid_norm"][1:] > 0).all()
    for algo, keys in (("fedgen", ["server_generator_loss"]), ("fedgh", ["server_loss"]),
                       ("fedtgp", ["server_loss", "server_margin"])):
        m = read_run(run(digits_config(algo=algo, name=algo, options=FAST[algo]), quiet=True))["metrics"]
        for key in keys:
            assert np.isfinite(m[key][1:]).all() and m[key][1] > 0, (algo, key)
