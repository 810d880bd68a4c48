"""FedProto: per-class prototype averaging over holders, the MSE pull, nearest-prototype
inference, traffic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from baselines.fedproto import FedProtoOptions, FedProtoServer
from htfl_plugins.engine import run
from htfl_plugins.engine.loop import prepare
from htfl_plugins.plugins import get_plugins
from htfl_plugins.results import read_run
from tests.helpers import parties


@pytest.fixture
def setup(digits_config):
    def make(**options):
        s, clients, server = parties(digits_config(algo="fedproto", options=options))
        return s, clients
    return make


def crafted_uploads():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 4, generator=g)
    b = torch.randn(2, 4, generator=g)
    ups = {0: {"protos": a, "proto_labels": torch.tensor([0, 2]),
               "proto_counts": torch.tensor([5, 1])},
           3: {"protos": b, "proto_labels": torch.tensor([2, 3]),
               "proto_counts": torch.tensor([3, 7])}}
    return ups, a, b


def test_server_means_per_class_over_holders_only(setup):
    s, _ = setup()
    ups, a, b = crafted_uploads()
    server = FedProtoServer(FedProtoOptions(), s.ctx)
    assert server.broadcast(1, [0, 1]) == {}  # nothing before the first uploads
    server.update(1, ups)
    assert sorted(server.vectors) == [0, 2, 3]  # class 1: nobody holds it, no prototype
    assert torch.allclose(server.vectors[0], a[0])
    assert torch.allclose(server.vectors[2], (a[1] + b[0]) / 2)  # uniform over the 2 holders
    assert torch.allclose(server.vectors[3], b[1])
    down = server.broadcast(2, [1])[1]
    assert down["proto_labels"].tolist() == [0, 2, 3]
    assert down["proto_labels"].dtype == torch.int64
    assert torch.allclose(down["protos"][1], (a[1] + b[0]) / 2)

    weighted = FedProtoServer(FedProtoOptions(weighting="samples"), s.ctx)
    weighted.update(1, ups)
    assert torch.allclose(weighted.vectors[2], (1 * a[1] + 3 * b[0]) / 4)
    assert torch.allclose(weighted.vectors[0], a[0])


def test_local_prototypes_and_uploads(setup):
    s, clients = setup(weighting="samples")
    c = clients[1]
    c.train()
    up = c.upload()
    assert set(up) == {"protos", "proto_labels", "proto_counts"}
    labels = c.data.labels()
    assert up["proto_labels"].tolist() == labels
    assert up["protos"].shape == (len(labels), s.ctx.feature_dim)
    assert up["proto_counts"].tolist() == [int((c.data.y_train == k).sum()) for k in labels]
    # proto_source=after: the final model's eval-mode class means of base features
    c.model.eval()
    with torch.no_grad():
        f = c.model.base(c.data.x_train)
    for k, p in zip(labels, up["protos"]):
        assert torch.allclose(p, f[c.data.y_train == k].mean(0), atol=1e-5)

    _, clients2 = setup(proto_source="during")
    c2 = clients2[1]
    c2.train()
    up2 = c2.upload()
    assert "proto_counts" not in up2  # uniform weighting sends no counts
    assert up2["proto_labels"].tolist() == labels
    assert torch.isfinite(up2["protos"]).all()
    assert not torch.allclose(up2["protos"], up["protos"])  # a different estimate


def test_proto_loss_and_inference(setup):
    s, clients = setup(lam=2.0)
    c = clients[0]
    D, K = s.ctx.feature_dim, s.ctx.num_classes
    x, y = c.data.x_train[:20], c.data.y_train[:20]
    c.model.eval()
    with torch.no_grad():
        head = c.model(x)
        assert torch.equal(c.scores(x), head)  # no prototypes yet: the head decides
        assert torch.equal(c.training_loss(x, y), F.cross_entropy(head, y))
    # prototypes for some classes only
    have = sorted(set(y.tolist()))[:2]
    g = torch.Generator().manual_seed(1)
    protos = torch.randn(len(have), D, generator=g)
    c.receive({"protos": protos, "proto_labels": torch.tensor(have)})
    with torch.no_grad():
        f = c.model.base(x)
        expected = 0.0
        for i, k in enumerate(y.tolist()):
            if k in have:
                expected += ((f[i] - protos[have.index(k)]) ** 2).sum()
        expected = expected / (len(y) * D)
        assert expected > 0
        assert torch.allclose(c.training_loss(x, y), F.cross_entropy(head, y) + 2.0 * expected)
        # nearest prototype by squared L2; classes without a prototype are never predicted
        sc = c.scores(x)
        d = torch.cdist(f, protos) ** 2
        assert torch.equal(sc.argmax(1), torch.tensor(have)[d.argmin(1)])
        assert torch.allclose(sc[:, have], -d, rtol=1e-4, atol=1e-3)
        missing = [k for k in range(K) if k not in have]
        assert torch.isneginf(sc[:, missing]).all()
        assert torch.equal(c.extra_scores(x)["head"], head)
        assert torch.isfinite(c.eval_loss(x, y))


def test_end_to_end_bytes(digits_config):
    cfg = digits_config(algo="fedproto")
    s = prepare(cfg, get_plugins())
    held = [len(cd.labels()) for cd in s.scenario.clients]
    union = len(set().union(*(cd.labels() for cd in s.scenario.clients)))
    D = cfg.feature_dim
    r = read_run(run(cfg, quiet=True))
    assert len(r["round"]) == 3
    for key in ("test_acc", "test_auc", "train_loss"):
        assert np.all(np.isfinite(r[key]))
    assert np.all(np.isfinite(r["extra"]["acc_head"]))
    up = np.array([4 * c * D + 8 * c for c in held])
    assert np.array_equal(r["client_upload_bytes"][1], up)
    assert np.array_equal(r["client_upload_bytes"][2], up)
    assert np.all(r["client_download_bytes"][0] == 0)  # round 1: no prototypes yet
    # row r holds the broadcast sent after it, for round r+1
    assert np.all(r["client_download_bytes"][1:] == 4 * union * D + 8 * union)
