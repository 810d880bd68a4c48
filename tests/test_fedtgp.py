"""FedTGP: the adaptive margin, the server's prototype training, the client loss
and nearest-prototype inference, traffic."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from baselines.fedtgp import adaptive_margin, euclidean
from htfl_plugins.engine import average_by_class, run
from htfl_plugins.engine.loop import prepare
from htfl_plugins.plugins import get_plugins
from htfl_plugins.results import read_run
from tests.helpers import parties


@pytest.fixture
def setup(digits_config):
    def make(**options):
        s, clients, server = parties(digits_config(algo="fedtgp", options=options))
        return s, clients, server
    return make


def test_adaptive_margin():
    protos = {0: torch.tensor([0.0, 0.0]), 1: torch.tensor([3.0, 0.0]),
              4: torch.tensor([0.0, 10.0])}
    # nearest other class: 0 → 3, 1 → 3, 4 → 10; the largest is 10
    assert adaptive_margin(protos, 100.0) == pytest.approx(10.0)
    assert adaptive_margin(protos, 5.0) == pytest.approx(5.0)
    assert adaptive_margin({2: torch.ones(2)}, 7.0) == 7.0


def test_margin_uses_per_class_averages_of_uploads():
    ups = {0: {"protos": torch.tensor([[0.0, 0.0], [4.0, 0.0]]), "labels": torch.tensor([0, 1])},
           1: {"protos": torch.tensor([[2.0, 0.0]]), "labels": torch.tensor([0])}}
    avg = average_by_class(ups, "protos", "labels", 3)
    # class 0 averages to (1, 0): distance 3 to class 1 (a raw pair would give 2 or 4)
    assert adaptive_margin(avg, 100.0) == pytest.approx(3.0)


def test_euclidean_matches_cdist_and_is_finite_at_zero():
    a = torch.randn(5, 7, generator=torch.Generator().manual_seed(0), requires_grad=True)
    d = euclidean(a, a.detach())
    assert torch.allclose(d, torch.cdist(a.detach(), a.detach()), atol=1e-4)
    d.sum().backward()
    assert torch.isfinite(a.grad).all()


def test_server_training_moves_prototypes_and_lowers_loss(setup):
    s, clients, server = setup()
    assert server.broadcast(1, [0, 1]) == {}  # nothing to send before the first uploads
    uploads = {cl.cid: cl.upload() for cl in clients}
    with torch.no_grad():
        initial = server.generator().clone()
    server.update(1, uploads)
    expected_margin = adaptive_margin(average_by_class(uploads, "protos", "labels", 10), 100.0)
    assert server.margin == pytest.approx(expected_margin)
    assert server.global_protos.shape == (s.ctx.num_classes, s.ctx.feature_dim)
    assert not torch.allclose(server.global_protos, initial)
    losses = server.last_losses
    assert len(losses) == 100 * math.ceil(sum(len(u["labels"]) for u in uploads.values()) / 10)
    assert sum(losses[-5:]) < sum(losses[:5])
    # the trained prototypes classify the uploaded prototypes better than the initial ones
    protos = torch.cat([u["protos"] for u in uploads.values()])
    labels = torch.cat([u["labels"] for u in uploads.values()])
    def acc(g):
        return float((euclidean(protos, g).argmin(1) == labels).float().mean())

    assert acc(server.global_protos) > acc(initial)
    first = server.global_protos.clone()
    server.update(2, uploads)
    assert not torch.allclose(server.global_protos, first)
    down = server.broadcast(3, [2])
    assert list(down) == [2] and torch.equal(down[2]["global_protos"], server.global_protos)


def test_margin_is_added_to_the_true_class_distance(setup):
    s, _, server = setup(server_epochs=1)
    g = torch.Generator().manual_seed(5)
    protos = torch.randn(8, s.ctx.feature_dim, generator=g)   # one batch (batch size 10)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    first = {}
    for margin in (0.0, 5.0):
        with torch.no_grad():
            d = torch.cdist(protos, server.generator())
        expected = F.cross_entropy(-(d + margin * F.one_hot(labels, s.ctx.num_classes)), labels)
        state = {k: v.clone() for k, v in server.generator.state_dict().items()}
        losses = server.train_generator(protos, labels, margin)
        server.generator.load_state_dict(state)
        assert losses == [pytest.approx(expected.item(), rel=1e-4)]
        first[margin] = losses[0]
    assert first[5.0] > first[0.0] + 1.0


def test_client_loss_and_nearest_prototype_inference(setup):
    s, clients, _ = setup()
    cl = clients[0]
    x, y = cl.data.x_train[:20], cl.data.y_train[:20]
    with torch.no_grad():
        ce = F.cross_entropy(cl.model(x), y)
        assert torch.allclose(cl.training_loss(x, y), ce)   # no prototypes yet: plain CE
        assert torch.equal(cl.scores(x), cl.model(x))        # and the head predicts
        g = torch.Generator().manual_seed(3)
        protos = torch.randn(s.ctx.num_classes, s.ctx.feature_dim, generator=g)
        cl.receive({"global_protos": protos})
        rep = cl.model.base(x)
        mse = F.mse_loss(rep, protos[y])
        assert torch.allclose(cl.training_loss(x, y), ce + 10.0 * mse, atol=1e-5)
        scores = cl.scores(x)
        nearest = torch.cdist(rep, protos).argmin(1)
        assert torch.equal(scores.argmax(1), nearest)
        assert torch.equal(cl.extra_scores(x)["head"], cl.model(x))


def test_upload_is_class_means_of_features(setup):
    _, clients, _ = setup()
    cl = clients[2]
    up = cl.upload()
    assert up["labels"].tolist() == cl.data.labels() and up["labels"].dtype == torch.int64
    cl.model.eval()
    with torch.no_grad():
        feats = cl.model.base(cl.data.x_train)
    c = int(up["labels"][-1])
    assert torch.allclose(up["protos"][-1], feats[cl.data.y_train == c].mean(0), atol=1e-5)


def test_end_to_end_traffic(digits_config):
    cfg = digits_config(algo="fedtgp", threads=1, options={"server_epochs": 20})
    s = prepare(cfg, get_plugins())
    res = read_run(run(cfg, quiet=True))
    assert len(res["round"]) == 3
    assert all(math.isfinite(v) for v in res["test_acc"])
    assert all(math.isfinite(v) for v in res["extra"]["acc_head"])
    K, D = s.ctx.num_classes, s.ctx.feature_dim
    held = sum(len(c.labels()) for c in s.scenario.clients)
    assert res["upload_bytes"].tolist() == [0] + [(4 * D + 8) * held] * 2
    # row r holds the broadcast sent after it, for round r+1
    assert res["download_bytes"].tolist() == [0, 4 * K * D * 4, 4 * K * D * 4]
