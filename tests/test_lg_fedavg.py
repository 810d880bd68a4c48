"""LG-FedAvg: heads averaged by sample count, shared by every client, private bases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from htfl_plugins.engine import run
from htfl_plugins.engine.loop import prepare
from htfl_plugins.errors import HtflError
from htfl_plugins.plugins import get_plugins
from htfl_plugins.results import read_run
from tests.helpers import one_round
from tests.helpers import parties as setup


def head_of(client):
    return {n: p.detach().clone() for n, p in client.model.head.named_parameters()}


def test_heads_are_the_weighted_average_and_equal_across_clients(digits_config):
    _, clients, server = setup(digits_config(algo="lg_fedavg"))
    bases_before = [{n: p.clone() for n, p in c.model.base.named_parameters()} for c in clients]
    # heads start different across architectures; round 1 sends client 0's initial head
    assert not torch.equal(head_of(clients[0])["weight"], head_of(clients[1])["weight"])
    init0 = head_of(clients[0])
    downloads, uploads = one_round(clients, server, 1)
    assert torch.equal(downloads[2]["head.weight"], init0["weight"])
    assert set(uploads[0]) == {"head.weight", "head.bias", "num_samples"}
    for cid, up in uploads.items():
        assert int(up["num_samples"]) == clients[cid].data.n_train
        assert torch.equal(up["head.weight"], head_of(clients[cid])["weight"])
    # server head = sample-weighted (not uniform) mean of the uploaded heads
    n = torch.tensor([c.data.n_train for c in clients], dtype=torch.float64)
    assert len(set(n.tolist())) > 1  # the test would not tell weighted from uniform otherwise
    for key in ("head.weight", "head.bias"):
        stack = torch.stack([uploads[c][key].double() for c in range(len(clients))])
        expected = (stack * (n / n.sum()).view(-1, *[1] * (stack.dim() - 1))).sum(0)
        assert torch.allclose(server.params[key].double(), expected, atol=1e-6)
        uniform = stack.mean(0)
        assert not torch.allclose(server.params[key].double(), uniform, atol=1e-6)
    # after the next download every client's head equals the global head
    downloads = server.broadcast(2, list(range(len(clients))))
    for cid, c in enumerate(clients):
        c.receive(downloads[cid])
        assert torch.equal(head_of(c)["weight"], server.params["head.weight"])
        assert torch.equal(head_of(c)["bias"], server.params["head.bias"])
    # the bases stayed private: trained (changed) and never overwritten by receive
    for c, before in zip(clients, bases_before):
        after = dict(c.model.base.named_parameters())
        assert any(not torch.equal(before[k], after[k]) for k in before)


def test_state_dict_roundtrip(digits_config):
    s, clients, server = setup(digits_config(algo="lg_fedavg"))
    one_round(clients, server, 1)
    other = s.algo.server(s.options, s.ctx)
    other.load_state_dict(server.state_dict())
    assert all(torch.equal(other.params[k], server.params[k]) for k in server.params)


def test_refuses_vit_beside_cnn(digits_config):
    with pytest.raises(HtflError, match="lg_fedavg averages the clients' heads"):
        prepare(digits_config(algo="lg_fedavg", models="FedAvgCNN,ViT-B/32"), get_plugins())


def test_end_to_end_bytes(digits_config):
    cfg = digits_config(algo="lg_fedavg")
    path = run(cfg, quiet=True)
    r = read_run(path)
    assert len(r["round"]) == 3
    for key in ("test_acc", "test_auc", "train_loss"):
        assert np.all(np.isfinite(r[key]))
    K, D = 10, cfg.feature_dim
    head = 4 * (K * D + K)
    assert r["client_upload_bytes"][0].sum() == 0
    assert np.all(r["client_upload_bytes"][1:] == head + 8)
    assert np.all(r["client_download_bytes"] == head)  # row r holds the broadcast sent after it, for round r+1
    assert r["upload_elements"][1] == cfg.clients * (K * D + K + 1)
    assert math.isfinite(r["attrs"]["best_acc"])
