"""FedGen: the server-trained generator persists and reaches the clients; heads are
averaged; the head regulariser; traffic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from baselines.fedgen import make_generator
from htfl_plugins.engine import run
from htfl_plugins.engine.loop import prepare
from htfl_plugins.errors import HtflError
from htfl_plugins.plugins import get_plugins
from htfl_plugins.results import read_run
from tests.helpers import one_round
from tests.helpers import parties as setup


def gen_params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def mixed_loss(server, uploads, n=512, seed=5):
    """CE of the sample-weighted mix of the uploaded heads on n generated features."""
    w = torch.tensor([float(u["label_counts"].sum()) for u in uploads.values()])
    w = w / w.sum()
    with torch.no_grad():
        feats, labels = server.generator.sample(server.pooled_counts, n, "uniform",
                                                torch.Generator().manual_seed(seed))
        logits = sum(wi * functional_call(server.head_module,
                                          {"weight": u["head.weight"], "bias": u["head.bias"]},
                                          (feats,))
                     for wi, u in zip(w, uploads.values()))
    return float(F.cross_entropy(logits, labels))


def test_generator_is_trained_persists_and_reaches_clients(digits_config):
    options = {"noise_dim": 32, "hidden_dim": 64, "server_epochs": 30, "generator_lr": 0.01}
    s, clients, server = setup(digits_config(algo="fedgen", options=options))
    initial = gen_params(make_generator(s.options, s.ctx))
    assert all(torch.equal(initial[k], v) for k, v in gen_params(server.generator).items())
    downloads, uploads = one_round(clients, server, 1)
    # round 1: only the initial global head, no generator (no label distribution yet)
    assert set(downloads[0]) == {"head.weight", "head.bias"}
    assert set(uploads[0]) == {"head.weight", "head.bias", "label_counts"}
    assert clients[0].pooled_counts is None
    after1 = gen_params(server.generator)
    assert any(not torch.equal(initial[k], after1[k]) for k in initial)  # it was trained
    # the pooled label distribution is the sum of the uploaded label counts
    expected_counts = sum(torch.bincount(c.data.y_train, minlength=10) for c in clients)
    assert torch.equal(server.pooled_counts, expected_counts)
    # the training lowered the CE of the mixed heads on generated features
    trained = mixed_loss(server, uploads)
    server.generator.load_state_dict({k: v for k, v in initial.items()})
    untrained = mixed_loss(server, uploads)
    server.generator.load_state_dict(after1)
    assert trained < untrained
    # heads: sample-weighted average
    n = torch.tensor([float(c.data.n_train) for c in clients], dtype=torch.float64)
    stack = torch.stack([uploads[i]["head.weight"].double() for i in range(len(clients))])
    assert torch.allclose(server.params["head.weight"].double(),
                          (stack * (n / n.sum()).view(-1, 1, 1)).sum(0), atol=1e-6)

    downloads, _ = one_round(clients, server, 2)
    gen_keys = {"generator." + k for k in initial}
    assert set(downloads[0]) == {"head.weight", "head.bias", "label_counts"} | gen_keys
    for c in clients:  # each client's copy is the server's trained generator
        got = gen_params(c.generator)
        assert all(torch.equal(got[k], after1[k]) for k in after1)
        assert torch.equal(c.pooled_counts, expected_counts)
    after2 = gen_params(server.generator)
    assert any(not torch.equal(after1[k], after2[k]) for k in after1)  # trained again

    other = s.algo.server(s.options, s.ctx)
    other.load_state_dict(server.state_dict())
    assert all(torch.equal(v, after2[k]) for k, v in gen_params(other.generator).items())


def test_client_regulariser_and_label_sampling(digits_config):
    cfg = digits_config(algo="fedgen", options={"noise_dim": 16, "server_epochs": 3})
    _, clients, _ = setup(cfg)
    c = clients[0]
    counts = torch.tensor([0, 4, 0, 0, 0, 1, 0, 0, 0, 0])
    c.pooled_counts = counts
    x, y = c.data.x_train[:10], c.data.y_train[:10]
    state = c.rng.get_state()
    with torch.no_grad():
        total = c.training_loss(x, y)
        c.rng.set_state(state)
        feats, labels = c.generator.sample(counts, 10, "uniform", c.rng)
        reg = F.cross_entropy(c.model.head(feats), labels)
    assert set(labels.tolist()) <= {1, 5}  # only labels with a count are drawn
    assert torch.allclose(total, F.cross_entropy(c.model(x), y) + reg)
    # the regulariser trains the head only: the generator gets no gradient
    c.rng.set_state(state)
    c.training_loss(x, y).backward()
    assert all(p.grad is None for p in c.generator.parameters())
    # gaussian noise option changes the features drawn
    g1 = c.generator.sample(counts, 10, "gaussian", torch.Generator().manual_seed(0))[0]
    g2 = c.generator.sample(counts, 10, "uniform", torch.Generator().manual_seed(0))[0]
    assert not torch.allclose(g1, g2)


def test_refuses_vit_beside_cnn(digits_config):
    with pytest.raises(HtflError, match="fedgen averages the clients' heads"):
        prepare(digits_config(algo="fedgen", models="MLP,ViT-B/32"), get_plugins())


def test_end_to_end_bytes(digits_config):
    nd, hd = 32, 64
    cfg = digits_config(algo="fedgen", options={"noise_dim": nd, "hidden_dim": hd})
    K, D = 10, cfg.feature_dim
    r = read_run(run(cfg, quiet=True))
    assert len(r["round"]) == 3
    for key in ("test_acc", "test_auc", "train_loss"):
        assert np.all(np.isfinite(r[key]))
    head = 4 * (K * D + K)
    gen = (nd + K) * hd + hd + 2 * hd + hd * D + D
    assert np.all(r["client_upload_bytes"][1:] == head + 8 * K)
    assert np.all(r["client_download_bytes"][0] == head)  # row r holds the broadcast sent after it, for round r+1
    assert np.all(r["client_download_bytes"][1:] == head + 4 * gen + 8 * K)
