"""FedDistill (FD): per-class logit averaging over holders, both distillation targets,
traffic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from baselines.feddistill import FedDistillOptions, FedDistillServer, distill_term
from htfl_plugins.engine import run
from htfl_plugins.engine.loop import prepare
from htfl_plugins.plugins import get_plugins
from htfl_plugins.results import read_run
from tests.helpers import parties


@pytest.fixture
def setup(digits_config):
    def make(**options):
        s, clients, server = parties(digits_config(algo="feddistill", options=options))
        return s, clients
    return make


def test_server_averages_per_class_over_holders(setup):
    s, _ = setup()
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(n, 10, generator=g) for n in (2, 1, 2))
    ups = {0: {"logits": a, "logit_labels": torch.tensor([1, 4])},
           1: {"logits": b, "logit_labels": torch.tensor([4])},
           2: {"logits": c, "logit_labels": torch.tensor([4, 7])}}
    server = FedDistillServer(FedDistillOptions(), s.ctx)
    assert server.broadcast(1, [0]) == {}
    server.update(1, ups)
    assert sorted(server.vectors) == [1, 4, 7]
    assert torch.allclose(server.vectors[1], a[0])
    assert torch.allclose(server.vectors[4], (a[1] + b[0] + c[0]) / 3)  # uniform over holders
    assert torch.allclose(server.vectors[7], c[1])
    down = server.broadcast(2, [0, 3])[3]
    assert down["logit_labels"].tolist() == [1, 4, 7]
    assert down["logits"].shape == (3, 10)


def test_distill_terms():
    g = torch.Generator().manual_seed(0)
    out = torch.randn(6, 5, generator=g)
    tgt = torch.randn(6, 5, generator=g)
    has = torch.tensor([True, True, False, True, False, True])
    T = 2.0
    kl = distill_term(out, tgt, has, "kl", T)
    ref = F.kl_div(F.log_softmax(out[has] / T, 1), F.log_softmax(tgt[has] / T, 1),
                   log_target=True, reduction="sum") * T * T / 6
    assert torch.allclose(kl, ref)
    assert torch.allclose(distill_term(tgt, tgt, has, "kl", T), torch.zeros(()), atol=1e-6)
    raw = distill_term(out, tgt, has, "raw", T)
    assert torch.allclose(raw, -(tgt[has] * F.log_softmax(out[has], 1)).sum() / 6)
    assert not torch.allclose(raw, kl)
    assert distill_term(out, tgt, torch.zeros(6, dtype=torch.bool), "kl", T) == 0
    # at T = 1 the KL's gradient equals that of CE to softmax(target) (old HtFLlib)
    o1 = out.clone().requires_grad_(True)
    distill_term(o1, tgt, torch.ones(6, dtype=torch.bool), "kl", 1.0).backward()
    o2 = out.clone().requires_grad_(True)
    F.cross_entropy(o2, tgt.softmax(1)).backward()
    assert torch.allclose(o1.grad, o2.grad, atol=1e-6)


def test_client_uploads_eval_mode_class_means(setup):
    _, clients = setup()
    c = clients[2]
    c.train()
    up = c.upload()
    labels = c.data.labels()
    assert set(up) == {"logits", "logit_labels"}
    assert up["logit_labels"].tolist() == labels
    c.model.eval()
    with torch.no_grad():
        out = c.model(c.data.x_train)
    for k, row in zip(labels, up["logits"]):  # logit_source=after: eval-mode class means
        assert torch.allclose(row, out[c.data.y_train == k].mean(0), atol=1e-5)


@pytest.mark.parametrize("target", ["kl", "raw"])
def test_client_distils_toward_global_class_logits(setup, target):
    _, clients = setup(target=target, lam=0.5, temperature=3.0)
    c = clients[2]
    x, y = c.data.x_train[:20], c.data.y_train[:20]
    have = sorted(set(y.tolist()))[:1]
    glob = torch.randn(1, 10, generator=torch.Generator().manual_seed(3))
    c.receive({"logits": glob, "logit_labels": torch.tensor(have)})
    with torch.no_grad():
        o = c.model(x)
        loss = c.training_loss(x, y)
        has = torch.tensor([k in have for k in y.tolist()])
        assert 0 < int(has.sum()) < len(y)
        term = distill_term(o, glob[[0] * len(y)], has, target, 3.0)
        assert term.abs() > 0
        assert torch.allclose(loss, F.cross_entropy(o, y) + 0.5 * term)


def test_end_to_end_bytes(digits_config):
    cfg = digits_config(algo="feddistill")
    s = prepare(cfg, get_plugins())
    held = np.array([len(cd.labels()) for cd in s.scenario.clients])
    union = len(set().union(*(cd.labels() for cd in s.scenario.clients)))
    K = 10
    r = read_run(run(cfg, quiet=True))
    assert len(r["round"]) == 3
    for key in ("test_acc", "test_auc", "train_loss"):
        assert np.all(np.isfinite(r[key]))
    assert np.array_equal(r["client_upload_bytes"][1], 4 * held * K + 8 * held)
    assert np.array_equal(r["client_upload_bytes"][2], 4 * held * K + 8 * held)
    assert np.all(r["client_download_bytes"][0] == 0)  # row r holds the broadcast sent after it, for round r+1
    assert np.all(r["client_download_bytes"][1:] == 4 * union * K + 8 * union)
