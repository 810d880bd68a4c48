"""FedGH: the server's head training on uploaded prototypes, clients adopting the
shared head, the head-shape check, traffic."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from htfl_plugins.engine import run
from htfl_plugins.engine.loop import prepare
from htfl_plugins.errors import HtflError
from htfl_plugins.plugins import get_plugins
from htfl_plugins.results import read_run
from tests.helpers import parties


@pytest.fixture
def setup(digits_config):
    def make(**options):
        s, clients, server = parties(digits_config(algo="fedgh", options=options))
        return s, clients, server
    return make


def test_upload_is_class_means_of_features(setup):
    _, clients, _ = setup()
    cl = clients[1]
    up = cl.upload()
    assert set(up) == {"protos", "labels"} and up["labels"].dtype == torch.int64
    assert up["labels"].tolist() == cl.data.labels()
    cl.model.eval()
    with torch.no_grad():
        feats = cl.model.base(cl.data.x_train)
    c = int(up["labels"][0])
    assert torch.allclose(up["protos"][0], feats[cl.data.y_train == c].mean(0), atol=1e-5)


def test_server_head_training_lowers_ce_on_prototypes(setup):
    s, clients, server = setup()
    uploads = {cl.cid: cl.upload() for cl in clients}
    protos = torch.cat([u["protos"] for u in uploads.values()])
    labels = torch.cat([u["labels"] for u in uploads.values()])
    before = F.cross_entropy(server.head(protos), labels).item()
    w0 = server.head.weight.detach().clone()
    server.update(1, uploads)
    after = F.cross_entropy(server.head(protos), labels).item()
    assert not torch.equal(w0, server.head.weight)
    assert after < before - 0.05  # untrained features are small: modest but clear drop
    assert len(server.last_losses) == 100 * math.ceil(len(labels) / s.cfg.batch_size)


def test_server_epochs_zero_leaves_head_alone(setup):
    _, clients, server = setup(server_epochs=0)
    w0 = server.head.weight.detach().clone()
    server.update(1, {cl.cid: cl.upload() for cl in clients})
    assert torch.equal(w0, server.head.weight)


def test_clients_adopt_the_broadcast_head(setup):
    _, clients, server = setup()
    server.update(1, {cl.cid: cl.upload() for cl in clients})
    down = server.broadcast(2, [0, 2])
    assert sorted(down) == [0, 2]
    assert set(down[0]) == {"head.weight", "head.bias"}
    assert not torch.equal(clients[0].model.head.weight, server.head.weight)
    for cid in (0, 2):
        clients[cid].receive(down[cid])
        assert torch.equal(clients[cid].model.head.weight, server.head.weight)
        assert torch.equal(clients[cid].model.head.bias, server.head.bias)
    # client 1 was not selected: its head is its own
    assert not torch.equal(clients[1].model.head.weight, server.head.weight)


def test_initial_head_is_client_zeros(setup):
    _, clients, server = setup()
    assert torch.equal(server.head.weight, clients[0].model.head.weight)


def test_check_refuses_vit_heads(digits_config):
    with pytest.raises(HtflError, match="fedgh"):
        prepare(digits_config(algo="fedgh", models="FedAvgCNN,ViT-B/32"), get_plugins())


def test_end_to_end_traffic(digits_config):
    cfg = digits_config(algo="fedgh", threads=1)
    s = prepare(cfg, get_plugins())
    res = read_run(run(cfg, quiet=True))
    assert len(res["round"]) == 3
    assert all(math.isfinite(v) for v in res["test_acc"])
    assert all(math.isfinite(v) for v in res["train_loss"])
    K, D = s.ctx.num_classes, s.ctx.feature_dim
    held = sum(len(c.labels()) for c in s.scenario.clients)
    assert res["upload_bytes"].tolist() == [0] + [(4 * D + 8) * held] * 2
    # row r holds the broadcast sent after it, for round r+1
    assert res["download_bytes"].tolist() == [4 * (K * D + K) * 4] * 3
    assert res["upload_elements"].tolist() == [0] + [(D + 1) * held] * 2
