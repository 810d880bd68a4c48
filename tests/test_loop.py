"""The round loop: evaluation protocol, selection, accounting, reproducibility, stops."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from htfl_plugins import __version__, hookimpl
from htfl_plugins.engine import Client, Server, run
from htfl_plugins.errors import Diverged, HtflError
from htfl_plugins.plugins import load
from htfl_plugins.results import read_run


# ------------------------------------------------------------------ toy algorithms
@dataclass
class ToyOptions:
    size: int = 7
    bad: str = ""


class ToyClient(Client):
    batches_done = 0

    def upload_spec(self):
        return {"vec": ((self.options.size,), torch.float32), "count": ((1,), torch.int64)}

    def train(self):
        if self.options.bad == "nan":
            return float("nan")
        if self.options.bad == "raise1" and self.cid == 1:
            raise RuntimeError("disk on fire")
        self.batches_done = 0
        self.model.train()
        for x, y in self.batches():
            self.batches_done += 1
            self.optimizer.zero_grad()
            self.training_loss(x, y).backward()
            self.optimizer.step()
        if self.options.bad == "inf1-nan-weights" and self.cid == 1:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
        return 0.5

    def upload(self):
        if self.options.bad == "undeclared":
            return {"vec": torch.zeros(self.options.size), "raw_images": self.data.x_train[:4]}
        if self.options.bad == "smuggle":  # raw pixels under a declared name
            return {"vec": self.data.x_train[:4].flatten()}
        if self.options.bad == "dtype":
            return {"vec": torch.zeros(self.options.size, dtype=torch.float64)}
        if self.options.bad == "inf" or (self.options.bad.startswith("inf1") and self.cid == 1):
            return {"vec": torch.full((self.options.size,), float("inf"))}
        return {"vec": torch.zeros(self.options.size), "count": torch.tensor([self.batches_done])}


class ToyServer(Server):
    seen: list

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        self.seen = []

    def broadcast(self, round, selected):
        # client i gets i+1 floats (different sizes per client)
        return {cid: {"w": torch.zeros(cid + 1, dtype=torch.float64)} for cid in selected}

    def update(self, round, uploads):
        self.seen.append({cid: int(u["count"]) for cid, u in uploads.items()})


class ToyPlugin:
    @hookimpl
    def register_algorithms(self, register):
        register("toy", server=ToyServer, client=ToyClient, options=ToyOptions, summary="test")


@pytest.fixture(scope="module")
def toy_plugins():
    return load(extra=[ToyPlugin()])


# ------------------------------------------------------------------ the protocol
def test_result_file_has_every_key(digits_config):
    path = run(digits_config(), quiet=True)
    r = read_run(path)
    assert list(r["round"]) == [0, 1, 2]
    for key in ["test_acc", "test_auc", "train_loss", "upload_bytes", "download_bytes",
                "round_seconds"]:
        assert r[key].shape == (3,), key
        assert np.isfinite(r[key]).all(), key
    assert r["client_test_acc"].shape == (3, 4)
    import h5py

    with h5py.File(path) as f:
        assert list(f["rs_test_acc"][:]) == list(r["test_acc"])
        assert len(f["rs_test_auc"]) == 3 and len(f["rs_train_loss"]) == 3
        assert f.attrs["algorithm"] == "local" and f.attrs["dataset"] == "digits"
        assert f.attrs["seed"] == 0 and f.attrs["version"] == __version__
        assert f.attrs["status"] == "finished"
        assert json.loads(f.attrs["config"])["clients"] == 4
    # round 0 evaluates the untrained models; training helps
    assert r["test_acc"][2] > r["test_acc"][0] + 0.2
    assert 0.5 <= r["test_auc"][2] <= 1.0


def test_accuracy_is_weighted_by_test_size(digits_config):
    from htfl_plugins.data import load_scenario
    from htfl_plugins.plugins import get_plugins

    cfg = digits_config()
    r = read_run(run(cfg, quiet=True))
    sizes = np.array([c.n_test for c in load_scenario(cfg, get_plugins()).clients])
    expected = (r["client_test_acc"] * sizes).sum(1) / sizes.sum()
    assert np.allclose(r["test_acc"], expected)
    assert not np.allclose(r["test_acc"], r["client_test_acc"].mean(1))


def test_same_seed_same_curves_other_seed_other_curves(digits_config):
    a = read_run(run(digits_config(seed=3, name="a"), quiet=True))
    b = read_run(run(digits_config(seed=3, name="b"), quiet=True))
    c = read_run(run(digits_config(seed=4, name="c"), quiet=True))
    for key in ["test_acc", "test_auc", "train_loss", "client_test_acc"]:
        assert np.array_equal(a[key], b[key]), key
    assert not np.array_equal(a["train_loss"], c["train_loss"])


def test_communication_is_counted_per_client(digits_config, toy_plugins):
    r = read_run(run(digits_config(algo="toy", options={"size": 7}), plugins=toy_plugins, quiet=True))
    # upload: 7 float32 + 1 int64 per client; download: client i gets i+1 float64
    assert list(r["upload_bytes"]) == [0, 4 * (7 * 4 + 8), 4 * (7 * 4 + 8)]
    assert list(r["upload_elements"]) == [0, 32, 32]
    # every row sends the next round's broadcast to all clients (after-broadcast) ...
    assert list(r["download_bytes"]) == [8 * (1 + 2 + 3 + 4)] * 3
    assert r["client_download_bytes"][1].tolist() == [8, 16, 24, 32]
    # ... or each training round its own (after-update)
    r = read_run(run(digits_config(algo="toy", options={"size": 7}, name="old", eval_point="after-update"),
                     plugins=toy_plugins, quiet=True))
    assert list(r["download_bytes"]) == [0, 8 * 10, 8 * 10]


def test_join_ratio_and_drop_rate(digits_config, toy_plugins):
    cfg = digits_config(algo="toy", clients=8, partition="iid", join_ratio=0.5, rounds=4)
    r = read_run(run(cfg, plugins=toy_plugins, quiet=True))
    assert list(r["selected_clients"]) == [0, 4, 4, 4, 4]
    assert (r["client_upload_bytes"][1:] > 0).sum(1).tolist() == [4, 4, 4, 4]
    cfg = digits_config(algo="toy", clients=8, partition="iid", drop_rate=0.25, rounds=2, name="d")
    r = read_run(run(cfg, plugins=toy_plugins, quiet=True))
    assert list(r["selected_clients"]) == [0, 6, 6] and list(r["dropped_clients"]) == [0, 2, 2]


def test_eval_gap_keeps_round_zero_and_last(digits_config):
    r = read_run(run(digits_config(rounds=3, eval_gap=2), quiet=True))
    assert np.isfinite(r["test_acc"][[0, 2, 3]]).all() and math.isnan(r["test_acc"][1])


def test_top_cnt_stops_early(digits_config):
    path = run(digits_config(rounds=10, lr=0.0, top_cnt=2), quiet=True)
    r = read_run(path)
    assert len(r["round"]) == 3  # best at round 0, then two evaluations without a new best
    assert r["attrs"]["status"] == "stopped_early"


@pytest.mark.parametrize("bad, message", [
    ("undeclared", "undeclared tensor 'raw_images'"),
    ("smuggle", r"upload 'vec' as float32 \(256,\); it declares float32 \(7,\)"),
    ("dtype", r"upload 'vec' as float64 \(7,\); it declares float32 \(7,\)"),
    ("inf", "round 1: 4 of 4 clients failed.*upload 'vec' holds NaN or Inf"),
    ("nan", "round 1: 4 of 4 clients failed.*client 0 .*non-finite training loss"),
])
def test_bad_uploads_and_losses_are_refused(digits_config, toy_plugins, bad, message):
    with pytest.raises(HtflError, match=message):
        run(digits_config(algo="toy", options={"bad": bad}), plugins=toy_plugins, quiet=True)


def test_diverged_run_keeps_its_finished_rounds(digits_config, toy_plugins, tmp_path):
    with pytest.raises(Diverged):
        run(digits_config(algo="toy", options={"bad": "nan"}, name="f", checkpoint_every=1),
            plugins=toy_plugins, quiet=True)
    r = read_run(tmp_path / "results" / "f.h5")
    assert r["attrs"]["status"] == "diverged" and list(r["round"]) == [0]
    assert r["attrs"]["error"].startswith("round 1: 4 of 4 clients failed")
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["f.h5"]  # no .tmp, no checkpoint


def test_a_failing_client_is_dropped_counted_and_restored(digits_config, toy_plugins, caplog):
    cfg = digits_config(algo="toy", options={"bad": "raise1"}, rounds=3)
    r = read_run(run(cfg, plugins=toy_plugins, quiet=True))
    assert r["attrs"]["status"] == "finished"
    assert list(r["failed_clients"]) == [0, 1, 1, 1]
    assert (r["client_upload_bytes"][1:, 1] == 0).all() and (r["client_upload_bytes"][1:, 0] > 0).all()
    # its state went back to before each round: it never changes
    assert len(set(r["client_test_acc"][:, 1])) == 1
    assert "client 1 (SmallCNN) failed and is left out of this round: RuntimeError: disk on fire" in caplog.text


@pytest.mark.parametrize("bad, kept", [("inf1", True), ("inf1-nan-weights", False)])
def test_a_non_finite_upload_keeps_the_local_training_only_if_the_model_stayed_finite(
        digits_config, toy_plugins, bad, kept):
    from htfl_plugins.engine.executors import Failure, local_update

    _, clients, _ = parties_of(digits_config(algo="toy", options={"bad": bad}), toy_plugins)
    before = copy.deepcopy(clients[1].state_dict())
    result = local_update(clients[1], None, None, 1)
    assert isinstance(result, Failure) and "upload 'vec' holds NaN or Inf" in result.reason
    after = clients[1].state_dict()
    same = all(torch.equal(a, b) for a, b in zip(before["model"].values(), after["model"].values()))
    assert same != kept
    assert torch.isfinite(next(clients[1].model.parameters())).all()
    assert not isinstance(local_update(clients[0], None, None, 1), Failure)


def test_stragglers_do_part_of_their_work(digits_config, toy_plugins, monkeypatch):
    cfg = digits_config(algo="toy", straggler_rate=0.5, rounds=3, batch_size=5)
    _, clients, _ = parties_of(cfg, toy_plugins)
    full = [c.batches_per_round() for c in clients]
    seen = []
    original = ToyServer.update

    def spy(self, round, uploads):
        seen.append({cid: int(u["count"]) for cid, u in uploads.items()})
        original(self, round, uploads)

    monkeypatch.setattr(ToyServer, "update", spy)
    r = read_run(run(cfg, plugins=toy_plugins, quiet=True))
    assert list(r["straggler_clients"]) == [0, 2, 2, 2]
    assert len(seen) == 3
    for counts in seen:  # every client uploads its batch count; two fell short of a full update
        short = [cid for cid, k in counts.items() if k < full[cid]]
        assert len(short) == 2 and all(counts[c] >= 1 for c in short)
        assert all(counts[c] == full[c] for c in counts if c not in short)


def parties_of(cfg, plugins):
    from htfl_plugins.engine.loop import prepare

    s = prepare(cfg, plugins)
    return (s, *s.parties())


@pytest.mark.parametrize("algo", ["local", "fedktl", "fedproto"])
def test_process_executor_gives_the_sequential_curves(digits_config, algo):
    options = {"server_epochs": 3, "save_images": 0} if algo == "fedktl" else {}
    seq = read_run(run(digits_config(algo=algo, threads=1, options=options, name="seq", rounds=3,
                                     join_ratio=0.75), quiet=True))
    par = read_run(run(digits_config(algo=algo, threads=1, options=options, name="par", rounds=3,
                                     join_ratio=0.75, executor="process", workers=2), quiet=True))
    for key in ["test_acc", "test_auc", "train_loss", "client_test_acc", "upload_bytes", "download_bytes"]:
        assert np.array_equal(seq[key], par[key]), key


def test_non_finite_scores_count_as_wrong_without_crashing(digits_config, monkeypatch, caplog):
    from htfl_plugins.engine.loop import evaluate, prepare
    from htfl_plugins.plugins import get_plugins

    setup = prepare(digits_config(), get_plugins())
    clients, _ = setup.parties()
    good = evaluate(clients)
    original = type(clients[0]).scores
    monkeypatch.setattr(type(clients[0]), "scores",
                        lambda self, x: torch.full((len(x), 10), float("nan")) if self.cid == 1 else original(self, x))
    m = evaluate(clients)
    assert m["client_test_acc"][1] == 0.0 and m["client_test_acc"][0] == good["client_test_acc"][0]
    assert np.isfinite(m["test_auc"]) and "client 1 (SmallCNN) gave non-finite scores" in caplog.text
