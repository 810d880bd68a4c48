"""FML: the mutual-learning losses (KL active by default), uniform meme averaging,
identical meme models after the broadcast, the meme-model check, traffic."""

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
        s, clients, server = parties(digits_config(algo="fml", options=options))
        return s, clients, server
    return make


def batch(cl, n=20):
    return cl.data.x_train[:n], cl.data.y_train[:n]


def test_default_meme_is_first_architecture(setup):
    s, clients, server = setup()
    assert s.options.meme_model == ""
    # client 1 is a SmallCNN, its meme model is the group's first architecture
    assert clients[1].arch != s.ctx.archs[0]
    assert type(clients[1].meme.base) is type(clients[0].model.base)
    assert set(server.params) == {"meme." + n for n, _ in clients[1].meme.named_parameters()}


def test_kl_terms_active_with_defaults(setup):
    s, clients, _ = setup()
    assert (s.options.kl_alpha, s.options.kl_beta) == (0.5, 0.5)
    cl = clients[1]
    x, y = batch(cl)
    loss, loss_m = cl.losses(x, y)
    out, out_m = cl.model(x), cl.meme(x)
    ce, ce_m = F.cross_entropy(out, y), F.cross_entropy(out_m, y)
    kl = F.kl_div(F.log_softmax(out, 1), F.softmax(out_m, 1), reduction="batchmean")
    kl_m = F.kl_div(F.log_softmax(out_m, 1), F.softmax(out, 1), reduction="batchmean")
    assert kl > 1e-4 and kl_m > 1e-4
    assert torch.allclose(loss, 0.5 * ce + 0.5 * kl, atol=1e-6)
    assert torch.allclose(loss_m, 0.5 * ce_m + 0.5 * kl_m, atol=1e-6)
    # with kl_alpha = kl_beta = 1 (HtFLlib's defaults) the losses are the plain CEs
    cl.options.kl_alpha = cl.options.kl_beta = 1.0
    loss1, loss1_m = cl.losses(x, y)
    assert torch.allclose(loss1, ce) and torch.allclose(loss1_m, ce_m)
    assert not torch.allclose(loss, loss1)


def test_private_gradient_depends_on_meme_only_through_kl(setup):
    _, clients, _ = setup()
    cl = clients[1]
    x, y = batch(cl)

    def private_grad(kl_alpha, meme_scale):
        cl.options.kl_alpha = kl_alpha
        with torch.no_grad():
            for p in cl.meme.parameters():
                p.mul_(meme_scale)
        cl.model.zero_grad()
        cl.meme.zero_grad()
        loss, _ = cl.losses(x, y)
        loss.backward()
        g = cl.model.head.weight.grad.clone()
        assert all(p.grad is None or not p.grad.any() for p in cl.meme.parameters())
        with torch.no_grad():
            for p in cl.meme.parameters():
                p.div_(meme_scale)
        return g

    # KL on: changing the meme model changes the private model's gradient
    assert not torch.allclose(private_grad(0.5, 1.0), private_grad(0.5, 3.0))
    # KL off: it does not
    assert torch.allclose(private_grad(1.0, 1.0), private_grad(1.0, 3.0))


def test_memes_averaged_uniformly_and_identical_after_broadcast(setup):
    _, clients, server = setup()
    down = server.broadcast(1, [0, 1, 2, 3])
    for cl in clients:
        cl.receive(down[cl.cid])
    for cl in clients[:3]:
        cl.train()
    uploads = {cl.cid: cl.upload() for cl in clients[:3]}
    k = "meme.head.weight"
    assert not torch.equal(uploads[0][k], uploads[1][k])
    server.update(1, uploads)
    expected = (uploads[0][k] + uploads[1][k] + uploads[2][k]) / 3
    assert torch.allclose(server.params[k], expected, atol=1e-6)
    down = server.broadcast(2, [0, 1, 2, 3])
    for cl in clients:
        cl.receive(down[cl.cid])
    ref = dict(clients[0].meme.named_parameters())
    for cl in clients[1:]:
        for n, p in cl.meme.named_parameters():
            assert torch.equal(p, ref[n]), n
            assert torch.equal(p.detach().cpu(), server.params["meme." + n])


def test_check_refuses_unknown_meme_model(digits_config):
    with pytest.raises(HtflError, match="meme-model"):
        prepare(digits_config(algo="fml", options={"meme_model": "NoSuchNet"}), get_plugins())


def test_end_to_end_traffic(digits_config):
    cfg = digits_config(algo="fml", threads=1, options={"meme_model": "SmallCNN"})
    s = prepare(cfg, get_plugins())
    res = read_run(run(cfg, quiet=True))
    assert len(res["round"]) == 3
    assert all(math.isfinite(v) for v in res["test_acc"])
    assert all(math.isfinite(v) for v in res["extra"]["acc_meme"])
    n_params = sum(p.numel() for p in s.ctx.build_model("SmallCNN").parameters())
    assert res["upload_bytes"].tolist() == [0] + [4 * n_params * 4] * 2
    # row r holds the broadcast sent after it, for round r+1
    assert res["download_bytes"].tolist() == [4 * n_params * 4] * 3
